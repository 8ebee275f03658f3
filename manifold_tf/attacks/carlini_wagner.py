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
from manifold_tf.cw_search import CW_CPU, CW_PAPER, cw_schedule
from manifold_tf.validation import check_int, check_positive, check_real, validate_radius

__all__ = ["CW_CPU", "CW_PAPER", "cw_linf", "cw_settings"]


def cw_linf(
    model,
    x,
    y,
    *,
    epsilon: float,
    targeted: bool = False,
    max_iterations: int = CW_PAPER["max_iterations"],
    learning_rate: float = CW_PAPER["learning_rate"],
    initial_const: float = CW_PAPER["initial_const"],
    const_factor: float = CW_PAPER["const_factor"],
    largest_const: float = CW_PAPER["largest_const"],
    initial_tau: float = CW_PAPER["initial_tau"],
    decrease_factor: float = CW_PAPER["decrease_factor"],
    min_tau: float = CW_PAPER["min_tau"],
    stop_within_epsilon: bool = False,
    max_total_iterations: int | None = None,
    jit_compile: bool = DEFAULT_JIT_COMPILE,
) -> AttackResult:
    """Carlini & Wagner's L-inf attack (their ``li_attack.py``), batched (:mod:`carlini_wagner`).

    The defaults are the paper's settings (``CW_PAPER``); ``**CW_CPU`` is a ~10x cheaper preset.
    A success is the last point of the tau schedule (Carlini & Wagner's answer) whose L-inf
    distance is ``<= epsilon``; it is clipped into ``N(x, epsilon)`` (a no-op up to rounding) and
    checked again with the model.

    Args:
      model: Keras model, images -> logits ``[N, K]``.
      x: images ``[N, H, W, C]``, pixels 0..255.
      y: labels ``[N]``: untargeted, the labels to move away from (true labels, or the model's
        predictions as in the paper's Table 2); targeted, the targets.
      epsilon: L-inf budget in pixels for a success.
      max_iterations ... min_tau: the schedule (pixel units for taus); see :data:`CW_PAPER`.
      stop_within_epsilon: stop an example once it has a success within ``epsilon`` (the success
        mask is unchanged, ``x_adv`` is then that point instead of the smallest one): cheaper, not
        in the original.
      max_total_iterations: safety cap on the loop length (``None``: none).

    Returns:
      :class:`AttackResult`: ``x_adv`` ``[N, ...]`` (``x`` where no success), ``success``,
      ``details["distance"]`` (L-inf of the last success of the schedule, pixels; ``inf`` if
      none; ``score`` is its negative) and ``details["iterations"]`` (forward+backward passes
      spent on each example, also ``base_passes``). :func:`cw_settings` gives the knobs used.
    """
    settings = cw_settings(
        targeted=targeted,
        max_iterations=max_iterations,
        learning_rate=learning_rate,
        initial_const=initial_const,
        const_factor=const_factor,
        largest_const=largest_const,
        initial_tau=initial_tau,
        decrease_factor=decrease_factor,
        min_tau=min_tau,
        stop_within_epsilon=stop_within_epsilon,
        max_total_iterations=max_total_iterations,
    )
    x, y, _, epsilon = prepare(model, x, y, epsilon, "epsilon")
    if x.shape[0] == 0:
        return AttackResult.unattacked(
            x.numpy(), distance=np.zeros(0, np.float32), iterations=np.zeros(0, np.int32)
        )
    key = ("cw_linf",) + tuple(sorted(settings.items()))

    def build(net):
        def run(x, labels, eps):
            out = cw_schedule(net, x, labels, epsilon=eps, compact=not jit_compile, **settings)
            x_adv = projected.project(tf.where(bcast(out["within"], x), out["x_within"], x), x, eps)
            ok = out["within"] & goal(net(x_adv, training=False), labels, settings["targeted"])
            x_adv = tf.where(bcast(ok, x), x_adv, x)
            # Where nothing was found x itself is returned: a success if x already meets the goal.
            ok = ok | goal(net(x, training=False), labels, settings["targeted"])
            return x_adv, ok, out["distance"], out["iterations"]

        return run

    fn = compiled.cached(model, key, build, jit_compile=jit_compile)
    x_adv, ok, dist, iters = fn(x, y, tf.constant(epsilon, tf.float32))
    dist, iters = dist.numpy(), iters.numpy()
    return AttackResult(
        x_adv.numpy(),
        ok.numpy(),
        base_passes=iters,
        score=-dist,
        details=dict(distance=dist, iterations=iters),
    )


def cw_settings(
    *,
    targeted: bool = False,
    max_iterations: int = CW_PAPER["max_iterations"],
    learning_rate: float = CW_PAPER["learning_rate"],
    initial_const: float = CW_PAPER["initial_const"],
    const_factor: float = CW_PAPER["const_factor"],
    largest_const: float = CW_PAPER["largest_const"],
    initial_tau: float = CW_PAPER["initial_tau"],
    decrease_factor: float = CW_PAPER["decrease_factor"],
    min_tau: float = CW_PAPER["min_tau"],
    stop_within_epsilon: bool = False,
    max_total_iterations: int | None = None,
) -> dict:
    """The validated knobs of :func:`cw_linf` (defaults: the paper's, ``CW_PAPER``), as a dict."""
    settings = dict(
        targeted=bool(targeted),
        max_iterations=check_int(max_iterations, "max_iterations", 1),
        learning_rate=check_positive(learning_rate, "learning_rate"),
        initial_const=check_real(initial_const, "initial_const"),
        const_factor=check_real(const_factor, "const_factor"),
        largest_const=check_real(largest_const, "largest_const"),
        initial_tau=validate_radius(initial_tau, "initial_tau"),
        decrease_factor=check_real(decrease_factor, "decrease_factor"),
        min_tau=validate_radius(min_tau, "min_tau"),
        stop_within_epsilon=bool(stop_within_epsilon),
        max_total_iterations=(
            None
            if max_total_iterations is None
            else check_int(max_total_iterations, "max_total_iterations", 1)
        ),
    )
    if not 0.0 < settings["decrease_factor"] < 1.0:
        raise ValueError(f"decrease_factor must be in (0, 1); got {decrease_factor}.")
    if not settings["const_factor"] > 1.0:  # NaN too
        raise ValueError(f"const_factor must be > 1; got {const_factor}.")
    if not 0.0 < settings["initial_const"] < settings["largest_const"]:
        raise ValueError(
            f"need 0 < initial_const < largest_const; got {initial_const} and {largest_const}."
        )
    if settings["learning_rate"] <= 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
    return settings
