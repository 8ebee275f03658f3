"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and APGD-T, L-inf, on base models.

"Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks".
Each run is :func:`projected.apgd_ascent` (step size ``2 * epsilon`` halved on a fixed schedule,
momentum 0.75) cut at its checkpoints (:func:`projected.apgd_checkpoints`) into calls of
:func:`projected.apgd_iterate`, compiled once per (model, loss, steps, image shape) in
:mod:`manifold_tf.compiled`. At each checkpoint the points that have reached a misclassified
iterate leave the run (nothing is spent on a decided point; ``early_exit=False`` runs every step);
the others go on exactly as in an uninterrupted run, since a point's iterates depend on it alone.
As in AutoAttack, a run attacks only the points still classified correctly (the batch shrinks;
the compiled functions take any batch size, so they do not retrace), and per example the first
run that misclassifies it decides its output; a point never broken gets its highest-loss point.
Units: pixels (0..255) for images and ``epsilon``.

Choices where the paper leaves room: the random start is uniform in ``N(x, epsilon)`` (AutoAttack
scales a uniform draw to the sphere of the ball); success means misclassification (also for
APGD-T, as in AutoAttack); within a run, the highest-loss misclassified iterate is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from manifold_tf import compiled, projected, seeds
from manifold_tf.attacks.common import DEFAULT_JIT_COMPILE, checkpoint_stops, margin, prepare
from manifold_tf.attacks.result import AttackResult
from manifold_tf.attacks.runner import TargetRun, check_num_targets, run_targets
from manifold_tf.validation import check_int

_DLR_EPS = 1e-12  # AutoAttack's guard against a zero denominator
_NEEDED_CLASSES = {"ce": 2, "dlr": 3, "dlr_targeted": 4}


@dataclass(frozen=True)
class APGDSettings:
    """APGD's knobs, for :func:`apgd_ce`, :func:`apgd_dlr` and :func:`apgd_t` (AutoAttack's values
    by default); refused with a ValueError naming the field when out of range.

    Attributes:
      steps: APGD iterations per run (AutoAttack: 100), >= 0.
      restarts: runs from independent random starts (APGD-T: per target), >= 1; each attacks only
        the points still standing.
      num_targets: APGD-T only: its targets, the highest wrong labels of the clean logits
        (AutoAttack: 9; at most ``K - 1``, checked against the model).
      early_exit: a point leaves a run at the first of APGD's checkpoints where it has reached a
        misclassified iterate (its output: the highest-loss misclassified iterate so far).
        ``False``: every run takes all its ``steps`` on each point it starts on (AutoAttack's
        way; the same points succeed, at more cost).
      jit_compile: compile each run with XLA (XLA then compiles once per batch size it meets).
    """

    steps: int = 100
    restarts: int = 1
    num_targets: int = 9
    early_exit: bool = True
    jit_compile: bool = DEFAULT_JIT_COMPILE

    def __post_init__(self) -> None:
        checked = dict(
            steps=check_int(self.steps, "steps", 0),
            restarts=check_int(self.restarts, "restarts", 1),
            num_targets=check_int(self.num_targets, "num_targets", 1),
            # Flags are read for their truth value, as they always were.
            early_exit=bool(self.early_exit),
            jit_compile=bool(self.jit_compile),
        )
        for name, value in checked.items():
            object.__setattr__(self, name, value)


_DEFAULTS = APGDSettings()


def _check_classes(logits: tf.Tensor, needed: int, what: str) -> None:
    k = logits.shape[-1]
    if k is not None and k < needed:
        raise ValueError(f"{what} needs at least {needed} classes; the logits have {k}.")


