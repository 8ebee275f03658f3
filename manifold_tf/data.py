"""CIFAR-10 and a synthetic manifold data set, as float32 pixels in 0..255.

Sources:
- ``load_cifar10_arrays(split, data_dir)``: the standard python-pickle ``cifar-10-batches-py``
  folder (the full archive, or a sample with fewer images per batch and no ``filenames`` key);
  without ``data_dir``, TensorFlow Datasets (needs network the first time).
- ``synthetic_arrays(split)``: generated on the fly, no download (see :func:`synthetic_arrays`).

The library bakes in no data location: :func:`default_data_dir` reads the environment variable
``MANIFOLD_TF_CIFAR10_DIR`` (a ``cifar-10-batches-py`` folder or its parent) for callers that want
a machine-wide default.

``make_dataset`` turns arrays into a ``tf.data`` pipeline, with Madry et al.'s augmentation for
training (zero pad to 36x36, random 32x32 crop, random horizontal flip).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import tensorflow as tf

from manifold_tf import safe_pickle

DATA_DIR_ENV = "MANIFOLD_TF_CIFAR10_DIR"
SPLITS = ("train", "test")
DATASETS = ("cifar10", "synthetic")
CIFAR10_LABELS = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def default_data_dir() -> str | None:
    """The CIFAR-10 folder named by ``$MANIFOLD_TF_CIFAR10_DIR`` (``~`` expanded), else ``None``.

    An empty value counts as unset. The folder is not checked here: :func:`load_cifar10_arrays`
    reports a missing or malformed one.
    """
    value = os.environ.get(DATA_DIR_ENV)
    return os.path.expanduser(value) if value else None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")


def _find_batches_dir(data_dir: str) -> str:
    for candidate in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(candidate, "test_batch")):
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 python batches under {data_dir!r}: expected data_batch_1..5 and test_batch "
        f"there or in {os.path.join(data_dir, 'cifar-10-batches-py')!r} (the 'CIFAR-10 python "
        f"version' archive, unpacked)."
    )


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One python batch file as ``(images uint8 [N, 32, 32, 3], labels int64 [N])``.

    The file is untrusted: it is read with :mod:`manifold_tf.safe_pickle`, which refuses (naming
    the file and the global) anything but the dicts, lists, bytes, str, ints and numpy arrays of
    the format, so a crafted file's code never runs.
    """
    try:
        batch = safe_pickle.load(path, encoding="bytes")
    except safe_pickle.RefusedGlobal:
        raise
    except MemoryError:
        raise ValueError(
            f"{path}: a CIFAR-10 batch file asking for more memory than this machine "
            f"has (corrupt or crafted). Replace it with the original file."
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        OverflowError,
        RecursionError,
        UnicodeDecodeError,
    ) as e:
        raise ValueError(
            f"{path}: corrupt or truncated CIFAR-10 batch file (unpickling failed: "
            f"{type(e).__name__}: {e}). Replace it with the original file."
        ) from None
    if not isinstance(batch, dict):
        raise ValueError(
            f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__}, not a dict)."
        )
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
    except KeyError as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (missing key {e}).") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{path}: CIFAR-10 batch with unreadable data or labels ({e}).") from None
    # Integers only: a cast would wrap 256 to 0 and NaN to 0 without a word.
    for name, values, low, high in (("data", data, 0, 255), ("labels", labels, 0, 9)):
        if values.size and (
            values.dtype.kind not in "iu" or values.min() < low or values.max() > high
        ):
            raise ValueError(
                f"{path}: CIFAR-10 {name} must be integers in {low}..{high}; got "
                f"dtype {values.dtype}"
                + (f", {values.min()}..{values.max()}" if values.dtype.kind in "iufb" else "")
                + "."
            )
    data, labels = data.astype(np.uint8), labels.astype(np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected data [N, 3072] and N labels; got data {data.shape}, "
            f"labels {labels.shape}."
        )
    # Rows are channel-major (1024 red, 1024 green, 1024 blue): to NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def load_cifar10_arrays(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads a CIFAR-10 split as ``(images [N, 32, 32, 3] float32 in 0..255, labels [N] int32)``.

    Args:
      split: ``"train"`` or ``"test"``.
      data_dir: a ``cifar-10-batches-py`` folder (or its parent). ``None`` uses TensorFlow Datasets.
    """
    _check_split(split)
    if data_dir is None:
        return _load_tfds(split)
    if not isinstance(data_dir, (str, os.PathLike)):
        raise ValueError(
            f"data_dir must be a folder path (str) or None; got {data_dir!r} "
            f"({type(data_dir).__name__})."
        )
    root = _find_batches_dir(os.fspath(data_dir))
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = []
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing CIFAR-10 batch file {path!r}.")
        parts.append(_read_batch(path))
    images = np.concatenate([p[0] for p in parts]).astype(np.float32)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int32)
    return images, labels


def _load_tfds(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        # deferred: optional, and slow to import; only needed without a CIFAR-10 folder.
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is in requirements.txt
        raise ImportError(
            "tensorflow-datasets is needed when no data_dir is given: pip install "
            "'manifold-tf[tfds]' (or tensorflow-datasets), or pass data_dir= (--data_dir, "
            f"${DATA_DIR_ENV}) pointing at an unpacked 'cifar-10-batches-py' folder."
        ) from e
    try:
        ds = tfds.load("cifar10", split=split, as_supervised=True, batch_size=-1)
    except Exception as e:  # tfds raises many kinds of errors when offline.
        raise RuntimeError(
            f"could not load CIFAR-10 through TensorFlow Datasets ({type(e).__name__}: {e}). "
            f"Offline? Pass data_dir= (--data_dir) pointing at an unpacked 'cifar-10-batches-py' "
            f"folder, or use the synthetic data set (--dataset=synthetic)."
        ) from e
    images, labels = tfds.as_numpy(ds)
    return images.astype(np.float32), labels.astype(np.int32)


def synthetic_arrays(
    split: str,
    *,
    num_examples: int | None = None,
    num_classes: int = 10,
    manifold_dim: int = 4,
    spread: float = 24.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic data set lying on a known low-dimensional manifold with separable classes.

    Each class ``c`` has a smooth centre image ``mu_c`` (bilinear upsampling of a random 4x4x3
    pattern, values in [40, 215]) and ``manifold_dim`` smooth unit-L-inf directions ``B_c``. An
    example of class ``c`` is ``mu_c + spread * sum_k a_k B_c[k] / manifold_dim`` with
    ``a ~ U[-1, 1]^manifold_dim``, so it lies on the affine ``manifold_dim``-dimensional piece
    ``mu_c + span(B_c)`` at L-inf distance at most ``spread`` from ``mu_c``. Centres are
    redrawn until every pair differs by more than ``4 * spread`` pixels in L-inf, so the classes
    are separated by a margin of more than ``2 * spread`` pixels.

    The centres and directions depend only on ``seed`` (shared by both splits); the examples of a
    split come from a split-specific stream. Sizes default to 2000 (train) and 500 (test).

    Returns:
      ``(images [N, 32, 32, 3] float32 in 0..255, labels [N] int32)``.
    """
    _check_split(split)
    manifold = synthetic_manifold(num_classes=num_classes, manifold_dim=manifold_dim, seed=seed)
    centres, directions = manifold
    n = num_examples if num_examples is not None else (2000 if split == "train" else 500)
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    coords = rng.uniform(-1.0, 1.0, size=(n, manifold_dim)).astype(np.float32)
    offsets = np.einsum("nk,nkhwc->nhwc", coords, directions[labels]) * (spread / manifold_dim)
    images = np.clip(centres[labels] + offsets, 0.0, 255.0).astype(np.float32)
    return images, labels


