"""White-box and black-box attacks, as functions ``(model, x, y, *, epsilon, steps, ...)``.

Every attack returns one :class:`AttackResult` (the adversarial images, per-point success as the
attack saw it, and its cost as base forward+backward passes and shell predictions), and chains of
attacks ("attack only the points still standing, first success wins") are run by
:func:`run_standing`.

On base models:

- :func:`pgd`: L-inf projected gradient descent (Madry et al.), untargeted or targeted, with
  cross-entropy or CW-margin loss and random restarts; knobs in :class:`PGDSettings`.
- :func:`apgd_ce`, :func:`apgd_dlr`, :func:`apgd_t`: Auto-PGD (Croce & Hein 2020), L-inf, with
  the cross-entropy, DLR and targeted DLR losses, AutoAttack-style restarts; knobs in
  :class:`APGDSettings`.
- :func:`fab`, :func:`fab_t`: FAB (Croce & Hein 2020), the minimal L-inf adversarial point; knobs
  in :class:`FABSettings`.
- :func:`high_confidence`: for each point, the largest wrong-label confidence reachable in
  ``N(x, epsilon)`` (the search of the paper's separation test, Section 4 / Table 1).
- :func:`cw_linf`: Carlini & Wagner's L-inf attack, batched; knobs in :class:`CWSettings`
  (presets ``CW_PAPER``, ``CW_CPU``).
- :func:`square`: the score-based Square attack (also on shells); knobs in
  :class:`SquareSettings`.

On a model shell (adaptive attacks): :func:`bpda` (the identity approximation: untargeted or
targeted, fixed or APGD steps, EOT for random shells); :func:`bpda_restarts`,
:func:`bpda_targeted` chain runs on the points still standing; :func:`lift` attacks MCN_delta
through a wider ball of the base (:mod:`manifold_tf.attacks.bpda_suite`). Knobs in
:class:`BPDASettings` and :class:`LiftSettings`.

PGD and the high-confidence search are both one call of :func:`projected.projected_ascent`.
Each attack runs as one compiled ``tf.function`` per (model, static settings), cached in
:mod:`manifold_tf.compiled`, so repeated calls with the same input shape do not retrace (budgets,
step sizes and seeds are passed as tensors). Units: pixels (0..255) for images, budgets and step
sizes. Every returned image lies in its L-inf ball and in the box [0, 255].
"""

from manifold_tf import compiled as _compiled
from manifold_tf.attacks.apgd import (
    APGDSettings,
    apgd_ce,
    apgd_dlr,
    apgd_t,
    dlr_loss,
    dlr_targeted_loss,
)
from manifold_tf.attacks.bpda import BPDASettings, bpda
from manifold_tf.attacks.bpda_suite import (
    LiftSettings,
    bpda_restarts,
    bpda_targeted,
    lift,
    target_order,
)
from manifold_tf.attacks.carlini_wagner import CW_CPU, CW_PAPER, CWSettings, cw_linf
from manifold_tf.attacks.common import DEFAULT_JIT_COMPILE
from manifold_tf.attacks.fab import FABSettings, fab, fab_t, project_linf_hyperplane
from manifold_tf.attacks.high_confidence import high_confidence
from manifold_tf.attacks.pgd import LOSSES, PGDSettings, pgd
from manifold_tf.attacks.result import AttackResult
from manifold_tf.attacks.runner import Step, Suite, run_standing
from manifold_tf.attacks.square import SquareSettings, square

# The kinds of compiled function the attacks on base models register in manifold_tf.compiled.
_KINDS = ("pgd", "high_confidence", "cw_linf", "apgd", "square", "fab")


def tracing_counts(model) -> dict:
    """``{static settings: number of traces}`` of every base-model attack compiled for ``model``."""
    return {k: v for k, v in _compiled.tracing_counts(model).items() if k[0] in _KINDS}


__all__ = [
    "APGDSettings",
    "BPDASettings",
    "CW_CPU",
    "CW_PAPER",
    "CWSettings",
    "DEFAULT_JIT_COMPILE",
    "FABSettings",
    "LOSSES",
    "LiftSettings",
    "SquareSettings",
    "PGDSettings",
    "AttackResult",
    "Step",
    "Suite",
    "apgd_ce",
    "apgd_dlr",
    "apgd_t",
    "bpda",
    "bpda_restarts",
    "bpda_targeted",
    "cw_linf",
    "dlr_loss",
    "dlr_targeted_loss",
    "fab",
    "fab_t",
    "high_confidence",
    "lift",
    "pgd",
    "project_linf_hyperplane",
    "run_standing",
    "square",
    "target_order",
    "tracing_counts",
]
