"""Dataset registry, the fixed probe set and deterministic batching.

Every dataset is a name in :data:`regime_jax.registry.DATASETS`: ``register_dataset(name,
loader)`` adds a user's ``loader(config.dataset) -> Dataset``, and ``train_and_evaluate(...,
dataset=Dataset(...))`` takes arrays directly.

Embedded, offline datasets (no network, ever):
  * ``mnist1d``: MNIST-1D generated locally by ``mnist1d.data.make_dataset`` (never its
    download path); x ``[N, 40]`` float32 standardized with train statistics.
  * ``digits``: scikit-learn's bundled 8x8 handwritten digits; x ``[N, 8, 8, 1]`` in [0, 1],
    split 80/20 by a fixed permutation.
Through tensorflow-datasets ``tfds.data_source`` (array_record; no TensorFlow import):
  * ``mnist``, ``fashion_mnist`` (x ``[N, 28, 28, 1]``), ``cifar10`` (x ``[N, 32, 32, 3]``),
    scaled to [0, 1]; the ``test`` split is the validation split. If tfds cannot find or
    download a dataset, :class:`DatasetUnavailableError` says how to get it. There is no
    fallback to other data. Before a download the source host is probed (at most
    ``PROBE_TIMEOUT_S``), so without network the run fails in seconds; a download that fails
    midway has its partial files removed.

The probe set is ``size`` validation examples chosen once by ``seed`` (sorted indices, same
order at every record). Batches are a pure function of (seed, step): epoch ``e`` uses the
permutation ``default_rng([seed, e])``, drop-remainder, so a resumed run sees the same data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from regime_jax import registry


class DatasetUnavailableError(RuntimeError):
    """A tfds dataset could not be found or downloaded; regime_jax never substitutes data."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """In-memory splits as numpy arrays; labels int32 in ``[0, num_classes)``.

    Inputs must be numbers: a NaN or inf anywhere in ``x_train`` or ``x_val`` (the probe set
    is drawn from ``x_val``), or in floating-point labels, raises ValueError when the Dataset
    is made (:func:`check_finite`), so a loader's data is refused at load and a user's before
    ``train_and_evaluate`` computes or writes anything. (A NaN input would otherwise turn a
    probe example's pattern into "all off" and count as dead units, silently.)
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        check_finite(self)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


SPLITS = (  # (field, split name in messages)
    ("x_train", "train inputs"),
    ("y_train", "train labels"),
    ("x_val", "validation inputs (the probe set is drawn from them)"),
    ("y_val", "validation labels"),
)
_CHUNK = 1 << 22  # elements tested at once: the test's own memory stays a few MB


def first_nonfinite(a: Any) -> tuple[int, float] | None:
    """``(example index, value)`` of the first non-finite entry of ``a`` (None: all finite).

    Only floating-point and complex arrays can hold one; the scan goes in chunks of examples,
    so it allocates a few MB whatever the array's size.

    >>> first_nonfinite(np.array([[0.0, 1.0], [2.0, np.inf]]))
    (1, inf)
    >>> first_nonfinite(np.arange(3)) is None
    True
    """
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.inexact) or a.size == 0:
        return None
    if a.ndim == 0:
        return None if np.isfinite(a) else (0, a.item())
    per_example = max(1, a.size // len(a))
    step = max(1, _CHUNK // per_example)
    for start in range(0, len(a), step):
        bad = ~np.isfinite(a[start : start + step].reshape(-1, per_example)).all(axis=1)
        if bad.any():
            i = start + int(np.argmax(bad))
            row = np.ravel(a[i])
            return i, row[~np.isfinite(row)][0].item()
    return None


def check_finite(ds: Dataset) -> None:
    """Raises ValueError naming the split and the first example with a NaN or inf.

    One line, e.g. ``dataset 'mine': validation inputs (...) hold nan at index 17 ...``.
    """
    for field, split in SPLITS:
        found = first_nonfinite(getattr(ds, field))
        if found is not None:
            index, value = found
            raise ValueError(
                f"dataset {ds.name!r}: {split} hold {value} at index {index} ({field}[{index}]); "
                f"inputs must be finite numbers: clean or drop those examples"
            )


def _standardize(x_train: np.ndarray, x_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std).astype(np.float32), ((x_val - mean) / std).astype(np.float32)


@functools.cache
def _mnist1d(num_samples: int, seed: int) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    raw = make_dataset(args)  # generated locally from templates; no download
    x_train, x_val = _standardize(raw["x"], raw["x_test"])
    return Dataset(
        "mnist1d", x_train, raw["y"].astype(np.int32), x_val, raw["y_test"].astype(np.int32), 10
    )


@functools.cache
def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # bundled with scikit-learn; no download
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = len(y) // 5
    val, train = order[:n_val], order[n_val:]
    return Dataset("digits", x[train], y[train], x[val], y[val], 10)


# Where tfds downloads each dataset from (its builder's URLs): probed before a download so that
# a machine without network fails in seconds, not after minutes of retries.
DOWNLOAD_HOSTS = {
    "mnist": ("storage.googleapis.com", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    "cifar10": ("www.cs.toronto.edu", 443),
}
PROBE_TIMEOUT_S = 10.0


def _unreachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``host:port`` cannot be reached within ``timeout`` seconds (None if it can)."""
    result: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as err:
            result.append(f"{type(err).__name__}: {err}")

    worker = threading.Thread(target=connect, daemon=True)  # DNS has no timeout of its own
    worker.start()
    worker.join(timeout)
    return result[0] if result else f"no answer within {timeout:.0f} s"


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*")) | {root} if root.exists() else set()


def _remove_new(root: Path, before: set[Path]) -> None:
    """Deletes what a failed download created under ``root`` (never what was there before)."""
    for path in sorted(_tree(root) - before, key=lambda p: len(p.parts)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)


def _unavailable(name: str, split: str, data_dir, download: bool, why: str):
    return DatasetUnavailableError(
        f"tfds dataset {name!r} (split {split!r}) is not available "
        f"(dataset.data_dir={data_dir!r}, dataset.download={download}): {why}\n"
        f"To get it, on a machine with network access run once:\n"
        f"  tfds build {name} --file_format=array_record   (pip install tensorflow may be "
        f"needed to prepare it)\n"
        f"then pass --config.dataset.data_dir=<that data directory>. regime_jax does not "
        f"fall back to other data; for an offline run use dataset.name='mnist1d' or 'digits'."
    )


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def _tfds_split(name: str, split: str, data_dir: str | None, download: bool) -> Any:
    """The prepared split; else a download (fast-failing, cleaned up) if ``download``."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # tfds raises many types; all mean "not prepared here"
        if not download:
            raise _unavailable(name, split, data_dir, download, _one_line(err)) from None
    host, port = DOWNLOAD_HOSTS.get(name, ("storage.googleapis.com", 443))
    why = _unreachable(host, port)
    if why:
        reason = f"not prepared, and its download host {host} cannot be reached ({why})"
        raise _unavailable(name, split, data_dir, download, reason) from None
    root = Path(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
    before = _tree(root)
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=True)
    except Exception as err:  # a failed download leaves partial files: remove them
        _remove_new(root, before)
        raise _unavailable(name, split, data_dir, download, _one_line(err)) from None


def _to_arrays(source: Any) -> tuple[np.ndarray, np.ndarray]:
    rows = [source[i] for i in range(len(source))]
    x = np.stack([np.asarray(r["image"]) for r in rows]).astype(np.float32) / 255.0
    return x, np.asarray([r["label"] for r in rows], np.int32)


EMBEDDED = ("digits", "mnist1d")
TFDS = ("cifar10", "fashion_mnist", "mnist")
MNIST1D_MIN_SAMPLES = 10  # one example per class; make_dataset returns nothing below


def load_mnist1d(cfg: Mapping[str, Any]) -> Dataset:
    """MNIST-1D from ``dataset.num_samples`` and ``dataset.seed`` (generated, offline)."""
    num_samples = int(cfg.get("num_samples", 5000))
    if num_samples < MNIST1D_MIN_SAMPLES:
        raise ValueError(
            f"dataset.num_samples={num_samples} is too small for mnist1d; allowed values: "
            f">= {MNIST1D_MIN_SAMPLES}"
        )
    return _mnist1d(num_samples, int(cfg.get("seed", 42)))


def load_digits(cfg: Mapping[str, Any]) -> Dataset:
    """scikit-learn's 8x8 digits, split by ``dataset.seed`` (bundled, offline)."""
    return _digits(int(cfg.get("seed", 0)))


def _tfds_loader(name: str, num_classes: int = 10) -> Callable[[Mapping[str, Any]], Dataset]:
    def load(cfg: Mapping[str, Any]) -> Dataset:
        data_dir, download = cfg.get("data_dir"), bool(cfg.get("download", True))
        x_train, y_train = _to_arrays(_tfds_split(name, "train", data_dir, download))
        x_val, y_val = _to_arrays(_tfds_split(name, "test", data_dir, download))
        return Dataset(name, x_train, y_train, x_val, y_val, num_classes)

    load.__doc__ = f"tfds {name!r} through ``tfds.data_source`` (see the module docstring)."
    return load


load_mnist = _tfds_loader("mnist")
load_fashion_mnist = _tfds_loader("fashion_mnist")
load_cifar10 = _tfds_loader("cifar10")

DATASETS = registry.DATASETS
register_dataset = DATASETS.register  # register_dataset(name, loader(cfg) -> Dataset)


def load_dataset(cfg: Mapping[str, Any]) -> Dataset:
    """Loads ``cfg["name"]`` through the registry; unknown names raise naming the choices."""
    ds = DATASETS.get(cfg.get("name"))(cfg)
    if not isinstance(ds, Dataset):
        raise TypeError(
            f"dataset.name={cfg.get('name')!r}: the loader returned "
            f"{type(ds).__name__}, not a regime_jax.data.Dataset"
        )
    return ds


def probe_indices(num_val: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct validation indices chosen once by ``seed``, sorted."""
    if not 0 < size <= num_val:
        raise ValueError(
            f"probe.size={size} must be in [1, {num_val}] (the validation split's size)"
        )
    return np.sort(np.random.default_rng(seed).choice(num_val, size, replace=False))


@functools.lru_cache(maxsize=2)
def _permutation(num_train: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_train)


def batch_indices(num_train: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the training batch consumed at ``step`` (0-based): pure in its arguments."""
    epoch, i = divmod(step, num_train // batch_size)
    return _permutation(num_train, seed, epoch)[i * batch_size : (i + 1) * batch_size]


def check_batch_size(ds: Dataset, batch_size: int) -> None:
    """Raises ValueError unless ``batch_size`` fits in the training split."""
    if not 0 < batch_size <= len(ds.y_train):
        raise ValueError(
            f"batch_size={batch_size} must be in [1, {len(ds.y_train)}] (training split size)"
        )


def batches(ds: Dataset, batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict]:
    """``{"x", "y"}`` numpy batches for steps ``start_step, start_step + 1, ...``.

    The batch size is checked here, at the call, not at the first ``next``.
    """
    check_batch_size(ds, batch_size)
    return _batches(ds, batch_size, seed, start_step)


def _batches(ds: Dataset, batch_size: int, seed: int, step: int) -> Iterator[dict]:
    while True:
        idx = batch_indices(len(ds.y_train), batch_size, seed, step)
        yield {"x": ds.x_train[idx], "y": ds.y_train[idx]}
        step += 1