def synthetic_manifold(
    *, num_classes: int = 10, manifold_dim: int = 4, spread: float = 24.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic set's class centres ``[C, 32, 32, 3]`` and directions ``[C, K, 32, 32, 3]``."""
    rng = np.random.default_rng([seed, 0])

    def smooth(n: int) -> np.ndarray:
        coarse = rng.uniform(-1.0, 1.0, size=(n, 4, 4, 3)).astype(np.float32)
        return tf.image.resize(coarse, (32, 32), method="bilinear").numpy()

    for _ in range(100):
        centres = 127.5 + 87.5 * smooth(num_classes)
        diff = np.abs(centres[:, None] - centres[None])
        diff = diff.reshape(num_classes, num_classes, -1).max(-1)
        np.fill_diagonal(diff, np.inf)
        if diff.min() > 4 * spread:
            break
    else:  # pragma: no cover - practically impossible with 4x4x3 random patterns
        raise RuntimeError("could not draw separated class centres; lower spread or num_classes.")
    directions = smooth(num_classes * manifold_dim).reshape(num_classes, manifold_dim, 32, 32, 3)
    scale = np.abs(directions).reshape(num_classes, manifold_dim, -1).max(-1)
    directions /= scale[..., None, None, None]
    return centres.astype(np.float32), directions.astype(np.float32)


def load_arrays(
    dataset: str, split: str, data_dir: str | None = None, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Dispatches to :func:`load_cifar10_arrays` or :func:`synthetic_arrays` by name."""
    if dataset == "cifar10":
        return load_cifar10_arrays(split, data_dir)
    if dataset == "synthetic":
        return synthetic_arrays(split, **kwargs)
    raise ValueError(f"dataset must be one of {DATASETS}; got {dataset!r}.")


def augment(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Madry's augmentation of one ``[32, 32, 3]`` image: zero pad to 36, random crop and flip."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padded = tf.image.pad_to_bounding_box(image, 2, 2, 36, 36)
    cropped = tf.image.stateless_random_crop(padded, (32, 32, 3), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(cropped, seed=flip_seed)


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    drop_remainder: bool | None = None,
) -> tf.data.Dataset:
    """A ``tf.data`` pipeline of ``(images float32 [B, 32, 32, 3] in 0..255, labels int32 [B])``.

    ``training=True``: a fresh permutation every epoch, augmented, repeated forever, full batches
    only. The order and the augmentation are a function of ``seed`` alone (stateless RNG, not the
    global TF seed), so a resumed run can skip to where it stopped with ``ds.skip(step)``.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if not training:
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        return ds.batch(batch_size, drop_remainder=bool(drop_remainder)).prefetch(tf.data.AUTOTUNE)
    n = len(images)
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    seed64 = tf.constant(seed, tf.int64)

    def epoch_order(epoch):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([seed64, epoch])
        )
        return tf.data.Dataset.from_tensor_slices(perm)

    def example(i, index):
        image = augment(tf.gather(images_t, index), tf.stack([seed64, i]))
        return image, tf.gather(labels_t, index)

    ds = tf.data.Dataset.counter().flat_map(epoch_order).enumerate()
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    drop = True if drop_remainder is None else drop_remainder
    return ds.batch(batch_size, drop_remainder=drop).prefetch(tf.data.AUTOTUNE)


def load_cifar10(
    split: str,
    data_dir: str | None = None,
    *,
    batch_size: int = 128,
    training: bool | None = None,
    seed: int = 0,
) -> tf.data.Dataset:
    """CIFAR-10 as a ``tf.data`` pipeline (see :func:`make_dataset`).

    ``training`` defaults to ``split == "train"`` (augmented, shuffled, repeated).
    """
    images, labels = load_cifar10_arrays(split, data_dir)
    training = split == "train" if training is None else training
    return make_dataset(images, labels, batch_size=batch_size, training=training, seed=seed)
