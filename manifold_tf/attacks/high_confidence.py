"""The high-confidence search of the separation test (paper, Section 4 / Table 1)."""

from __future__ import annotations

import tensorflow as tf

from manifold_tf import compiled, projected
from manifold_tf.attacks.common import DEFAULT_JIT_COMPILE, prepare, seed_tensor
from manifold_tf.validation import validate_radius


def high_confidence(
    model,
    x,
    y,
    *,
    delta: float,
    steps: int,
    step_size: float,
    optimizer: str = "sign",
    random_start: bool = False,
    seed: int = 0,
    jit_compile: bool = DEFAULT_JIT_COMPILE,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The most confident wrong prediction reachable in ``N(x, delta)``, per point.

    For every point ``i`` and every wrong label ``t != y_i`` it ascends ``log F(z)_t`` over
    ``N(x_i, delta)`` (:func:`projected.projected_ascent`); all ``N * (K - 1)`` problems run as one
    batch. Each candidate ``z_t`` is scored by its wrong-label confidence ``max_{j != y} F(z_t)_j``
    (usually ``F(z_t)_t``), and the best candidate per point is returned.

    Args:
      model: Keras model, images -> logits ``[N, K]``.
      x: images ``[N, H, W, C]``, pixels 0..255. y: true labels ``[N]``.
      delta: radius of the neighbourhood in pixels.
      steps, step_size: ascent steps and their size (pixels; the Adam learning rate for "adam").
      optimizer: ``"sign"`` (PGD steps) or ``"adam"``.
      random_start: start each ascent at a uniform random point of the ball (else at ``x``).

    Returns:
      ``(x_best [N, H, W, C], confidence [N], label [N])``: the best point, its wrong-label
      confidence ``max_{j != y} F(x_best)_j`` in [0, 1], and that label ``j``. Cost:
      ``(K - 1) * (steps + 2)`` model passes per point, ``(K - 1) * steps`` with a backward pass.
    """
    if optimizer not in projected.OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {projected.OPTIMIZERS}; got {optimizer!r}.")
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}.")
    step_size = validate_radius(step_size, "step_size")
    x, y, num_classes, delta = prepare(model, x, y, delta, "delta")
    if x.shape[0] == 0:
        return x, tf.zeros([0]), tf.zeros([0], tf.int32)
    key = ("high_confidence", steps, optimizer, bool(random_start))

    def build(net):
        def run(x, labels, radius, step, seed):
            k = num_classes - 1
            n = tf.shape(x)[0]
            # Row i * k + (s - 1) targets label (y_i + s) mod K, s = 1..K-1: every wrong label once.
            shifts = tf.range(1, num_classes, dtype=tf.int32)
            targets = tf.reshape((labels[:, None] + shifts[None, :]) % num_classes, [-1])
            xt = tf.repeat(x, k, axis=0)

            def objective(z):
                logp = tf.nn.log_softmax(net(z, training=False))
                return tf.gather(logp, targets, batch_dims=1)

            z0 = projected.random_start(xt, radius, seed) if random_start else xt
            z, _ = projected.projected_ascent(
                objective, xt, z0, radius=radius, steps=steps, step_size=step, optimizer=optimizer
            )
            z = projected.project(z, xt, radius)
            probs = tf.nn.softmax(net(z, training=False))
            own = tf.one_hot(tf.repeat(labels, k), num_classes, dtype=probs.dtype)
            wrong = probs * (1.0 - own) - own  # the true label can never be chosen
            conf = tf.reshape(tf.reduce_max(wrong, axis=-1), [n, k])
            label = tf.reshape(tf.argmax(wrong, axis=-1, output_type=tf.int32), [n, k])
            best = tf.argmax(conf, axis=-1, output_type=tf.int32)
            rows = tf.range(n) * k + best
            return tf.gather(z, rows), tf.gather(conf, best, batch_dims=1), tf.gather(label, best, batch_dims=1)

        return run

    fn = compiled.cached(model, key, build, jit_compile=jit_compile)
    return fn(x, y, tf.constant(delta, tf.float32), tf.constant(step_size, tf.float32), seed_tensor(seed))
