"""The shared projected-optimisation core.

Every search over an L-inf ball in this project (PGD and the high-confidence attack in
``attacks``, the MCN shell's per-label ascent in ``shells``) is one call of
:func:`projected_ascent`: maximise a per-example objective over
``N(x, r) = {z : |z - x|_inf <= r} intersected with the pixel box [0, 255]``, by signed-gradient
steps or Adam, keeping the best iterate per example (:func:`apgd_ascent` is the Auto-PGD variant
of the same search, with its own step-size schedule). It is written to run inside a caller's
``tf.function`` (it traces to a single ``tf.while_loop``), so the caller decides the batch layout
and the compilation (XLA or not).

Units: pixels (0..255); ``radius`` and ``step_size`` are in pixel units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from manifold_tf import seeds
from manifold_tf.validation import PIXEL_MAX, PIXEL_MIN

Objective = Callable[[tf.Tensor], tf.Tensor]

# The one vocabulary of optimisers in the package: "sign" (signed-gradient, PGD steps), "adam"
# (Adam on the point) and "apgd" (Auto-PGD's schedule). Each search accepts the subset it
# implements.
OPTIMIZERS = ("sign", "adam")
SCHEDULES = ("sign", "apgd")
MADRY_STEP_FACTOR = 2.5


def madry_step_size(radius, steps: int):
    """Madry et al.'s step rule: ``2.5 * radius / steps`` pixels per signed step (``steps >= 1``).

    With it ``steps`` signed steps can cross the ball 1.25 times, from one face to the other and
    back a little, whatever the start. ``steps = 0`` is treated as 1 (no step is taken anyway).
    ``radius`` may be a float or a tensor (inside a compiled search); ``steps`` is static.
    """
    return MADRY_STEP_FACTOR * radius / max(int(steps), 1)


def project(z: tf.Tensor, x: tf.Tensor, radius) -> tf.Tensor:
    """Projects ``z`` onto ``N(x, radius)``: the L-inf ball around ``x`` intersected with the box.

    ``radius`` is a scalar or a tensor broadcastable to ``x`` (e.g. ``[N, 1, 1, 1]`` per example).
    """
    z = tf.clip_by_value(z, x - radius, x + radius)
    return tf.clip_by_value(z, PIXEL_MIN, PIXEL_MAX)


def random_start(x: tf.Tensor, radius, seed: tf.Tensor) -> tf.Tensor:
    """A uniform random point of ``N(x, radius)``; ``seed`` is a stateless ``[2]`` int seed for
    the whole batch (a row's draw then depends on the batch: see :func:`random_start_rows`)."""
    noise = tf.random.stateless_uniform(tf.shape(x), seed=seed, minval=-1.0, maxval=1.0)
    return project(x + noise * radius, x, radius)


def random_start_rows(x: tf.Tensor, radius, keys) -> tf.Tensor:
    """A uniform random point of ``N(x, radius)`` per row, row ``i`` drawn from ``keys[i]`` alone
    (int64 ``[N]``, :func:`manifold_tf.seeds.row_keys`): the same point in any batch."""
    x = tf.convert_to_tensor(x, tf.float32)
    noise = 2.0 * seeds.tf_uniform_rows(keys, tf.shape(x)[1:]) - 1.0
    return project(x + noise * radius, x, radius)


ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = 0.9, 0.999, 1e-8  # tf.compat.v1.train.AdamOptimizer's


@dataclasses.dataclass(frozen=True)
class AdamConstants:
    """Adam's constants for :func:`projected_ascent` (default: ``tf.compat.v1``'s optimiser)."""

    beta1: float = ADAM_BETA1
    beta2: float = ADAM_BETA2
    epsilon: float = ADAM_EPSILON

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1); got {getattr(self, name)!r}.")
        if not 0.0 < self.epsilon < float("inf"):
            raise ValueError(f"epsilon must be a finite number > 0; got {self.epsilon!r}.")


ADAM = AdamConstants()