def dlr_loss(logits, y) -> tf.Tensor:
    """Untargeted Difference-of-Logits-Ratio loss ``[N]``, to maximise.

    ``-(Z_y - max_{j != y} Z_j) / (Z_pi1 - Z_pi3 + 1e-12)`` with ``Z_pi1 >= Z_pi2 >= ...`` the
    sorted logits ``[N, K]`` (``K >= 3``): positive exactly when ``x`` is misclassified, and
    invariant to shifting and (positive) scaling of the logits.
    """
    logits = tf.convert_to_tensor(logits, tf.float32)
    _check_classes(logits, 3, "the DLR loss")
    top = tf.math.top_k(logits, k=3).values
    return -margin(logits, tf.cast(y, tf.int32)) / (top[:, 0] - top[:, 2] + _DLR_EPS)


def dlr_targeted_loss(logits, y, target) -> tf.Tensor:
    """Targeted DLR loss ``[N]``, to maximise.

    ``-(Z_y - Z_t) / (Z_pi1 - (Z_pi3 + Z_pi4) / 2 + 1e-12)`` for logits ``[N, K]`` (``K >= 4``),
    true labels ``y`` ``[N]`` and targets ``target`` ``[N]``.
    """
    logits = tf.convert_to_tensor(logits, tf.float32)
    _check_classes(logits, 4, "the targeted DLR loss")
    top = tf.math.top_k(logits, k=4).values
    z_y = tf.gather(logits, tf.cast(y, tf.int32), batch_dims=1)
    z_t = tf.gather(logits, tf.cast(target, tf.int32), batch_dims=1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_EPS)


def cross_entropy(logits, y) -> tf.Tensor:
    """``-log softmax(Z)_y`` ``[N]``, computed as ``softplus(logsumexp_{j != y}(Z_j - Z_y))``.

    The same value as ``tf.nn.sparse_softmax_cross_entropy_with_logits``, but its gradient keeps
    its direction when the softmax saturates: there the gradient is ``softmax - onehot`` with
    ``1 - p_y`` rounded in float32, which for a margin beyond ~15 logits points the wrong way in
    many pixels (or is exactly zero), so a signed-gradient attack stalls on confident points.
    """
    logits = tf.convert_to_tensor(logits, tf.float32)
    own = tf.gather(logits, tf.cast(y, tf.int32), batch_dims=1)
    is_own = tf.one_hot(tf.cast(y, tf.int32), tf.shape(logits)[-1], on_value=True, off_value=False)
    others = tf.where(is_own, tf.constant(-np.inf, logits.dtype), logits - own[:, None])
    return tf.nn.softplus(tf.reduce_logsumexp(others, axis=-1))


def _objective(net, loss, y, target):
    def objective(z):
        logits = net(z, training=False)
        if loss == "ce":
            f = cross_entropy(logits, y)
        elif loss == "dlr":
            f = dlr_loss(logits, y)
        else:
            f = dlr_targeted_loss(logits, y, target)
        return f, tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)

    return objective


def _build_iterate(loss: str, steps: int):
    def build(net):
        def run(x, y, target, eps, state, stop):
            objective = _objective(net, loss, y, target)
            return projected.apgd_iterate(objective, x, state, radius=eps, steps=steps, stop=stop)

        return run

    return build


def _build_finish(loss: str):
    def build(net):
        def run(x, y, target, eps, state):
            return projected.apgd_finish(_objective(net, loss, y, target), x, state)

        return run

    return build


def _state_shapes(image_shape: tuple) -> list:
    """The ``(shape, dtype)`` of each per-point field of :class:`projected.APGDState`."""
    img, row = (None,) + image_shape, [None]
    ones = (None,) + (1,) * len(image_shape)
    f32, b = tf.float32, tf.bool
    # z, z_prev, f_prev, eta, count, f_last, reduced_last, z_best, f_best, g_best, z_ok, f_ok
    shapes = [img, img, row, ones, row, row, row, img, row, img, img, row]
    return [(s, b if k == 6 else f32) for k, s in enumerate(shapes)]


