"""Helpers shared by the tests: tiny models with known answers, ball/box checks, numpy logits and
softmax, and the config / ``.keras`` round trips every custom Keras object should pass (in the
spirit of KerasHub's ``run_serialization_test`` and ``run_model_saving_test``).

Units: images are float32 NHWC pixels in 0..255; radii, budgets and tolerances are pixels.
"""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np

PIXEL_TOL = 1e-3  # pixels: float32 rounding of x +- epsilon near 255


# ------------------------------------------------------------------------------------------------
# Images and tiny models


def uniform_images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """``[n, *shape]`` float32 pixels, uniform on [0, 255], from ``np.random.default_rng(seed)``."""
    return np.random.default_rng(seed).uniform(0.0, 255.0, size=(n, *shape)).astype(np.float32)


def linear_model(
    shape: tuple[int, ...], kernel: np.ndarray, bias: np.ndarray | None = None
) -> keras.Model:
    """Logits ``flatten(x) @ kernel + bias``: images ``[N, *shape]`` -> ``[N, K]``.

    ``kernel`` is ``[prod(shape), K]``, ``bias`` ``[K]`` (zeros when ``None``); both are cast to
    float32.
    """
    kernel = np.asarray(kernel)
    bias = np.zeros(kernel.shape[1]) if bias is None else np.asarray(bias)
    model = keras.Sequential(
        [keras.Input(shape), keras.layers.Flatten(), keras.layers.Dense(kernel.shape[1])]
    )
    model.layers[-1].set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return model


def nearest_centre_weights(
    centres: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 ``kernel [D, C]`` and ``bias [C]`` of logits ``-||x - mu_c||^2 / T``.

    Up to the class-independent term ``-||x||^2 / T``, which leaves the softmax unchanged:
    ``kernel = 2 mu / T``, ``bias = -||mu_c||^2 / T``; ``centres`` ``[C, H, W, 3]`` in pixels.
    """
    flat = centres.reshape(len(centres), -1).astype(np.float64)
    return 2.0 * flat.T / temperature, -(flat**2).sum(1) / temperature


def nearest_centre_model(centres: np.ndarray, temperature: float) -> keras.Model:
    """The linear nearest-centre classifier of :func:`nearest_centre_weights` (images like
    ``centres[0]``).

    With ``manifold_tf.data.synthetic_manifold`` centres its per-label log-odds are concave in
    ``x``: shell optima and robustness radii have closed forms.
    """
    return linear_model(centres.shape[1:], *nearest_centre_weights(centres, temperature))


def small_conv(
    seed: int = 0,
    classes: int = 3,
    *,
    shape: tuple[int, ...] = (8, 8, 3),
    scale: float = 1.0 / 32.0,
    offset: float = -4.0,
    filters: int = 4,
    pooling: str = "flatten",
) -> keras.Model:
    """A small random net: images ``[N, *shape]`` (pixels) -> logits ``[N, classes]``.

    ``Rescaling(scale, offset)``, then ``Conv2D(filters, 3)`` + ReLU (left out when ``filters=0``:
    a random linear model of the rescaled pixels), then ``Flatten`` (``pooling="flatten"``: the
    prediction varies over the box) or ``GlobalAveragePooling2D`` (``"average"``), then ``Dense``.
    The weights are drawn after ``keras.utils.set_random_seed(seed)``.
    """
    if pooling not in ("flatten", "average"):
        raise ValueError(f"pooling must be 'flatten' or 'average'; got {pooling!r}.")
    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape)
    h = keras.layers.Rescaling(scale, offset=offset)(inp)
    if filters:
        h = keras.layers.Conv2D(filters, 3, activation="relu")(h)
    h = (
        keras.layers.Flatten()(h)
        if pooling == "flatten"
        else keras.layers.GlobalAveragePooling2D()(h)
    )
    return keras.Model(inp, keras.layers.Dense(classes)(h))


def resnet_stand_in(width: str = "narrow", num_classes: int = 10, name: str | None = None):
    """A small stand-in for :func:`manifold_tf.models.madry_resnet` (same signature): images
    ``[N, 32, 32, 3]`` (pixels) -> logits ``[N, num_classes]`` through a strided convolution,
    batch normalisation (moving statistics, as the ResNet has), ReLU, average pooling and a dense
    layer. Tests of the trainer's bookkeeping (resume, weight averaging, strategies, early
    stopping) patch it in: their properties are the trainer's, and tracing the ResNet's 31
    convolutions dominates their time. Weights come from the global seed (not reset here)."""
    inp = keras.Input((32, 32, 3))
    h = keras.layers.Rescaling(1.0 / 255.0)(inp)
    h = keras.layers.Conv2D(4, 3, strides=2)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(num_classes)(h), name=name)


def stand_in_train_command(args: list[str]) -> list[str]:
    """``python train.py *args`` with :func:`resnet_stand_in` patched in for the ResNet: the same
    command line (``manifold_tf.cli.train.run``) as a ``[sys.executable, "-c", code, *args]``
    command, for the tests whose property is the training loop's (resume, kill, workers)."""
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); "
        f"sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); "
        "from helpers import resnet_stand_in; from manifold_tf import models; "
        "models.madry_resnet = resnet_stand_in; "
        "from manifold_tf.cli import train; train.run()"
    )
    return [sys.executable, "-c", code, *args]


