"""Carlini & Wagner's L-inf attack (``li_attack.py`` of ``carlini/nn_robust_attacks``), batched.

The search itself (the tau schedule, the constants, Adam in tanh space) is
:mod:`manifold_tf.cw_search`, shared with the paper's CarliniWagnerShell; this module is the attack:
input checks, one compiled function per setting, and the :class:`AttackResult`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from manifold_tf import compiled, projected
from manifold_tf.attacks.common import DEFAULT_JIT_COMPILE, bcast, goal, prepare
from manifold_tf.attacks.result import AttackResult
from manifold_tf.cw_search import CW_CPU, CW_PAPER, CWSettings, cw_schedule

__all__ = ["CW_CPU", "CW_PAPER", "CWSettings", "cw_linf"]


def cw_linf(
    model,
    x,
    y,
    *,
    epsilon: float,
    settings: CWSettings = CW_PAPER,
    jit_compile: bool = DEFAULT_JIT_COMPILE,
) -> AttackResult:
    """Carlini & Wagner's L-inf attack (their ``li_attack.py``), batched (:mod:`carlini_wagner`).

    ``settings`` (:class:`CWSettings`) holds every knob; the default is the paper's
    (``CW_PAPER``), ``CW_CPU`` a ~10x cheaper preset. A success is the last point of the tau
    schedule (Carlini & Wagner's answer) whose L-inf distance is ``<= epsilon``; it is clipped into
    ``N(x, epsilon)`` (a no-op up to rounding) and checked again with the model.

    Args:
      model: Keras model, images -> logits ``[N, K]``.
      x: images ``[N, H, W, C]``, pixels 0..255.
      y: labels ``[N]``: untargeted, the labels to move away from (true labels, or the model's
        predictions as in the paper's Table 2); targeted (``settings.targeted``), the targets.
      epsilon: L-inf budget in pixels for a success.
      settings: the schedule (pixel units for taus). Its ``stop_within_epsilon`` stops an example
        once it has a success within ``epsilon`` (the success mask is unchanged, ``x_adv`` is then
        that point instead of the smallest one): cheaper, not in the original.
      jit_compile: compile the search with XLA (the whole batch then runs to the end).

    Returns:
      :class:`AttackResult`: ``x_adv`` ``[N, ...]`` (``x`` where no success), ``success``,
      ``details["distance"]`` (L-inf of the last success of the schedule, pixels; ``inf`` if
      none; ``score`` is its negative) and ``details["iterations"]`` (forward+backward passes
      spent on each example, also ``base_passes``).
    """
    if not isinstance(settings, CWSettings):
        raise TypeError(f"settings must be a CWSettings; got {type(settings).__name__}.")
    x, y, _, epsilon = prepare(model, x, y, epsilon, "epsilon")
    if x.shape[0] == 0:
        return AttackResult.unattacked(
            x.numpy(), distance=np.zeros(0, np.float32), iterations=np.zeros(0, np.int32)
        )

    def build(net):
        def run(x, labels, eps):
            out = cw_schedule(
                net, x, labels, epsilon=eps, settings=settings, compact=not jit_compile
            )
            x_adv = projected.project(tf.where(bcast(out["within"], x), out["x_within"], x), x, eps)
            ok = out["within"] & goal(net(x_adv, training=False), labels, settings.targeted)
            x_adv = tf.where(bcast(ok, x), x_adv, x)
            # Where nothing was found x itself is returned: a success if x already meets the goal.
            ok = ok | goal(net(x, training=False), labels, settings.targeted)
            return x_adv, ok, out["distance"], out["iterations"]

        return run

    fn = compiled.cached(model, ("cw_linf", settings), build, jit_compile=jit_compile)
    x_adv, ok, dist, iters = fn(x, y, tf.constant(epsilon, tf.float32))
    dist, iters = dist.numpy(), iters.numpy()
    return AttackResult(
        x_adv.numpy(),
        ok.numpy(),
        base_passes=iters,
        score=-dist,
        details=dict(distance=dist, iterations=iters),
    )
