"""The Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), L-inf, score-based.

A black-box random search that only reads the model's scores: no gradients, so a defence that
merely masks its gradients (a shell's argmax over a ball, saturated probabilities) gives it no
trouble. In an adaptive evaluation (METHOD.md) it is the sanity check of the gradient attacks: if
Square beats PGD/BPDA on a model, the gradient attacks were fooled by that model, not the other way.

Algorithm (the paper's Algorithm 1 with the L-inf proposal of Section 3.1, as in the reference code
``square_attack_linf`` of ``max-andr/square-attack``):

1. Start at vertical stripes, ``x + eps * s``, one random sign ``s`` per column and channel.
2. Each iteration, for each image still standing: a random ``s x s`` window, ``s =
   round(sqrt(p * H * W))`` (at least 1), is set to ``x + eps * sign_c`` with one random sign per
   channel ``c``; a proposal that would not change the current image is redrawn. The proposal is
   kept when it lowers the margin loss ``L = log p_y - max_{j != y} log p_j`` (for logits the same
   as ``Z_y - max_{j != y} Z_j``); an image is done once ``L < 0``.
3. ``p`` follows the paper's schedule: ``p_init`` halved after iterations 10, 50, 200, 500, 1000,
   2000, 4000, 6000 and 8000 of a 10,000-query run, the iteration index rescaled to the budget
   (:func:`p_schedule`).

Choices beyond the reference, each cheap: the first query is the clean image (a point the model
already gets wrong is returned as ``x`` after one query; the reference skips such points before it
starts); the remaining ``queries - 1`` queries are the reference's run with ``n_iters = queries -
1``. Windows are placed uniformly over all ``(H - s + 1)^2`` positions and may cover the whole
image (the reference draws ``randint(0, h - s)`` and caps ``s`` at ``h - 1``, never touching the
last row and column). Candidate coordinates are ``clip(x +- eps, 0, 255)``, so every iterate lies in
``N(x, eps)``.

Cost: one model call per iteration on the images still standing (the call dominates; the search
itself is vectorised numpy), plus one call on every image at the end to verify the result.
Units: pixels (0..255) for images and ``epsilon``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from manifold_tf import compiled, seeds
from manifold_tf.attacks.common import input_image_shape
from manifold_tf.attacks.result import AttackResult
from manifold_tf.shells.base import FactorShell
from manifold_tf.validation import (
    PIXEL_MAX,
    PIXEL_MIN,
    check_choice,
    check_int,
    check_positive,
    validate_images,
    validate_labels,
    validate_radius,
)

__all__ = ["OUTPUTS", "SquareSettings", "p_schedule", "square"]

OUTPUTS = ("logits", "probabilities")
# The paper's schedule on a 10,000-query run: p_init / 2**k after the k-th of these iterations.
_P_STEPS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# A proposal equal to the current image is redrawn; for eps > 0 each redraw fails with probability
# 2**-channels, unless eps is below float32 resolution at every pixel of the window: then give up.
_MAX_REDRAWS = 64


@dataclass(frozen=True)
class SquareSettings:
    """Square's knobs, validated on construction.

    Attributes:
      queries: model evaluations per image, at most (the clean image, the stripes, then
        ``queries - 2`` random-search iterations); the final verification call is not counted.
      p_init: initial fraction of pixels per window, in (0, 1]. 0.8 is AutoAttack's choice for
        small budgets; the reference script's default 0.05 was tuned for 10,000 ImageNet queries.
      output: ``"logits"`` or ``"probabilities"``, what the model returns (checked on ``x``).
      batch_size: at most this many images per model call (``None``: all still standing at once).
    """

    queries: int = 1000
    p_init: float = 0.8
    output: str = "logits"
    batch_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "queries", check_int(self.queries, "queries", 1))
        p_init = check_positive(self.p_init, "p_init")
        if not 0.0 < p_init <= 1.0:
            raise ValueError(f"p_init must lie in (0, 1]; got {p_init}.")
        object.__setattr__(self, "p_init", p_init)
        check_choice(self.output, "output", OUTPUTS)
        if self.batch_size is not None:
            object.__setattr__(self, "batch_size", check_int(self.batch_size, "batch_size", 1))


DEFAULT_SQUARE = SquareSettings()


def p_schedule(p_init: float, iteration: int, n_iters: int) -> float:
    """The fraction of pixels changed at ``iteration`` (0-based) of an ``n_iters``-query run.

    The reference's ``p_selection``: ``it = int(iteration / n_iters * 10000)``, then ``p_init``
    halved once for every step of ``(10, 50, 200, ..., 8000)`` that ``it`` has passed.
    """
    it = int(iteration / n_iters * 10000)
    if it > 10000:  # the reference returns p_init past the end of the run
        return float(p_init)
    return float(p_init) / 2 ** sum(it > k for k in _P_STEPS)


def _scorer(
    model, output: str, image_shape: tuple, batch_size: int | None, slots: np.ndarray | None
) -> Callable:
    """``(x, idx)`` -> scores float64 ``[M, K]`` of images ``x`` numpy ``[M, H, W, C]`` of the
    points ``idx`` ``[M]``, in chunks of ``batch_size``."""
    if slots is not None:  # a proxy searching these labels of each point only
        chunk = batch_size or max(len(slots), 1)

        def by_slots(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
            parts = [
                np.asarray(
                    model.embed_labels(x[i : i + chunk], slots[idx[i : i + chunk]])[
                        "probabilities"
                    ],
                    np.float64,
                )
                for i in range(0, len(x), chunk)
            ]
            return np.concatenate(parts) if parts else np.zeros((0, 0))

        return by_slots
    if isinstance(model, keras.Model) and not isinstance(model, FactorShell):
        # A base model: one compiled forward pass, traced once for every batch size. (A shell
        # compiles its own search and is called as it is.)
        spec = tf.TensorSpec((None,) + tuple(image_shape), tf.float32)
        fn = compiled.cached(
            model,
            ("square", tuple(image_shape)),
            lambda net: lambda z: net(z, training=False),
            input_signature=[spec],
        )
    elif isinstance(model, keras.layers.Layer):
        fn = lambda z: model(z, training=False)  # noqa: E731
    else:
        fn = model

    def score(x: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        del idx  # every point's scores come from the same model
        step = batch_size or max(len(x), 1)
        parts = [
            np.asarray(fn(tf.convert_to_tensor(x[i : i + step])), np.float64)
            for i in range(0, len(x), step)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 0))

    return score


def _check_scores(scores: np.ndarray, n: int, output: str) -> None:
    if scores.ndim != 2 or scores.shape[0] != n or scores.shape[1] < 2:
        raise ValueError(
            f"the model must return scores of shape [{n}, num_classes >= 2]; "
            f"got shape {scores.shape}."
        )
    if not np.isfinite(scores).all():
        raise ValueError("the model returned non-finite scores (nan or inf).")
    simplex = (
        scores.min() >= 0.0
        and scores.max() <= 1.0
        and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    )
    if output == "logits" and simplex:
        raise ValueError(
            "output='logits' but the model returns probabilities (every row is in "
            "[0, 1] and sums to 1): pass output='probabilities' (e.g. for a shell)."
        )
    if output == "probabilities" and not simplex:
        raise ValueError(
            f"output='probabilities' but the model's rows are not probability vectors "
            f"(values in [{scores.min():g}, {scores.max():g}]): pass output='logits'."
        )


def _margin(scores: np.ndarray, y: np.ndarray, output: str) -> np.ndarray:
    """``log p_y - max_{j != y} log p_j`` per row (for logits the softmax normaliser cancels)."""
    log = scores.copy() if output == "logits" else np.log(np.maximum(scores, 1e-45))
    rows = np.arange(len(y))
    own = log[rows, y]
    log[rows, y] = -np.inf
    return own - log.max(axis=1)


def square(
    model,
    x,
    y,
    *,
    epsilon: float,
    settings: SquareSettings = DEFAULT_SQUARE,
    seed: int = 0,
    slots: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AttackResult:
    """Untargeted L-inf Square attack on any score function (see the module docstring).

    Args:
      model: images ``[M, H, W, C]`` (pixels) -> scores ``[M, K]``: a Keras base model returning
        logits, a shell (:class:`~manifold_tf.shells.MCNShell`,
        :class:`~manifold_tf.shells.NCNShell`) returning probabilities, or any callable. Keras
        models are called with ``training=False``.
      x: clean images ``[N, H, W, C]``, float, pixels 0..255.
      y: true labels ``[N]`` (int).
      epsilon: L-inf budget in pixels (8 means 8/255).
      settings: :class:`SquareSettings` (``queries``, ``p_init``, ``output``, ``batch_size``;
        default: 1000 queries on logits, ``p_init = 0.8``, one call for all images standing).
      seed: an int, or an int array ``[N]`` of per-point seeds: every draw for a point (its
        stripes, windows and signs) is keyed by its seed, the iteration and the redraw
        (:mod:`manifold_tf.seeds`), so with per-point seeds a point's search does not depend on
        the other points of the batch. Same seed, model and inputs give the same output.
      slots: for a proxy copy of a shell that searches some labels only
        (:meth:`~manifold_tf.shells.FactorShell.proxy` with ``labels``): the labels it searches
        per point, int ``[N, S]`` (:func:`~manifold_tf.attacks.surrogate.proxy_slots`); each
        query calls its ``embed_labels`` on those.
      progress: optional ``progress(queries_spent, images_standing)``, called after every query
        round; nothing is printed.

    Returns:
      :class:`AttackResult`: ``x_adv`` float32 ``[N, H, W, C]`` (in ``N(x, epsilon)``: the first
      point found with ``L < 0``, else the best point visited), ``success`` (the model's argmax at
      ``x_adv`` is not ``y``, from a final call on ``x_adv``), ``details["queries"]`` int32
      (queries spent per image, ``1..queries``: ``shell_predictions`` when ``model`` is a shell;
      a base model's forward passes are not counted as forward+backward ``base_passes``) and
      ``details["margin"]`` float32 (``L`` at ``x_adv`` from that final call; ``< 0`` implies
      success; ``score`` is ``-L``).
    """
    if not callable(model):
        raise ValueError(f"model must be callable (images -> scores); got {type(model).__name__}.")
    epsilon = validate_radius(epsilon, "epsilon")
    queries, output = settings.queries, settings.output
    # A shell declares its image shape; a base model its input layer's (None: any callable).
    shape = getattr(model, "image_shape", None) or input_image_shape(model)
    x = validate_images(x, image_shape=shape).numpy()
    n, h, w, c = x.shape
    point_seed = seeds.per_point(seed, n)  # a bad seed is refused on an empty batch too
    slots = _check_slots(model, slots, n)
    if n == 0:
        validate_labels(y, num_examples=0, num_classes=1)
        return AttackResult.unattacked(
            x, queries=np.zeros(0, np.int32), margin=np.zeros(0, np.float32)
        )
    score = _scorer(model, output, (h, w, c), settings.batch_size, slots)
    every = np.arange(n)
    eps = np.float32(epsilon)

    # Query 1: the clean images (also tells the number of classes and checks the output kind).
    scores = score(x, every)
    _check_scores(scores, n, output)
    y = validate_labels(y, num_examples=n, num_classes=scores.shape[1]).numpy()
    best = x.copy()
    loss = _margin(scores, y, output)
    spent = np.ones(n, np.int32)

    def query(idx: np.ndarray, cand: np.ndarray) -> None:
        """Evaluates ``cand`` for images ``idx``; keeps each candidate that lowers the loss."""
        new = _margin(score(cand, idx), y[idx], output)
        better = new < loss[idx]
        best[idx[better]] = cand[better]
        loss[idx[better]] = new[better]
        spent[idx] += 1
        if progress is not None:
            progress(int(spent.max()), int((loss >= 0).sum()))

    # Query 2: vertical stripes, accepted unconditionally as in the reference.
    idx = np.flatnonzero(loss >= 0)
    if epsilon > 0 and queries >= 2 and len(idx):
        bits = seeds.integers_rows(seeds.fold(point_seed[idx], "square stripes"), 2, (1, w, c))
        stripes = eps * (2 * bits - 1).astype(np.float32)
        best[idx] = np.clip(x[idx] + stripes, PIXEL_MIN, PIXEL_MAX)
        loss[idx] = np.inf
        query(idx, best[idx])

    for it in range(queries - 2 if epsilon > 0 else 0):
        idx = np.flatnonzero(loss >= 0)
        if not len(idx):
            break
        p = p_schedule(settings.p_init, it, queries - 1)
        query(idx, _proposal(x[idx], best[idx], point_seed[idx], it, p, eps))

    # Verification: the model's own answer at x_adv, on every image.
    final = score(best, every)
    margin = _margin(final, y, output).astype(np.float32)
    return AttackResult(
        best,
        final.argmax(axis=1) != y,
        score=-margin,
        shell_predictions=spent if isinstance(model, FactorShell) else 0,
        details=dict(queries=spent, margin=margin),
    )


def _check_slots(model, slots, n: int) -> np.ndarray | None:
    """``slots`` as int32 ``[N, S]`` (``None`` kept): only for a shell's label-restricted copy."""
    if slots is None:
        return None
    slots = np.asarray(slots)
    if not isinstance(model, FactorShell) or slots.ndim != 2 or len(slots) != n:
        raise ValueError(
            f"slots must be int labels [N={n}, S] for a shell that searches labels one by "
            f"one (FactorShell.embed_labels: a proxy searching some labels); got shape "
            f"{slots.shape} for {type(model).__name__}."
        )
    return slots.astype(np.int32)


def _proposal(
    xi: np.ndarray, bi: np.ndarray, point_seed: np.ndarray, it: int, p: float, eps: np.float32
) -> np.ndarray:
    """Iteration ``it``'s candidates ``[m, H, W, C]`` for the images standing (clean ``xi``,
    current ``bi``, seeds ``point_seed`` ``[m]``): a random ``s x s`` window, ``s`` from the
    fraction ``p`` of pixels, set to ``x + eps * sign_c``; a candidate equal to ``bi`` is
    redrawn."""
    m, h, w, c = bi.shape
    s = min(max(int(round(np.sqrt(p * h * w))), 1), h, w)
    corner = seeds.integers_rows(
        seeds.fold(point_seed, "square window", it), [h - s + 1, w - s + 1], (2,)
    )
    top, left = corner[:, :1], corner[:, 1:]
    rows_h, cols_w = np.arange(h), np.arange(w)
    window = ((rows_h >= top) & (rows_h < top + s))[:, :, None, None] & (
        (cols_w >= left) & (cols_w < left + s)
    )[:, None, :, None]  # [m, h, w, 1]
    cand = np.empty_like(bi)
    todo = np.arange(m)
    for redraw in range(_MAX_REDRAWS):
        keys = seeds.fold(point_seed[todo], "square signs", it, redraw)
        signs = (2 * seeds.integers_rows(keys, 2, (1, 1, c)) - 1).astype(np.float32)
        cand[todo] = np.clip(
            np.where(window[todo], xi[todo] + eps * signs, bi[todo]), PIXEL_MIN, PIXEL_MAX
        )
        todo = todo[(cand[todo] == bi[todo]).reshape(len(todo), -1).all(axis=1)]
        if not len(todo):
            break
    return cand
