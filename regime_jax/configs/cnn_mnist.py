r"""ReLU CNN (conv32-conv64, max pool 2, dense 128) on MNIST through tensorflow-datasets, Adam.

``cnn_digits`` scaled to MNIST: wider convs, a larger probe set, longer, sparser logging.

COMMAND:
  python -m regime_jax.main --config cnn_mnist --workdir runs/cnn_mnist
  Needs the dataset prepared as array_record (network once): `tfds build mnist
  --file_format=array_record`, or `--config.dataset.data_dir=<dir>` pointing at it. Without
  it the run stops with an error saying so; it never substitutes other data.

EXPECTED: not measured on this machine (offline); an accelerator is recommended.
"""

from regime_jax.configs import cnn_digits
from regime_jax.configs.base import smoke, variant


def get_config(arg: str | None = None):
    arg = variant(arg)
    c = cnn_digits.get_config()
    c.dataset.name, c.dataset.seed = "mnist", 42  # the default seed (tfds ignores it)
    c.probe.size = 1024
    c.model.channels, c.model.dense = (32, 64), (128,)
    c.batch_size, c.num_steps = 128, 5000
    c.record.snapshot_every_steps = 250
    c.log_every_steps = c.eval_every_steps = 250
    if arg == "quick":
        smoke(c, num_steps=20, probe_size=32, batch_size=16)
        c.model.channels, c.model.dense = (4, 8), (16,)
    return c
