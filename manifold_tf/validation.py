"""Input checks shared by every entry point (models, attacks, shells, scripts).

Every check raises ``ValueError`` naming what was expected and what was received, so that a user
who passes images in [0, 1], a batch without its batch axis, or a model that ends in a softmax
learns it at once instead of reading a meaningless robustness number.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

PIXEL_MIN = 0.0
PIXEL_MAX = 255.0
IMAGE_SHAPE = (32, 32, 3)


def validate_images(
    x,
    *,
    image_shape: Sequence[int] | None = IMAGE_SHAPE,
    check_range: bool = True,
    name: str = "x",
) -> tf.Tensor:
    """Checks a batch of images and returns it as a float32 tensor.

    Args:
      x: array-like ``[N, H, W, C]``, floating point, pixel scale 0..255.
      image_shape: expected ``(H, W, C)``; ``None`` accepts any rank-4 shape.
      check_range: also check that every value lies in [0, 255] (needs eager values).
      name: how the argument is called in error messages.
    """
    if isinstance(x, (tf.Tensor, tf.Variable)):
        dtype = x.dtype
        shape = tuple(x.shape)
    else:
        x = np.asarray(x)
        dtype = tf.as_dtype(x.dtype) if x.dtype != object else None
        shape = x.shape
    if dtype is None or not dtype.is_floating:
        raise ValueError(
            f"{name} must be a floating-point image batch (float32, pixel scale 0..255); "
            f"got dtype {getattr(x, 'dtype', type(x))}. Convert uint8 images with "
            f"tf.cast(x, tf.float32) (no division by 255)."
        )
    if len(shape) != 4:
        raise ValueError(
            f"{name} must have shape [batch, height, width, channels]; got shape {shape}. "
            f"A single image needs a batch axis: x[None]."
        )
    if image_shape is not None and tuple(shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"{name} must have images of shape {tuple(image_shape)} (NHWC); got {tuple(shape[1:])}."
        )
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    if check_range and tf.executing_eagerly() and tf.size(x) > 0:
        lo = float(tf.reduce_min(x))
        hi = float(tf.reduce_max(x))
        if lo < PIXEL_MIN or hi > PIXEL_MAX or not (np.isfinite(lo) and np.isfinite(hi)):
            hint = " (looks like [0, 1] images: multiply by 255)" if hi <= 1.0 else ""
            raise ValueError(
                f"{name} must have pixel values in [0, 255]; got values in [{lo:g}, {hi:g}]{hint}."
            )
        if PIXEL_MIN < hi <= 1.0 and lo < hi:
            # Legal but almost surely a [0, 1] image: every radius would then be 255x too large.
            warnings.warn(
                f"{name} has all pixel values in [{lo:g}, {hi:g}]: manifold_tf expects pixels in "
                f"0..255 (delta and epsilon are in pixels). Multiply [0, 1] images by 255.",
                UserWarning,
                stacklevel=2,
            )
    return x


def validate_labels(y, *, num_examples: int, num_classes: int, name: str = "y") -> tf.Tensor:
    """Checks integer labels ``[N]`` in ``0..num_classes-1`` and returns them as int32."""
    y_np = np.asarray(y)
    if y_np.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class labels; got dtype {y_np.dtype}.")
    if y_np.shape != (num_examples,):
        raise ValueError(
            f"{name} must have shape [{num_examples}] (one label per image); got {y_np.shape}."
        )
    if y_np.size and (y_np.min() < 0 or y_np.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in 0..{num_classes - 1}; got values in [{y_np.min()}, {y_np.max()}]."
        )
    return tf.convert_to_tensor(y_np, dtype=tf.int32)


def check_real(value, name: str) -> float:
    """``value`` as a float if it is a real number (a 0-d array or tensor counts), else ValueError.

    ``float()`` alone would take ``"8"`` and ``True`` as budgets and fail on ``None`` with a
    TypeError that does not say which argument was wrong.
    """
    if isinstance(value, (tf.Tensor, tf.Variable)) and value.shape.rank == 0:
        value = value.numpy()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be a real number; got {value!r} ({type(value).__name__})."[:300]
        )
    return float(value)


def validate_radius(value: float, name: str) -> float:
    """Checks a perturbation budget in pixel units (>= 0, finite)."""
    value = check_real(value, name)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (pixel units, 0..255); got {value}.")
    if value > PIXEL_MAX:
        raise ValueError(
            f"{name}={value} exceeds the pixel range 255: budgets are in pixel units (8 means "
            f"8/255)."
        )
    return value


def check_int(value, name: str, minimum: int = 0) -> int:
    """Checks an integer setting (steps, rounds, restarts ...) ``>= minimum``; returns it as an int.

    A whole float (``5.0``, as a flag parser may give) is accepted; bools, fractions, NaN and
    infinities are refused.
    """
    whole = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer()
    )
    if isinstance(value, bool) or not whole or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def check_positive(value, name: str) -> float:
    """Checks a finite setting ``> 0`` (a learning rate, a constant, a factor)."""
    value = check_real(value, name)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value}.")
    return value


def check_choice(value, name: str, choices: Sequence) -> str:
    """Checks that ``value`` is one of ``choices`` (an optimiser, a loss, a variant ...)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}.")
    return value


def check_logits(model, x: tf.Tensor) -> tf.Tensor:
    """Runs ``model`` on ``x`` and checks that it returns logits ``[N, num_classes]``.

    A model whose outputs are all in [0, 1] and sum to 1 per row is taken to end in a softmax:
    attacks and shells need logits (their losses apply their own softmax), so this raises.
    Returns the model's outputs.
    """
    out = model(x, training=False)
    if len(out.shape) != 2:
        raise ValueError(
            f"the model must return logits of shape [batch, num_classes]; got shape "
            f"{tuple(out.shape)}."
        )
    if out.shape[-1] is not None and out.shape[-1] < 2:
        raise ValueError(f"the model must return at least 2 logits; got {out.shape[-1]}.")
    if tf.executing_eagerly() and out.shape[0]:
        o = out.numpy()
        if o.min() >= 0.0 and o.max() <= 1.0 and np.allclose(o.sum(axis=-1), 1.0, atol=1e-3):
            raise ValueError(
                "the model appears to return probabilities (every row is in [0, 1] and sums to 1), "
                "but logits are expected: remove the final softmax (e.g. build the model with "
                "activation=None in its last layer)."
            )
    return out
