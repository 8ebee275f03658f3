"""Adaptive attacks on the model shells: BPDA with the identity approximation of the search factor.

A factor shell answers ``G(x) = F(z_t*(x))`` where every ``z_t(x)`` comes out of a search over a
ball around ``x`` (``shells``). ``G`` is not differentiable in ``x`` (an argmax over the ball, then
an argmax over labels), so a transfer attack on ``F`` alone says little about the shell. BPDA
(Athalye, Carlini & Wagner, 2018, "Obfuscated gradients give a false sense of security") attacks
the shell itself: run the real, non-differentiable search on the forward pass, and on the backward
pass replace it by a differentiable approximation. Here the approximation is the identity:

    z_t(x') ~ x' + d_t,   d_t = z_t(x') - x' held constant (``tf.stop_gradient``),

so ``d/dx' F(z_t) ~ F'(z_t)``: the base model's gradient *at the shell's point*, not at ``x'``.
Each step ascends the surrogate

    L(x') = lo_t^(x' + d_t^) - lo_y(x' + d_y),

``lo_t`` the log-odds of :func:`shells.log_odds` (the per-label score the shell ranks by), ``y``
the true label and ``t^`` the best wrong label by the shell's own ranking at ``x'``: the shell is
wrong exactly when some wrong label outranks ``y``, and ``L`` pushes the strongest contender up and
``y`` down, each at the point where the shell looked. ``x'`` moves by signed steps (L-inf PGD) and
is projected onto ``N(x, epsilon)`` (the ball intersected with the pixel box).

The attack queries the real shell at every iterate and keeps, per example, the first iterate at
which the shell's label is wrong: a reported success is a verified misclassification by the shell,
never a property of the surrogate. A failure only means that this attack did not find one, so BPDA
success rates are lower bounds on the shell's vulnerability at ``epsilon``.

Units: images are float32 NHWC pixels in 0..255; ``epsilon`` and ``step_size`` are pixels.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from manifold_tf import compiled, projected
from manifold_tf.shells.base import log_odds
from manifold_tf.validation import validate_images, validate_labels, validate_radius

__all__ = ["bpda"]


def _step_function(base, image_shape: tuple[int, ...], num_classes: int):
    """The cached compiled BPDA step for ``base``: one forward+backward pass on ``2 M`` rows.

    ``(x_adv [M, ...], x [M, ...], z [M, C, ...], t_hat [M], y [M], epsilon, step_size)`` ->
    the next iterate ``[M, ...]``, projected onto ``N(x, epsilon)``. The batch axis is ``None``, so
    the function is traced once although the batch shrinks as examples succeed.
    """
    image = tf.TensorSpec((None,) + tuple(image_shape), tf.float32)
    labels = tf.TensorSpec((None,), tf.int32)
    scalar = tf.TensorSpec((), tf.float32)
    z_spec = tf.TensorSpec((None, num_classes) + tuple(image_shape), tf.float32)

    def build(net):
        def step(x_adv, x, z, t_hat, y, epsilon, step_size):
            m = tf.shape(x_adv)[0]
            points = tf.concat([tf.gather(z, t_hat, batch_dims=1), tf.gather(z, y, batch_dims=1)], 0)
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                x2 = tf.concat([x_adv, x_adv], 0)
                # Identity approximation: the forward pass runs at z_t itself (x2 - x2 is exactly
                # 0), the backward pass sees z_t = x' + constant, so d z_t / d x' = I.
                moved = points + (x2 - tf.stop_gradient(x2))
                logits = tf.cast(net(moved, training=False), tf.float32)
                lo = log_odds(logits, tf.concat([t_hat, y], 0))
                # L summed over rows: rows are independent, so its gradient is each row's own.
                total = tf.reduce_sum(lo[:m] - lo[m:])
            grad = tape.gradient(total, x_adv)
            return projected.project(x_adv + step_size * tf.sign(grad), x, epsilon)

        return step

    return compiled.cached(
        base, ("bpda", tuple(image_shape), int(num_classes)), build,
        input_signature=[image, image, z_spec, labels, labels, scalar, scalar],
    )


def _check_shell(shell) -> None:
    missing = [a for a in ("embed_function", "base", "image_shape", "num_classes")
               if not hasattr(shell, a)]
    if missing:
        raise ValueError(
            f"shell must be a factor shell (MCNShell or NCNShell) with `embed_function` and `base`; "
            f"got {type(shell).__name__}, which lacks {missing}. To attack a plain base model use "
            f"manifold_tf.attacks.pgd."
        )


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0; got {steps!r}.")
    return int(steps)


def _contender(out: dict, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best wrong label ``t^`` by the shell's own ranking, and the surrogate ``lo_t^ - lo_y``.

    MCN ranks labels by log-odds. NCN ranks first by distance among labels whose ``z_t`` meets
    ``p`` (``met``), then, when none does, by log-odds: the same order is used here, so that
    ``t^`` is the wrong label that would win if ``y`` dropped out.
    """
    lo = out["log_odds"].numpy()
    rows = np.arange(len(y))
    own = np.zeros(lo.shape, bool)
    own[rows, y] = True
    t_hat = np.where(own, -np.inf, lo).argmax(axis=1)
    if "met" in out and "distances" in out:
        met = out["met"].numpy() & ~own
        nearest = np.where(met, out["distances"].numpy(), np.inf).argmin(axis=1)
        t_hat = np.where(met.any(axis=1), nearest, t_hat)
    return t_hat.astype(np.int32), (lo[rows, t_hat] - lo[rows, y]).astype(np.float32)


