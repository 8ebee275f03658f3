"""The shared projected-optimisation core.

Every search over an L-inf ball in this project (PGD and the high-confidence attack in
``attacks``, the MCN shell's per-label ascent in ``shells``) is one call of
:func:`projected_ascent`: maximise a per-example objective over ``N(x, r) = {z : |z - x|_inf <= r}
intersected with the pixel box [0, 255]``, by signed-gradient steps or Adam, keeping the best iterate
per example. It is written to run inside a caller's ``tf.function`` (it traces to a single
``tf.while_loop``), so the caller decides the batch layout and the compilation (XLA or not).

Units: pixels (0..255); ``radius`` and ``step_size`` are in pixel units.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from manifold_tf.validation import PIXEL_MAX, PIXEL_MIN

Objective = Callable[[tf.Tensor], tf.Tensor]

OPTIMIZERS = ("sign", "adam")


def project(z: tf.Tensor, x: tf.Tensor, radius) -> tf.Tensor:
    """Projects ``z`` onto ``N(x, radius)``: the L-inf ball around ``x`` intersected with the box.

    ``radius`` is a scalar or a tensor broadcastable to ``x`` (e.g. ``[N, 1, 1, 1]`` per example).
    """
    z = tf.clip_by_value(z, x - radius, x + radius)
    return tf.clip_by_value(z, PIXEL_MIN, PIXEL_MAX)


def random_start(x: tf.Tensor, radius, seed: tf.Tensor) -> tf.Tensor:
    """A uniform random point of ``N(x, radius)``; ``seed`` is a stateless ``[2]`` int seed."""
    noise = tf.random.stateless_uniform(tf.shape(x), seed=seed, minval=-1.0, maxval=1.0)
    return project(x + noise * radius, x, radius)


ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = 0.9, 0.999, 1e-8  # tf.compat.v1.train.AdamOptimizer's


def adam_step(g, m, v, t, learning_rate, *, beta1: float = ADAM_BETA1, beta2: float = ADAM_BETA2,
              epsilon: float = ADAM_EPSILON):
    """One Adam update as ``tf.compat.v1.train.AdamOptimizer`` computes it: ``(delta, m, v)``.

    ``delta = lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)`` is the step to
    *descend* (subtract it to minimise, add it to ascend). ``t`` is the 1-based step count: a scalar
    or a tensor broadcastable to ``g`` (per-example counts, as the batched CW attack keeps);
    ``learning_rate`` likewise. Shared by the projected core, Carlini-Wagner and the NCN shell.
    """
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * tf.square(g)
    t = tf.cast(t, g.dtype)
    lr_t = learning_rate * tf.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    return lr_t * m / (tf.sqrt(v) + epsilon), m, v


def projected_ascent(
    objective: Objective,
    x: tf.Tensor,
    z0: tf.Tensor,
    *,
    radius,
    steps: int,
    step_size,
    optimizer: str = "sign",
    beta1: float = 0.9,
    beta2: float = 0.999,
    adam_epsilon: float = 1e-8,
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
      optimizer: ``"sign"`` or ``"adam"``.
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
        return f, tape.gradient(f, z)

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
            delta, m, v = adam_step(g, m, v, i + 1, step_size, beta1=beta1, beta2=beta2,
                                    epsilon=adam_epsilon)
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