def _run(iterate, finish, x, y, target, eps, keys, settings: APGDSettings):
    """One APGD run on ``M`` points: ``(x_adv [M, ...], f [M], success [M], passes [M])``;
    ``keys`` int64 ``[M]`` key each point's random start (:func:`manifold_tf.seeds.row_keys`).

    The run stops at each of APGD's checkpoints; with ``early_exit`` the points that have reached
    a misclassified iterate leave there with their best misclassified point, and the others go on
    alone (their iterates do not depend on the batch, so they end as in an uninterrupted run).
    """
    steps = settings.steps
    m = len(x)
    z_out, f_out = np.array(x, np.float32), np.full(m, -np.inf, np.float32)
    ok_out, passes = np.zeros(m, bool), np.zeros(m, np.int64)
    xt, yt, tt = tf.constant(x), tf.constant(y, tf.int32), tf.constant(target, tf.int32)
    state = projected.apgd_start(xt, projected.random_start_rows(xt, eps, keys), eps)
    rows, done = np.arange(m), 0
    for stop in checkpoint_stops(steps, settings.early_exit):
        state = iterate(xt, yt, tt, eps, state, tf.constant(stop, tf.int32))
        passes[rows] += stop - done
        done = stop
        if stop == steps:
            break
        left = state.succeeded().numpy()
        if left.any():
            z_out[rows[left]] = state.z_ok.numpy()[left]
            f_out[rows[left]] = state.f_ok.numpy()[left]
            ok_out[rows[left]] = True
            keep = np.flatnonzero(~left)
            rows = rows[keep]
            if not rows.size:
                return z_out, f_out, ok_out, passes
            keep = tf.constant(keep, tf.int32)
            state = state.take(keep)
            xt, yt, tt = (tf.gather(v, keep) for v in (xt, yt, tt))
    z, f, ok = finish(xt, yt, tt, eps, state)
    z_out[rows], f_out[rows], ok_out[rows] = z.numpy(), f.numpy(), ok.numpy()
    return z_out, f_out, ok_out, passes


def _prepare(model, x, y, epsilon, loss: str, settings: APGDSettings):
    """``(x, y, epsilon)`` checked (:func:`common.prepare`), and the model's classes against what
    ``loss`` (and APGD-T's ``num_targets``) needs."""
    x, y, num_classes, epsilon = prepare(model, x, y, epsilon, "epsilon")
    needed = _NEEDED_CLASSES[loss]
    if num_classes < needed:
        raise ValueError(
            f"APGD with the {loss} loss needs at least {needed} classes; "
            f"the model has {num_classes}."
        )
    if loss == "dlr_targeted":
        check_num_targets(settings.num_targets, num_classes)
    return x, y, epsilon


def _compile(model, loss: str, settings: APGDSettings, image_shape: tuple):
    """``(iterate, finish)``: a run's segment and its last forward pass, cached per (model,
    loss, steps, image shape)."""
    # A None batch axis: one trace serves every number of points still standing, in every
    # segment of every run.
    images, labels = (
        tf.TensorSpec((None,) + image_shape, tf.float32),
        tf.TensorSpec([None], tf.int32),
    )
    scalar = tf.TensorSpec([], tf.float32)
    state = projected.APGDState(
        tf.TensorSpec([], tf.int32),
        *(tf.TensorSpec(s, d) for s, d in _state_shapes(image_shape)),
    )
    iterate = compiled.cached(
        model,
        ("apgd", loss, settings.steps, image_shape),
        _build_iterate(loss, settings.steps),
        jit_compile=settings.jit_compile,
        input_signature=[images, labels, labels, scalar, state, tf.TensorSpec([], tf.int32)],
    )
    finish = compiled.cached(
        model,
        ("apgd_finish", loss, image_shape),
        _build_finish(loss),
        jit_compile=settings.jit_compile,
        input_signature=[images, labels, labels, scalar, state],
    )
    return iterate, finish