def bpda(
    shell,
    x,
    y,
    *,
    epsilon: float,
    steps: int = 20,
    step_size: float | None = None,
    x_init=None,
    random_start: bool = False,
    seed: int = 0,
) -> dict:
    """Untargeted L-inf BPDA on a factor shell (identity approximation of its search, see module).

    Per step, on the examples not yet fooled (all at once): evaluate the shell at ``x'``; an
    example whose shell label is not ``y`` is done and keeps that ``x'``; the others take one
    signed step of ``step_size`` along the surrogate's gradient and are projected onto
    ``N(x, epsilon)``. The shell is evaluated ``steps + 1`` times (the last at the final iterate),
    fewer if every example is fooled early.

    Args:
      shell: an :class:`~manifold_tf.shells.MCNShell` or :class:`~manifold_tf.shells.NCNShell`
        (anything with ``embed_function`` returning ``z`` ``[N, C, H, W, 3]``, ``label`` ``[N]``
        and label-indexed ``log_odds`` ``[N, C]``, and the ``base`` model it wraps).
      x: clean images ``[N, H, W, 3]``, float, pixels 0..255.
      y: true labels ``[N]`` (int): success is the shell's label differing from them.
      epsilon: L-inf budget in pixels (8 means 8/255).
      steps: attack steps ``>= 0``.
      step_size: pixels per signed step; default ``2.5 * epsilon / steps`` (Madry et al.'s rule).
      x_init: optional start ``[N, H, W, 3]`` (e.g. a transfer attack's ``x'`` on the base),
        projected into ``N(x, epsilon)``.
      random_start: start at a uniform random point of ``N(x, epsilon)`` (stateless, from
        ``seed``); not together with ``x_init``.
      seed: int seed of the random start.

    Returns:
      dict of numpy arrays: ``x_adv`` float32 ``[N, H, W, 3]`` (per example the first iterate at
      which the shell was wrong, else the last iterate; always inside ``N(x, epsilon)``),
      ``success`` bool ``[N]`` (the shell's label at ``x_adv`` is not ``y``), ``shell_label``
      int32 ``[N]`` (the shell's label at ``x_adv``), ``steps_used`` int32 ``[N]`` (the step after
      which the shell first failed, 0 = at the start point; ``steps`` if it never did) and
      ``margin`` float32 ``[N]`` (the surrogate ``lo_t^ - lo_y`` at ``x_adv``, from the shell's
      scores; for MCN it is ``> 0`` exactly when the shell is wrong, up to ties; for NCN, which
      ranks by distance, it is only the quantity being ascended).

    The label reported for ``x_adv`` is the one the shell gave during the attack, on a batch of
    the examples still running; for a shell whose output depends on its batch (MCN with
    ``random_start``) a later call on another batch can differ.

    Cost: each step costs one shell prediction on the running examples (about ``C * K``
    forward+backward passes of the base per image, ``K`` the shell's optimiser steps) plus one
    forward+backward pass of the base on ``2`` rows per image (``z_t^`` and ``z_y``); the total is
    at most ``steps + 1`` shell predictions and ``steps`` BPDA passes per image. BPDA success is a
    lower bound on the shell's vulnerability: the identity approximation can miss attacks that
    another approximation or a query attack finds.
    """
    _check_shell(shell)
    epsilon = validate_radius(epsilon, "epsilon")
    steps = _check_steps(steps)
    if step_size is None:
        step_size = 2.5 * epsilon / max(steps, 1)
    step_size = validate_radius(step_size, "step_size")
    image_shape = tuple(shell.image_shape)
    num_classes = int(shell.num_classes)
    x = validate_images(x, image_shape=image_shape)
    n = int(x.shape[0])
    y = validate_labels(y, num_examples=n, num_classes=num_classes).numpy()

    if x_init is not None:
        if random_start:
            raise ValueError("give either x_init or random_start=True, not both.")
        x_init = validate_images(x_init, image_shape=image_shape, name="x_init")
        if int(x_init.shape[0]) != n:
            raise ValueError(
                f"x_init must have shape {tuple(x.shape)} (like x); got {tuple(x_init.shape)}."
            )
        start = projected.project(x_init, x, epsilon)
    elif random_start:
        start = projected.random_start(x, epsilon, tf.constant([int(seed), 0], tf.int64))
    else:
        start = x

    x_np = x.numpy()
    x_adv = start.numpy().copy()  # per example: its current iterate until it is done, then frozen
    success = np.zeros(n, bool)
    shell_label = np.zeros(n, np.int32)
    steps_used = np.full(n, steps, np.int32)
    margin = np.zeros(n, np.float32)
    if n == 0:
        return dict(x_adv=x_adv, success=success, shell_label=shell_label, steps_used=steps_used,
                    margin=margin)

    step_fn = _step_function(shell.base, image_shape, num_classes)
    eps_t = tf.constant(epsilon, tf.float32)
    step_t = tf.constant(step_size, tf.float32)
    active = np.arange(n)  # examples the shell still classifies as y
    for k in range(steps + 1):
        current = x_adv[active]
        out = shell.embed_function(tf.constant(current))
        label = out["label"].numpy().astype(np.int32)
        t_hat, m = _contender(out, y[active])
        shell_label[active] = label
        margin[active] = m
        done = label != y[active]
        success[active[done]] = True
        steps_used[active[done]] = k
        keep = ~done
        active = active[keep]
        if k == steps or active.size == 0:
            break
        # Done rows drop out of the batch; the shell's z comes along for the rows that stay.
        x_next = step_fn(
            tf.constant(current[keep]), tf.constant(x_np[active]),
            tf.boolean_mask(out["z"], keep), tf.constant(t_hat[keep]), tf.constant(y[active]),
            eps_t, step_t,
        )
        x_adv[active] = x_next.numpy()
    return dict(x_adv=x_adv, success=success, shell_label=shell_label, steps_used=steps_used,
                margin=margin)
