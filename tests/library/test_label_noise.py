"""``dataset.label_noise``: a seeded fraction of the training labels changed, nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from regime_jax import data

MNIST1D = {"name": "mnist1d", "num_samples": 1000, "seed": 42}


def test_exactly_the_fraction_changes_and_validation_is_untouched():
    clean = data.load_dataset(MNIST1D)
    noisy = data.load_dataset(MNIST1D | {"label_noise": 0.2})
    changed = noisy.y_train != clean.y_train
    assert changed.sum() == round(0.2 * len(clean.y_train)) == 160
    assert noisy.y_train.dtype == clean.y_train.dtype and noisy.y_train.shape == (800,)
    assert ((noisy.y_train >= 0) & (noisy.y_train < 10)).all()
    assert noisy.y_val is clean.y_val and noisy.x_val is clean.x_val
    assert noisy.x_train is clean.x_train
    # the loader's cached arrays are not changed in place
    np.testing.assert_array_equal(data.load_dataset(MNIST1D).y_train, clean.y_train)


def test_label_noise_is_seeded_by_dataset_seed():
    ds = data.load_dataset({"name": "digits", "seed": 0})
    a, b = data.with_label_noise(ds, 0.3, 1), data.with_label_noise(ds, 0.3, 1)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    other = data.with_label_noise(ds, 0.3, 2)
    assert (other.y_train != a.y_train).any()
    assert (other.y_train != ds.y_train).sum() == (a.y_train != ds.y_train).sum()


def test_zero_noise_gives_the_loaders_arrays():
    clean = data.load_dataset(MNIST1D)
    zero = data.load_dataset(MNIST1D | {"label_noise": 0.0})
    assert zero is clean  # the cached Dataset itself: byte for byte the same arrays
    assert data.with_label_noise(clean, 0.0, 5) is clean


def test_label_noise_needs_a_class_label_per_example():
    ds = data.char_sequences("toy", "abcabcabcabc", "abcabc", 3)
    with pytest.raises(ValueError, match="no class label per training example"):
        data.with_label_noise(ds, 0.1, 0)
    with pytest.raises(ValueError, match=r"must be a number in \[0, 1\)"):
        data.with_label_noise(data.load_dataset(MNIST1D), 1.0, 0)