def _apgd(model, x, y, epsilon, loss: str, settings: APGDSettings, seed) -> AttackResult:
    x, y, epsilon = _prepare(model, x, y, epsilon, loss, settings)
    n = int(x.shape[0])
    point_seed = seeds.per_point(seed, n)
    if n == 0:
        return AttackResult.unattacked(x.numpy())
    # The clean forward pass: already-misclassified points are not attacked (they keep x), and
    # APGD-T's targets are the top wrong labels of the clean logits, highest first.
    clean = model(x, training=False).numpy()
    iterate, finish = _compile(model, loss, settings, tuple(int(d) for d in x.shape[1:]))
    eps = tf.constant(epsilon, tf.float32)

    def attack(xs, ys, idx, target, run: TargetRun) -> AttackResult:
        keys = seeds.fold(point_seed[idx], "apgd", run.index)
        # An untargeted loss reads no target: label 0 stands in for -1.
        z, f, ok, passes = _run(iterate, finish, xs, ys, np.maximum(target, 0), eps, keys, settings)
        return AttackResult(z, ok, base_passes=passes, score=f, details=dict(target=target))

    # Across APGD-T's targets the runner compares different targets' losses among failures: all
    # scale-free DLR values.
    return run_targets(
        attack,
        x.numpy(),
        y.numpy(),
        clean,
        num_targets=settings.num_targets if loss == "dlr_targeted" else None,
        restarts=settings.restarts,
        name=lambda run: f"target {run.rank + 1}, restart {run.restart + 1}",
    ).result


def apgd_ce(
    model, x, y, *, epsilon: float, settings: APGDSettings = _DEFAULTS, seed=0
) -> AttackResult:
    """APGD-CE: Auto-PGD ascending the cross-entropy of the true label, L-inf.

    The loss is :func:`cross_entropy` (the usual value, with a gradient that survives saturation).

    Args:
      model: Keras model, images ``[N, H, W, C]`` (0..255) -> logits ``[N, K]``.
      x: images ``[N, H, W, C]`` float, pixels 0..255.
      y: true int labels ``[N]``.
      epsilon: L-inf budget in pixels (8 means 8/255 of the range).
      settings: :class:`APGDSettings` (steps, restarts, early exit, XLA); ``num_targets`` unused.
      seed: seeds the random starts: an int, or an int array ``[N]`` of per-point seeds (each
        point's starts then depend on its own seed only, not on the batch:
        :func:`manifold_tf.seeds.row_keys`). Stateless: same seed and inputs, same output.

    Returns:
      :class:`AttackResult`: ``x_adv`` ``[N, H, W, C]`` float32 inside ``N(x, epsilon)`` and
      [0, 255]: per example the first misclassified point found, else the highest-loss point
      (``x`` itself for points misclassified already, a success at no cost); ``score`` its loss;
      ``details["run"]`` the run that produced it (-1: none), ``details["target"]`` (-1:
      untargeted). Cost: one forward pass over the ``N`` points, then per run and point the
      forward+backward passes up to the checkpoint where it left, or ``steps`` (``base_passes``,
      per point as spent), and one forward pass over the points that did not leave: at most
      ``restarts * steps`` forward+backward passes per point.
    """
    return _apgd(model, x, y, epsilon, "ce", settings, seed)


def apgd_dlr(
    model, x, y, *, epsilon: float, settings: APGDSettings = _DEFAULTS, seed=0
) -> AttackResult:
    """APGD-DLR: Auto-PGD ascending the untargeted :func:`dlr_loss` (``K >= 3``), L-inf.

    Arguments, output and cost as :func:`apgd_ce`.
    """
    return _apgd(model, x, y, epsilon, "dlr", settings, seed)


def apgd_t(
    model, x, y, *, epsilon: float, settings: APGDSettings = _DEFAULTS, seed=0
) -> AttackResult:
    """APGD-T: Auto-PGD ascending :func:`dlr_targeted_loss` (``K >= 4``), L-inf.

    ``settings.restarts`` runs per target, for the ``settings.num_targets`` (``<= K - 1``;
    AutoAttack: 9) highest wrong labels of the clean logits, in that order; every run attacks
    only the points still standing. Success is misclassification (as in AutoAttack), not reaching
    the target. Other arguments and the output as :func:`apgd_ce`. Cost: at most
    ``num_targets * restarts * steps`` forward+backward passes per point (a point leaves once
    broken).
    """
    return _apgd(model, x, y, epsilon, "dlr_targeted", settings, seed)