class LabelInPixel(keras.Model):
    """Predicts the label stored in pixel ``(0, 0, 0)``: logits
    ``10 * one_hot(x[:, 0, 0, 0], 3)``."""

    def call(self, x, training=False):
        return keras.ops.one_hot(keras.ops.cast(x[:, 0, 0, 0], "int32"), 3) * 10.0


def binary_linear_problem(
    ratio, eps: float = 6.0, delta: float = 2.0, seed: int = 0, shape: tuple[int, ...] = (8, 8, 3)
):
    """A binary linear base and ``len(ratio)`` points whose margin is ``ratio * eps * |a|_1``.

    Logits ``W.x + b``, ``a = w0 - w1``, ``m(x) = Z0 - Z1 = a.x + b0 - b1`` (= ``lo_0 = -lo_1``).
    Away from the box (checked: every point is more than ``eps + delta`` pixels from it),
    MCN_delta scores label 0 by ``m(x') + delta |a|_1`` and label 1 by ``-m(x') + delta |a|_1``:
    its label is the base's, ``sign(m(x'))``. NCN_p likewise: label ``t`` meets ``p`` at distance
    ``max(0, logit p -+ m(x')) / |a|_1``, the nearer one is the base's label. So either shell can
    be fooled in ``N(x, eps)`` exactly when ``|m(x)| < eps |a|_1``, at the corner
    ``x - eps sign(a)`` (``y = 0``) or ``x + eps sign(a)`` (``y = 1``).

    Returns:
      ``(base, x, y, info)``: the Keras base, images ``[n, *shape]`` float32, the base's labels
      ``[n]`` int32, and ``info`` with ``eps``, ``delta``, ``l1 = |a|_1``, ``ratio`` and the
      optimal ``corner`` ``[n, *shape]``.
    """
    ratio = np.asarray(ratio, np.float64)
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    w = rng.normal(0.0, 0.01, d)
    a = rng.choice([-1.0, 1.0], d) * rng.uniform(2e-3, 6e-3, d)
    kernel = np.stack([w, w - a], 1).astype(np.float32)
    a = kernel[:, 0].astype(np.float64) - kernel[:, 1]  # the difference the float32 model uses
    l1 = np.abs(a).sum()
    raw = rng.uniform(100.0, 155.0, (len(ratio), d))
    bias = np.array([-(raw @ a).mean(), 0.0])
    # Move each point along sign(a) until its margin is the target (a few pixels at most).
    x = raw + ((ratio * eps * l1 - raw @ a - bias[0]) / l1)[:, None] * np.sign(a)
    x = x.reshape((-1,) + tuple(shape)).astype(np.float32)
    assert x.min() > eps + delta and x.max() < 255.0 - eps - delta  # the box never binds
    m = x.reshape(len(x), -1).astype(np.float64) @ a + bias[0]
    np.testing.assert_allclose(m / (eps * l1), ratio, atol=1e-3)
    y = (m < 0).astype(np.int32)  # the base's (and the shells') label
    direction = np.where(y == 0, -1.0, 1.0)[:, None] * np.sign(a)
    corner = x + eps * direction.reshape((-1,) + tuple(shape))
    info = dict(eps=eps, delta=delta, l1=l1, ratio=ratio, corner=corner)
    return linear_model(shape, kernel, bias), x, y, info


# ------------------------------------------------------------------------------------------------
# Numpy references


