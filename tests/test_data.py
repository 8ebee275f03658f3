"""Tests of the data layer: CIFAR-10 pickles (full and sample layouts), synthetic set,
augmentation."""

import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

from manifold_tf import data


def _write_batches(root, n_per_batch=4, with_filenames=True):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    expected = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        batch = {b"data": pixels, b"labels": labels, b"batch_label": name.encode()}
        if with_filenames:
            batch[b"filenames"] = [b"f.png"] * n_per_batch
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f)
        expected[name] = (pixels, labels)
    return expected


@pytest.mark.parametrize("with_filenames", [True, False])
def test_pickle_loader_reads_channel_major_rows_as_nhwc(tmp_path, with_filenames):
    root = str(tmp_path / "cifar-10-batches-py")
    expected = _write_batches(root, with_filenames=with_filenames)
    x, y = data.load_cifar10_arrays("test", str(tmp_path))  # the parent folder works too
    pixels, labels = expected["test_batch"]
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.shape == (4, 32, 32, 3)
    # Pixel (row 1, col 2) of channel c sits at c * 1024 + 1 * 32 + 2 in the flat row.
    for c in range(3):
        assert x[0, 1, 2, c] == pixels[0, c * 1024 + 34]
    np.testing.assert_array_equal(y, labels)
    x_train, _ = data.load_cifar10_arrays("train", root)
    assert x_train.shape == (20, 32, 32, 3)


def test_pickle_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        data.load_cifar10_arrays("test", str(tmp_path))
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_cifar10_arrays("validation", str(tmp_path))
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_arrays("mnist", "test")


def test_real_sample_has_documented_sizes(cifar_sample_dir):
    x, y = data.load_cifar10_arrays("train", cifar_sample_dir)
    assert x.shape == (5085, 32, 32, 3) and y.shape == (5085,)
    assert 0 <= x.min() and x.max() <= 255 and set(np.unique(y)) == set(range(10))
    xt, _ = data.load_cifar10_arrays("test", cifar_sample_dir)
    assert xt.shape == (700, 32, 32, 3)


def test_synthetic_points_lie_on_their_class_manifold():
    x, y = data.synthetic_arrays("test", num_examples=200)
    centres, directions = data.synthetic_manifold()
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 255
    # Off the clipping, x - mu_y lies in the span of the class's directions.
    for i in range(20):
        basis = directions[y[i]].reshape(directions.shape[1], -1).T
        r = (x[i] - centres[y[i]]).ravel()
        coeffs, *_ = np.linalg.lstsq(basis, r, rcond=None)
        assert np.abs(basis @ coeffs - r).max() < 1e-2
    # Classes are separated: the nearest centre (L-inf) is always the label.
    dist = np.abs(x[:, None] - centres[None]).reshape(len(x), len(centres), -1).max(-1)
    np.testing.assert_array_equal(dist.argmin(1), y)


def test_synthetic_is_deterministic_and_splits_differ():
    a, ya = data.synthetic_arrays("train", num_examples=10, seed=3)
    b, yb = data.synthetic_arrays("train", num_examples=10, seed=3)
    c, _ = data.synthetic_arrays("test", num_examples=10, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a, c)


def test_augmentation_is_a_padded_shift_and_maybe_a_flip():
    image = tf.random.stateless_uniform((32, 32, 3), seed=[1, 2], maxval=255.0)
    padded = np.pad(image.numpy(), ((2, 2), (2, 2), (0, 0)))
    for s in range(8):
        out = data.augment(image, tf.constant([s, 0], tf.int64)).numpy()
        windows = [padded[i : i + 32, j : j + 32] for i in range(5) for j in range(5)]
        candidates = windows + [w[:, ::-1] for w in windows]
        assert any(np.array_equal(out, w) for w in candidates)


def test_training_pipeline_is_deterministic_under_a_seed():
    x, y = data.synthetic_arrays("train", num_examples=40)
    tf.random.set_seed(1)  # the order must not depend on the global seed
    first = [
        b[0].numpy() for b in data.make_dataset(x, y, batch_size=8, training=True, seed=5).take(6)
    ]
    tf.random.set_seed(2)
    again = [
        b[0].numpy() for b in data.make_dataset(x, y, batch_size=8, training=True, seed=5).take(6)
    ]
    skipped = next(iter(data.make_dataset(x, y, batch_size=8, training=True, seed=5).skip(4)))[0]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(skipped.numpy(), first[4])


def test_default_data_dir_comes_from_the_environment_only(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.default_data_dir() is None
    monkeypatch.setenv(data.DATA_DIR_ENV, "")
    assert data.default_data_dir() is None  # empty counts as unset
    _write_batches(str(tmp_path / "cifar-10-batches-py"))
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.default_data_dir() == str(tmp_path)
    x, _ = data.load_cifar10_arrays("test", data.default_data_dir())
    assert x.shape == (4, 32, 32, 3)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(data.DATA_DIR_ENV, "~/cifar-10-batches-py")
    assert data.default_data_dir() == str(tmp_path / "cifar-10-batches-py")


def test_a_corrupt_or_truncated_batch_file_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    blob = pickle.dumps(good)
    (folder / "test_batch").write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ValueError, match="test_batch: corrupt or truncated"):
        data.load_cifar10_arrays("test", str(tmp_path))
    (folder / "test_batch").write_bytes(b"garbage that is not a pickle")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        data.load_cifar10_arrays("test", str(tmp_path))
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        data.load_cifar10_arrays("test", str(tmp_path))
