"""White-box and black-box attacks, as functions ``(model, x, y, *, budget, ...) -> x_adv``.

- :func:`pgd`: L-inf projected gradient descent (Madry et al.), untargeted or targeted, with
  cross-entropy or CW-margin loss and random restarts.
- :func:`apgd_ce`, :func:`apgd_dlr`, :func:`apgd_t`: Auto-PGD (Croce & Hein 2020), L-inf, with
  the cross-entropy, DLR and targeted DLR losses, AutoAttack-style restarts.
- :func:`high_confidence`: for each point, the largest wrong-label confidence reachable in
  ``N(x, delta)`` (the search of the paper's separation test, Section 4 / Table 1).
- :func:`bpda`: BPDA with the identity approximation, on a model shell (adaptive attack):
  untargeted or targeted, fixed or APGD steps, EOT for random shells; :func:`bpda_restarts`,
  :func:`bpda_targeted` chain runs on the points still standing; :func:`lift` attacks MCN_delta
  through a wider ball of the base (:mod:`manifold_tf.attacks.bpda_suite`).
- :func:`cw_linf` / :func:`cw_linf_details`: Carlini & Wagner's L-inf attack, batched;
  :func:`cw_inner` is its fixed-(tau, const) inner loop, reusable inside another ``tf.function``
  (the paper's CarliniWagnerShell).

PGD and the high-confidence search are both one call of :func:`projected.projected_ascent`.
Each attack runs as one compiled ``tf.function`` per (model, static settings), cached in
:mod:`manifold_tf.compiled`, so repeated calls with the same input shape do not retrace (budgets,
step sizes and seeds are passed as tensors). Units: pixels (0..255) for images, budgets and step
sizes. Every returned image lies in its L-inf ball and in the box [0, 255].
"""

from manifold_tf.attacks.apgd import apgd_ce, apgd_dlr, apgd_t, dlr_loss, dlr_targeted_loss
from manifold_tf.attacks.bpda import bpda
from manifold_tf.attacks.bpda_suite import bpda_restarts, bpda_targeted, lift, target_order
from manifold_tf.attacks.carlini_wagner import (
    CW_CPU,
    CW_PAPER,
    cw_inner,
    cw_linf,
    cw_linf_details,
    cw_schedule,
    from_tanh_space,
    to_tanh_space,
)
from manifold_tf.attacks.common import DEFAULT_JIT_COMPILE
from manifold_tf.attacks.high_confidence import high_confidence
from manifold_tf.attacks.pgd import LOSSES, pgd
from manifold_tf.attacks.square import square
from manifold_tf import compiled as _compiled

# The kinds of compiled function the attacks on base models register in manifold_tf.compiled.
_KINDS = ("pgd", "high_confidence", "cw_linf", "apgd", "square")


def tracing_counts(model) -> dict:
    """``{static settings: number of traces}`` of every base-model attack compiled for ``model``."""
    return {k: v for k, v in _compiled.tracing_counts(model).items() if k[0] in _KINDS}

__all__ = [
    "CW_CPU",
    "CW_PAPER",
    "DEFAULT_JIT_COMPILE",
    "LOSSES",
    "apgd_ce",
    "apgd_dlr",
    "apgd_t",
    "bpda",
    "bpda_restarts",
    "bpda_targeted",
    "cw_inner",
    "cw_linf",
    "cw_linf_details",
    "cw_schedule",
    "dlr_loss",
    "dlr_targeted_loss",
    "from_tanh_space",
    "high_confidence",
    "lift",
    "pgd",
    "square",
    "target_order",
    "to_tanh_space",
    "tracing_counts",
]