def np_logits(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Float64 logits ``flatten(x) @ kernel + bias`` of a linear model: ``[N, ...]`` ->
    ``[N, K]``."""
    return x.reshape(len(x), -1).astype(np.float64) @ kernel + bias


def np_softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the maximum (no overflow)."""
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Assertions


def assert_in_ball_and_box(x_adv, x, eps: float, tol: float = PIXEL_TOL, dtype=np.float32) -> None:
    """``x_adv`` has the shape of ``x`` (and ``dtype``, unless ``None``), lies in the L-inf ball
    ``N(x, eps + tol)`` and in the pixel box [0, 255]."""
    x_adv, x = np.asarray(x_adv), np.asarray(x)
    assert x_adv.shape == x.shape, (x_adv.shape, x.shape)
    if dtype is not None:
        assert x_adv.dtype == dtype, x_adv.dtype
    assert np.abs(x_adv - x).max() <= eps + tol, (np.abs(x_adv - x).max(), eps)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 255.0, (x_adv.min(), x_adv.max())


# A point's floats computed in batches of different sizes agree to this (relative, absolute) in
# pixel or probability units, not bit for bit: oneDNN's convolutions block the batch dimension by
# its size on some CPUs (seen on AMD EPYC), so sums round differently in the last bits. A different
# random draw moves a point by whole steps (pixels), far outside these tolerances.
BATCH_RTOL, BATCH_ATOL = 1e-5, 1e-3


def assert_same_across_batches(a, b, err_msg: str = "") -> None:
    """``a`` and ``b`` (one point's outputs from two batchings) are the same: integer and boolean
    arrays exactly, floats within :data:`BATCH_RTOL` / :data:`BATCH_ATOL`."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if np.issubdtype(a.dtype, np.floating):
        np.testing.assert_allclose(a, b, rtol=BATCH_RTOL, atol=BATCH_ATOL, err_msg=err_msg)
    else:
        np.testing.assert_array_equal(a, b, err_msg=err_msg)


def as_json(config):
    """``config`` through JSON: tuples become lists, as after saving, so configs compare equal."""
    return json.loads(json.dumps(config))


def assert_config_round_trip(obj, strict: bool = False):
    """``get_config`` -> JSON -> ``from_config``, and ``serialize_keras_object`` -> JSON ->
    ``deserialize_keras_object`` (the registered name), both give the same class and config.

    Configs are compared after a JSON round trip (tuples == lists) unless ``strict``. Returns the
    deserialised clone (new weights: copy them over to compare outputs).
    """
    config = obj.get_config()
    same = (lambda a, b: a == b) if strict else (lambda a, b: as_json(a) == as_json(b))
    revived = type(obj).from_config(as_json(config))
    assert type(revived) is type(obj), type(revived)
    assert same(revived.get_config(), config)
    clone = keras.saving.deserialize_keras_object(as_json(keras.saving.serialize_keras_object(obj)))
    assert type(clone) is type(obj), type(clone)
    assert same(clone.get_config(), config)
    return clone


def assert_saving_round_trip(model, x, tmp_path, atol: float = 1e-6):
    """Saves ``model`` as ``tmp_path/model.keras`` and reloads it with ``keras.saving.load_model``:
    same class, same config, outputs on ``x`` equal within ``atol`` (``atol=0``: identical).

    Returns the loaded model.
    """
    expected = np.asarray(model(x))
    path = os.path.join(str(tmp_path), "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model), type(loaded)
    assert as_json(loaded.get_config()) == as_json(model.get_config())
    got = np.asarray(loaded(x))
    if atol == 0:
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, atol=atol)
    return loaded


# ------------------------------------------------------------------------------------------------
# Subprocess runs of the command line


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("seconds", "seconds_per_attack", "git_commit")


def subprocess_env(**extra) -> dict:
    """The environment of a CLI subprocess: quiet TensorFlow, the checkout importable."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT, **extra)


def without_timings(obj):
    """A report without its timings (and commit), for comparing two runs of the same job."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------
# Attack results


def assert_results_equal(a, b) -> None:
    """Two :class:`~manifold_tf.attacks.AttackResult` are identical: every field, every detail."""
    for name in ("x_adv", "success", "base_passes", "shell_predictions", "score"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert set(a.details) == set(b.details), (set(a.details), set(b.details))
    for key in a.details:
        np.testing.assert_array_equal(a.details[key], b.details[key], err_msg=key)
