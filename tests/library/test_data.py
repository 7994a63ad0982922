"""Embedded datasets, the fixed probe set and deterministic batching."""

from __future__ import annotations

import numpy as np

from regime_jax import data


def test_embedded_datasets_shapes_and_labels():
    m = data.load_dataset({"name": "mnist1d"})
    assert m.x_train.shape == (4000, 40) and m.x_val.shape == (1000, 40)
    d = data.load_dataset({"name": "digits"})
    assert d.x_train.shape[1:] == (8, 8, 1) and len(d.y_train) + len(d.y_val) == 1797
    for ds in (m, d):
        assert ds.x_train.dtype == np.float32 and set(np.unique(ds.y_train)) == set(range(10))


def test_mnist1d_is_generated_deterministically():
    a = data._mnist1d.__wrapped__(400, 7)
    b = data._mnist1d.__wrapped__(400, 7)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, data._mnist1d.__wrapped__(400, 8).x_train)


def test_probe_set_is_fixed_by_seed():
    a, b = data.probe_indices(1000, 64, 3), data.probe_indices(1000, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 64 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, data.probe_indices(1000, 64, 4))


def test_batches_are_a_function_of_seed_and_step():
    ds = data.load_dataset({"name": "digits"})
    it = data.batches(ds, 100, seed=5)
    first = [next(it) for _ in range(30)]  # crosses two epoch boundaries (14 per epoch)
    resumed = data.batches(ds, 100, seed=5, start_step=17)
    for step in range(17, 30):
        np.testing.assert_array_equal(next(resumed)["y"], first[step]["y"])
    epoch0 = np.concatenate([data.batch_indices(1438, 100, 5, s) for s in range(14)])
    assert len(np.unique(epoch0)) == 1400  # no example twice within an epoch
    other = next(data.batches(ds, 100, seed=6))
    assert not np.array_equal(other["x"], first[0]["x"])