def adam_step(
    g,
    m,
    v,
    t,
    learning_rate,
    *,
    beta1: float = ADAM_BETA1,
    beta2: float = ADAM_BETA2,
    epsilon: float = ADAM_EPSILON,
):
    """One Adam update as ``tf.compat.v1.train.AdamOptimizer`` computes it: ``(delta, m, v)``.

    ``delta = lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)`` is the step to
    *descend* (subtract it to minimise, add it to ascend). ``t`` is the 1-based step count: a scalar
    or a tensor broadcastable to ``g`` (per-example counts, as the batched CW attack keeps);
    ``learning_rate`` likewise. Shared by the projected core, Carlini-Wagner and the NCN shell.
    """
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * tf.square(g)
    if getattr(t, "shape", None) is not None and t.shape.rank:
        # Per-example counts: powers by squaring (correctly rounded products), since a vectorised
        # pow rounds an element differently by where it falls in the tensor, and an example's
        # step must not depend on its batch (tests/test_batch_invariance.py).
        b1, b2 = _integer_power(beta1, t, g.dtype), _integer_power(beta2, t, g.dtype)
    else:
        t = tf.cast(t, g.dtype)
        b1, b2 = beta1**t, beta2**t
    lr_t = learning_rate * tf.sqrt(1.0 - b2) / (1.0 - b1)
    return lr_t * m / (tf.sqrt(v) + epsilon), m, v


def _integer_power(base: float, t, dtype, bits: int = 24) -> tf.Tensor:
    """``base ** t`` for integer-valued ``t`` ``< 2**bits`` by repeated squaring, elementwise."""
    t = tf.cast(t, tf.int32)
    out, power = tf.ones(tf.shape(t), dtype), tf.constant(base, dtype)
    for k in range(bits):
        out = tf.where(tf.bitwise.bitwise_and(t, 1 << k) > 0, out * power, out)
        power = power * power
    return out


