"""What every attack on a base model shares: input checks, margins, goals, seeds.

Units: pixels (0..255) for images and budgets.
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

from manifold_tf import projected
from manifold_tf.validation import check_logits, validate_images, validate_labels, validate_radius

# XLA measured on the narrow ResNet, 2 CPU cores: see bench/bench_attacks.py and the module notes.
DEFAULT_JIT_COMPILE = False
_CHECK_ROWS = 8
# model -> number of classes, once check_logits has accepted its outputs.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checkpoint_stops(steps: int, early_exit: bool) -> list[int]:
    """Where a ``steps``-iteration run pauses to let its broken points go, ending at ``steps``.

    APGD's checkpoints (:func:`projected.apgd_checkpoints`: 22%, 41%, 57%, ... of the run), so a
    point broken early pays about a fifth of the run; ``early_exit=False``: no pause.
    """
    if not early_exit:
        return [steps] if steps else []
    return [w for w in projected.apgd_checkpoints(steps) if 0 < w < steps] + [steps]


def input_image_shape(model) -> tuple[int, ...] | None:
    """The ``(H, W, C)`` a model declares for its input, or ``None`` when it declares none.

    Checking it here names ``x`` in the error; the model itself would refuse a wrong shape from
    inside the compiled attack, with a traceback through its layers.
    """
    try:
        inputs = getattr(model, "inputs", None)
    except (AttributeError, ValueError):  # a subclassed model not yet called has no inputs
        return None
    if not inputs:
        return None
    shape = tuple(inputs[0].shape[1:])
    return shape if shape and all(d is not None for d in shape) else None


def prepare(model, x, y, budget: float, budget_name: str):
    """Validates inputs; returns ``(x float32 [N, ...], y int32 [N], num_classes, budget)``."""
    if not callable(model):
        raise ValueError(
            f"model must be a Keras model (images -> logits); got {type(model).__name__}."
        )
    budget = validate_radius(budget, budget_name)
    x = validate_images(x, image_shape=input_image_shape(model))
    num_classes = _CHECKED.get(model)
    if num_classes is None and not x.shape[0]:
        # An empty batch: nothing to check the outputs on (a conv net refuses a batch of 0 rows).
        shape = getattr(model, "output_shape", None)
        num_classes = int(shape[-1]) if shape and shape[-1] else 1
    if num_classes is None:
        # Logits vs probabilities is a property of the model: check it once, on a few rows (an
        # eager forward pass costs about as much as a few attack steps).
        num_classes = int(check_logits(model, x[:_CHECK_ROWS]).shape[-1])
        if x.shape[0]:
            _CHECKED[model] = num_classes
    y = validate_labels(y, num_examples=int(x.shape[0]), num_classes=num_classes)
    return x, y, num_classes, budget


def margin(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """``Z_label - max_{j != label} Z_j`` per example, ``[N]``."""
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    own = tf.reduce_sum(onehot * logits, axis=-1)
    other = tf.reduce_max(logits - onehot * 1e9, axis=-1)
    return own - other


def goal(logits: tf.Tensor, labels: tf.Tensor, targeted: bool) -> tf.Tensor:
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.equal(pred, labels) if targeted else tf.not_equal(pred, labels)


def predicted_wrong(model, x_adv, y) -> np.ndarray:
    """``[N]`` bool: ``model``'s label at ``x_adv`` differs from ``y`` (a fresh forward pass)."""
    x_adv = np.asarray(x_adv, np.float32)
    if not len(x_adv):
        return np.zeros(0, bool)
    return np.argmax(np.asarray(model(x_adv, training=False)), -1) != np.asarray(y)


def bcast(mask: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """A per-example ``[N]`` mask reshaped to broadcast against ``x`` ``[N, ...]``."""
    return tf.reshape(mask, [-1] + [1] * (len(x.shape) - 1))


def check_progress(progress):
    if progress is None or callable(progress):
        return progress
    raise ValueError(
        f"progress must be a callable (done_steps, total_steps, points_standing) or "
        f"None; got {type(progress).__name__}."
    )
