"""The high-confidence search of the separation test (paper, Section 4 / Table 1)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from manifold_tf import compiled, projected, seeds
from manifold_tf.attacks.common import DEFAULT_JIT_COMPILE, prepare
from manifold_tf.attacks.result import AttackResult
from manifold_tf.validation import check_choice, check_int, validate_radius


def high_confidence(
    model,
    x,
    y,
    *,
    epsilon: float,
    steps: int,
    step_size: float,
    optimizer: str = "sign",
    random_start: bool = False,
    seed: int = 0,
    jit_compile: bool = DEFAULT_JIT_COMPILE,
) -> AttackResult:
    """The most confident wrong prediction reachable in ``N(x, epsilon)``, per point.

    For every point ``i`` and every wrong label ``t != y_i`` it ascends ``log F(z)_t`` over
    ``N(x_i, epsilon)`` (:func:`projected.projected_ascent`); all ``N * (K - 1)`` problems run as
    one batch. Each candidate ``z_t`` is scored by its wrong-label confidence
    ``max_{j != y} F(z_t)_j`` (usually ``F(z_t)_t``), and the best candidate per point is returned.

    Args:
      model: Keras model, images -> logits ``[N, K]``.
      x: images ``[N, H, W, C]``, pixels 0..255. y: true labels ``[N]``.
      epsilon: radius of the neighbourhood in pixels (the separation test's ``delta``).
      steps, step_size: ascent steps and their size (pixels; the Adam learning rate for "adam").
      optimizer: ``"sign"`` (PGD steps) or ``"adam"``.
      random_start: start each ascent at a uniform random point of the ball (else at ``x``).
      seed: seeds the random starts: an int, or an int array ``[N]`` of per-point seeds (a
        point's starts then depend on its own seed only, not on the batch).

    Returns:
      :class:`AttackResult`: ``x_adv`` the best point; ``details["confidence"]`` its wrong-label
      confidence ``max_{j != y} F(x_adv)_j`` in [0, 1] (also the ``score``) and
      ``details["label"]`` that label ``j``; ``success`` when ``j`` is the model's top label there
      (misclassified). Cost: ``(K - 1) * (steps + 2)`` model passes per point, ``(K - 1) * steps``
      with a backward pass (``base_passes``).
    """
    optimizer = check_choice(optimizer, "optimizer", projected.OPTIMIZERS)
    steps = check_int(steps, "steps", 0)
    step_size = validate_radius(step_size, "step_size")
    x, y, num_classes, epsilon = prepare(model, x, y, epsilon, "epsilon")
    point_seed = seeds.per_point(seed, int(x.shape[0]))
    if x.shape[0] == 0:
        return AttackResult.unattacked(
            x.numpy(), confidence=np.zeros(0, np.float32), label=np.zeros(0, np.int32)
        )
    # Row i * (K - 1) + s - 1 of the search targets label (y_i + s) mod K (see run): its key.
    shifts = np.arange(1, num_classes)
    labels_rows = ((y.numpy()[:, None] + shifts[None, :]) % num_classes).reshape(-1)
    keys = seeds.fold(np.repeat(point_seed, num_classes - 1), "high_confidence", labels_rows)
    key = ("high_confidence", steps, optimizer, bool(random_start))

    def build(net):
        def run(x, labels, radius, step, keys):
            k = num_classes - 1
            n = tf.shape(x)[0]
            # Row i * k + (s - 1) targets label (y_i + s) mod K, s = 1..K-1: every wrong label once.
            shifts = tf.range(1, num_classes, dtype=tf.int32)
            targets = tf.reshape((labels[:, None] + shifts[None, :]) % num_classes, [-1])
            xt = tf.repeat(x, k, axis=0)

            def objective(z):
                logp = tf.nn.log_softmax(net(z, training=False))
                return tf.gather(logp, targets, batch_dims=1)

            # One key per (point, target label): the draw does not depend on the batch.
            z0 = projected.random_start_rows(xt, radius, keys) if random_start else xt
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
            top = tf.argmax(tf.gather(probs, rows), axis=-1, output_type=tf.int32)
            return (
                tf.gather(z, rows),
                tf.gather(conf, best, batch_dims=1),
                tf.gather(label, best, batch_dims=1),
                tf.not_equal(top, labels),
            )

        return run

    fn = compiled.cached(model, key, build, jit_compile=jit_compile)
    z, conf, label, wrong = fn(
        x,
        y,
        tf.constant(epsilon, tf.float32),
        tf.constant(step_size, tf.float32),
        tf.constant(keys),
    )
    conf = conf.numpy()
    return AttackResult(
        z.numpy(),
        wrong.numpy(),
        base_passes=(num_classes - 1) * steps,
        score=conf,
        details=dict(confidence=conf, label=label.numpy()),
    )