def projected_ascent(
    objective: Objective,
    x: tf.Tensor,
    z0: tf.Tensor,
    *,
    radius,
    steps: int,
    step_size,
    optimizer: str = "sign",
    adam: AdamConstants = ADAM,
    return_best: bool = True,
    unroll: bool = False,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Maximises ``objective`` over ``N(x, radius)`` starting from ``z0``.

    Args:
      objective: maps a batch ``z`` ``[B, ...]`` to per-example values ``[B]`` to maximise. It is
        differentiated with respect to ``z``; examples must not interact (the gradient of the sum
        is then each example's own gradient).
      x: centres of the balls ``[B, ...]`` (pixels).
      z0: starting points ``[B, ...]``, inside the ball (see :func:`random_start`).
      radius: ball radius in pixels: scalar or broadcastable to ``x``.
      steps: number of gradient steps ``K`` (each one forward+backward pass).
      step_size: pixels per step. ``"sign"``: ``z += step_size * sign(grad)`` (PGD).
        ``"adam"``: Adam on ``z`` with learning rate ``step_size`` (bias-corrected moments).
      optimizer: ``"sign"`` or ``"adam"``; ``adam``: its constants (:class:`AdamConstants`).
      return_best: keep the best iterate (default). ``False`` returns the last iterate and skips
        the final forward pass (``f_best`` is then the objective at the previous iterate); this is
        Madry et al.'s PGD as used in adversarial training.
      unroll: trace the ``steps`` iterations one after another (a graph ``steps`` times larger)
        instead of a ``tf.while_loop``. XLA on CPU runs the unrolled form several times faster
        than the loop (``bench/bench_shells.py``); without XLA the two are alike.

    Returns:
      ``(z_best, f_best)``: per example the iterate with the highest objective among the ``K + 1``
      visited (sign steps are not monotone, so the last iterate is not always the best) and its
      value. Cost: ``K`` forward+backward passes and one forward pass.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}.")
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}.")
    batch_shape = tf.shape(x)[:1]
    expand = [-1] + [1] * (len(x.shape) - 1)

    def value_and_grad(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            f = objective(z)
        return f, tape.gradient(f, z, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def keep_best(z, f, z_best, f_best):
        better = f > f_best
        z_best = tf.where(tf.reshape(better, expand), z, z_best)
        return z_best, tf.where(better, f, f_best)

    def body(i, z, m, v, z_best, f_best):
        f, g = value_and_grad(z)
        z_best, f_best = keep_best(z, f, z_best, f_best)
        if optimizer == "sign":
            z_new = z + step_size * tf.sign(g)
        else:
            delta, m, v = adam_step(
                g, m, v, i + 1, step_size, beta1=adam.beta1, beta2=adam.beta2, epsilon=adam.epsilon
            )
            z_new = z + delta
        return i + 1, project(z_new, x, radius), m, v, z_best, f_best

    z0 = project(z0, x, radius)
    zeros = tf.zeros_like(z0)
    f_init = tf.fill(batch_shape, tf.constant(-float("inf"), z0.dtype))
    loop_vars = (tf.constant(0), z0, zeros, zeros, z0, f_init)
    if unroll:
        for _ in range(steps):
            loop_vars = body(*loop_vars)
        _, z, _, _, z_best, f_best = loop_vars
    else:
        _, z, _, _, z_best, f_best = tf.while_loop(
            lambda i, *_: i < steps, body, loop_vars, maximum_iterations=steps
        )
    if not return_best:
        return z, f_best
    return keep_best(z, objective(z), z_best, f_best)


# ---- APGD (Croce & Hein, ICML 2020) ---------------------------------------------------------


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ceil(p_j * steps)`` at which APGD may halve its step.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce & Hein
    2020, Section 3.2), computed in hundredths so that ``0.22 * 100`` is exactly 22. Repeated values
    (small ``steps``) are merged. AutoAttack's code rounds the interval lengths instead of the
    ``p_j``; the two agree at 100 steps (22, 41, 57, 70, 80, 87, 93, 99).
    """
    hundredths, prev, cur = [0, 22], 0, 22
    while True:
        prev, cur = cur, cur + max(cur - prev - 3, 6)
        if cur > 100:
            break
        hundredths.append(cur)
    return sorted({-(-p * int(steps) // 100) for p in hundredths})


class APGDState(NamedTuple):
    """An APGD run between two iterations: what :func:`apgd_iterate` carries from one to the next.

    Every field but ``i`` has one row per example (``[B]`` or ``[B, ...]`` as ``x``), so a run
    can drop examples between calls by gathering the rows (:meth:`take`) and the iterates of the
    others do not change: examples never interact.
    """

    i: tf.Tensor  # [] int32: the next iteration to run (0..steps)
    z: tf.Tensor  # the current iterate x_k
    z_prev: tf.Tensor  # x_{k-1} (the momentum's previous point)
    f_prev: tf.Tensor  # the objective at x_{k-1} (+inf before the first step)
    eta: tf.Tensor  # [B, 1, ...] the step size (pixels)
    count: tf.Tensor  # increasing steps since the last checkpoint
    f_last: tf.Tensor  # f_best at the last checkpoint
    reduced_last: tf.Tensor  # [B] bool: eta was halved at the last checkpoint
    z_best: tf.Tensor  # the highest-objective visited point, its value and its gradient
    f_best: tf.Tensor
    g_best: tf.Tensor
    z_ok: tf.Tensor  # the highest-objective successful point and its value (-inf: none yet)
    f_ok: tf.Tensor

    def take(self, rows) -> APGDState:
        """The state of the examples ``rows`` (indices ``[M]``), in that order."""
        return APGDState(self.i, *(tf.gather(v, rows) for v in self[1:]))

    def succeeded(self) -> tf.Tensor:
        """``[B]`` bool: a successful point was visited (its best is ``z_ok``)."""
        return self.f_ok > -float("inf")


def apgd_start(x: tf.Tensor, z0: tf.Tensor, radius) -> APGDState:
    """The state of an APGD run before its first iteration, from ``z0`` (projected first)."""
    z0 = project(z0, x, radius)
    n = tf.shape(x)[:1]
    inf = tf.constant(float("inf"), x.dtype)
    eta0 = 2.0 * radius * tf.ones(tf.concat([n, tf.ones([len(x.shape) - 1], tf.int32)], 0), x.dtype)
    return APGDState(
        tf.constant(0),
        z0,
        z0,
        tf.fill(n, inf),
        eta0,
        tf.zeros(n, x.dtype),
        tf.fill(n, -inf),
        tf.zeros(n, tf.bool),
        z0,
        tf.fill(n, -inf),
        tf.zeros_like(z0),
        z0,
        tf.fill(n, -inf),
    )


def _evaluate(objective, z, with_grad=True):
    """``(f [B], ok [B] bool, grad or None, has_success)`` of ``objective`` at ``z``."""
    with tf.GradientTape() as tape:
        tape.watch(z)
        out = objective(z)
    has_success = isinstance(out, (tuple, list))
    f, ok = out if has_success else (out, tf.zeros(tf.shape(z)[:1], tf.bool))
    grad = None
    if with_grad:
        grad = tape.gradient(f, z, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return f, ok, grad, has_success


def _keep(mask, new, old):
    if len(old.shape) > 1:
        mask = tf.reshape(mask, [-1] + [1] * (len(old.shape) - 1))
    return tf.where(mask, new, old)


def _keep_best(z, f, ok, z_best, f_best, z_ok, f_ok):
    better = f > f_best
    better_ok = ok & (f > f_ok)  # f_ok is -inf until a success
    return (
        _keep(better, z, z_best),
        _keep(better, f, f_best),
        _keep(better_ok, z, z_ok),
        _keep(better_ok, f, f_ok),
        better,
    )


def apgd_iterate(
    objective: Objective,
    x: tf.Tensor,
    state: APGDState,
    *,
    radius,
    steps: int,
    stop=None,
    rho: float = 0.75,
    alpha: float = 0.75,
) -> APGDState:
    """Runs the iterations ``state.i, ..., stop - 1`` of a ``steps``-iteration APGD run.

    :func:`apgd_ascent` is ``apgd_start``, this up to ``steps`` and :func:`apgd_finish`; a caller
    may stop in between (``stop``: an int or a scalar int32 tensor, default ``steps``), drop the
    examples it is done with (:meth:`APGDState.take`) and go on with the rest: an example's
    iterates depend only on its own state. ``steps`` fixes the checkpoint schedule. Cost: one
    forward+backward pass per iteration and example. Arguments as :func:`apgd_ascent`.
    """
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}.")
    if not 0.0 < alpha <= 1.0 or not 0.0 < rho <= 1.0:
        raise ValueError(f"alpha and rho must lie in (0, 1]; got alpha={alpha}, rho={rho}.")
    if steps == 0:
        return state
    stop = steps if stop is None else stop
    checks = [w for w in apgd_checkpoints(steps) if w < steps]  # a check at K would act on nothing
    is_check, since_last = [False] * steps, [0.0] * steps  # since_last: w_j - w_{j-1} at w_j
    for prev, w in zip(checks, checks[1:], strict=False):
        is_check[w], since_last[w] = True, float(w - prev)
    is_check = tf.constant(is_check)
    since_last = tf.constant(since_last, x.dtype)
    keep = _keep

    def body(*carry):  # the fields of an APGDState
        i, z, z_prev, f_prev, eta, count, f_last, reduced_last = carry[:8]
        z_best, f_best, g_best, z_ok, f_ok = carry[8:]
        f, ok, g, _ = _evaluate(objective, z)
        count += tf.cast(f > f_prev, count.dtype)
        z_best, f_best, z_ok, f_ok, better = _keep_best(z, f, ok, z_best, f_best, z_ok, f_ok)
        g_best = keep(better, g, g_best)
        # The step-size test at a checkpoint (iteration 0 is w_0: nothing to test yet).
        check = is_check[i]
        stalled = count < rho * since_last[i]
        stuck = ~reduced_last & (f_best <= f_last)
        reduce = check & (stalled | stuck)
        eta = keep(reduce, eta / 2.0, eta)
        z, g, f = keep(reduce, z_best, z), keep(reduce, g_best, g), keep(reduce, f_best, f)
        f_last = keep(check, f_best, f_last)
        reduced_last = keep(check, reduce, reduced_last)
        count = keep(check, tf.zeros_like(count), count)
        # The first step has no previous point, hence no momentum.
        a = tf.where(i > 0, tf.constant(alpha, x.dtype), tf.constant(1.0, x.dtype))
        z_step = project(z + eta * tf.sign(g), x, radius)
        z_new = project(z + a * (z_step - z) + (1.0 - a) * (z - z_prev), x, radius)
        out = (i + 1, z_new, z, f, eta, count, f_last, reduced_last)
        return out + (z_best, f_best, g_best, z_ok, f_ok)

    out = tf.while_loop(
        lambda i, *_: i < tf.minimum(stop, steps), body, tuple(state), maximum_iterations=steps
    )
    return APGDState(*out)


def apgd_finish(objective: Objective, x: tf.Tensor, state: APGDState):
    """The output of a finished run (see :func:`apgd_ascent`): one forward pass at the last
    iterate, which needs no gradient."""
    z_best, f_best, z_ok, f_ok = state.z_best, state.f_best, state.z_ok, state.f_ok
    f, ok, _, has_success = _evaluate(objective, state.z, with_grad=False)
    z_best, f_best, z_ok, f_ok, _ = _keep_best(state.z, f, ok, z_best, f_best, z_ok, f_ok)
    if not has_success:
        return z_best, f_best
    succeeded = f_ok > -float("inf")
    return _keep(succeeded, z_ok, z_best), _keep(succeeded, f_ok, f_best), succeeded


def apgd_ascent(
    objective: Objective,
    x: tf.Tensor,
    z0: tf.Tensor,
    *,
    radius,
    steps: int,
    rho: float = 0.75,
    alpha: float = 0.75,
):
    """Maximises ``objective`` over ``N(x, radius)`` by Auto-PGD (L-inf), from ``z0``.

    Croce & Hein (ICML 2020), Algorithm 1, per example and batched: signed-gradient steps of size
    ``eta`` (initially ``2 * radius``) with momentum, ``x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) +
    (1 - alpha)(x_k - x_{k-1}))`` where ``z_{k+1} = P(x_k + eta sign(grad))`` (the first step has no
    momentum). At each checkpoint ``w_j`` (:func:`apgd_checkpoints`), an example halves its ``eta``
    and restarts from its best point when fewer than ``rho * (w_j - w_{j-1})`` of the steps since
    ``w_{j-1}`` increased the objective, or when neither its ``eta`` nor its best value changed
    since ``w_{j-1}``. Traces to one ``tf.while_loop``; runs inside a caller's ``tf.function``.

    Args:
      objective: maps ``z`` ``[B, ...]`` to per-example values ``[B]`` to maximise, or to a pair
        ``(values [B], success [B] bool)`` (e.g. "misclassified"). Examples must not interact.
      x: centres of the balls ``[B, ...]`` (pixels).
      z0: starting points ``[B, ...]`` (projected onto the ball first).
      radius: ball radius in pixels: scalar or broadcastable to ``x`` (``[B, 1, 1, 1]``).
      steps: iterations ``K``; ``K + 1`` points are visited, ``z0`` included.
      rho: the fraction of increasing steps below which the step is halved (paper: 0.75).
      alpha: momentum weight of the new step (paper: 0.75).

    Returns:
      ``(z_best, f_best)``: per example the visited point with the highest objective and its value.
      With a ``success`` output, ``(z_best, f_best, success)``: per example the highest-objective
      point among the successful ones if any, else among all, its value, and whether it succeeded.
      Cost: ``K`` forward+backward passes and one forward pass (the last point needs no gradient).
    """
    state = apgd_iterate(
        objective, x, apgd_start(x, z0, radius), radius=radius, steps=steps, rho=rho, alpha=alpha
    )
    return apgd_finish(objective, x, state)
