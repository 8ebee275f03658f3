"""NCN's confidence level ``p`` chosen from the base model's clean confidences (``--p=auto``).

NCN_p means something only when ``p`` is a confidence the base model actually reaches: a small
robust model whose top-label confidence rarely exceeds 0.5 never meets ``p = 0.9``, and NCN then
answers by its fallback on every point (README, Table 2). ``--p=auto`` takes ``p`` as a stated
quantile (``--p_quantile``, the median by default) of the base's top-label confidence
``max_t F(x)_t`` on held-out points: the test points *after* the evaluated ones in the
evaluation's walk order (never the evaluated points themselves, whose confidences would then
choose the shell that is judged on them). The report records the ``p`` used (the shell's
settings carry it) and how it was chosen.

Units: images float32 pixels 0..255; confidences in (0, 1).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from manifold_tf.validation import check_int, validate_images

# p must lie strictly inside (0, 1); a quantile of saturated confidences is kept this far inside.
P_MARGIN = 1e-6


def top_confidence(base, x, *, batch_size: int = 256) -> np.ndarray:
    """``max_t softmax(Z(x))_t`` per image, float64 ``[N]``.

    Args:
      base: Keras model, images ``[N, H, W, C]`` (pixels 0..255) -> logits ``[N, C]``.
      x: images ``[N, H, W, C]``, pixels 0..255.
      batch_size: images per forward pass. Cost: one forward pass of the base per image.
    """
    x = validate_images(x, image_shape=None).numpy()  # any image size
    batch_size = check_int(batch_size, "batch_size", 1)
    out = [
        tf.reduce_max(
            tf.nn.softmax(tf.cast(base(x[i : i + batch_size], training=False), tf.float32)), axis=-1
        ).numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def confidence_quantile(base, x, quantile: float = 0.5, *, batch_size: int = 256) -> float:
    """The ``quantile`` of the base's top-label confidence on ``x`` (linear interpolation), kept
    inside ``(0, 1)``.

    Args:
      base: Keras model (images -> logits). x: held-out images ``[N, H, W, C]``, pixels 0..255,
        ``N >= 1``. quantile: in [0, 1] (0.5: the median).

    Raises:
      ValueError: ``x`` is empty or ``quantile`` is outside [0, 1].
    """
    quantile = float(quantile)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1]; got {quantile}.")
    return _quantile(top_confidence(base, x, batch_size=batch_size), quantile)


def _quantile(conf: np.ndarray, quantile: float) -> float:
    if conf.size == 0:
        raise ValueError("no held-out images to choose p from (x is empty).")
    return float(np.clip(np.quantile(conf, quantile), P_MARGIN, 1.0 - P_MARGIN))


def held_out_indices(order: np.ndarray, num_points: int, count: int) -> np.ndarray:
    """The ``count`` indices of ``order`` after its first ``num_points`` (the evaluated ones), or
    as many as remain.

    Raises:
      ValueError: no index remains (every point of the order is evaluated): name the fix.
    """
    order = np.asarray(order)
    num_points = check_int(num_points, "num_points", 0)
    count = check_int(count, "count", 1)
    held = order[num_points : num_points + count]
    if held.size == 0:
        raise ValueError(
            f"p=auto needs held-out test points after the {num_points} evaluated "
            f"ones, but the order has only {len(order)}: evaluate fewer points or "
            f"give --p a number."
        )
    return held


def resolve_p(
    base,
    images: np.ndarray,
    order: np.ndarray,
    *,
    num_points: int,
    quantile: float = 0.5,
    count: int = 500,
) -> tuple[float, dict]:
    """NCN's ``p`` for ``--p=auto`` and a record of how it was chosen.

    Args:
      base: Keras model (images -> logits).
      images: the whole test set ``[T, H, W, C]``, pixels 0..255.
      order: the evaluation's walk order (indices into ``images``); its first ``num_points`` are
        evaluated and never used here.
      quantile: the quantile of the top-label confidence (0.5: the median).
      count: held-out points used (at most; fewer when fewer remain).

    Returns:
      ``(p, record)``: ``record`` has ``p``, ``quantile``, ``points`` (how many), ``source``
      (a sentence), and the confidences' ``min``, ``median`` and ``max``. Cost: one forward pass
      of the base per held-out point.
    """
    held = held_out_indices(order, num_points, count)
    quantile = float(quantile)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1]; got {quantile}.")
    conf = top_confidence(base, np.asarray(images)[held].astype(np.float32))
    p = _quantile(conf, quantile)
    record = dict(
        p=p,
        quantile=float(quantile),
        points=int(held.size),
        source=f"test points {num_points + 1}..{num_points + held.size} of the walk "
        f"order (after the {num_points} evaluated ones)",
        min=float(conf.min()),
        median=float(np.median(conf)),
        max=float(conf.max()),
    )
    return p, record
