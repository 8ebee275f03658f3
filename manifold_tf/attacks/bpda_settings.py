"""The knobs of BPDA and of the ``lift`` attack, as frozen dataclasses validated on construction.

:class:`BPDASettings` is passed whole to :func:`~manifold_tf.attacks.bpda.bpda`,
:func:`~manifold_tf.attacks.bpda_suite.bpda_restarts` and
:func:`~manifold_tf.attacks.bpda_suite.bpda_targeted`; :class:`LiftSettings` to
:func:`~manifold_tf.attacks.bpda_suite.lift`. What varies per call (``epsilon``, a start
``x_init``, ``target``, ``seed``, ``known``, ``progress``) stays an argument of the attack.
Units: pixels (0..255) and attack steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from manifold_tf.projected import SCHEDULES
from manifold_tf.shells import FactorShell
from manifold_tf.validation import check_choice, check_int, validate_radius


def check_num_targets(num_targets, num_classes: int | None = None) -> int | str:
    """``"all"`` or an int ``>= 1`` (at most ``num_classes - 1``, the wrong labels, when given);
    returns the number of targets (``"all"`` kept as is without ``num_classes``)."""
    if num_targets == "all":
        return num_targets if num_classes is None else num_classes - 1
    k = check_int(num_targets, "num_targets", 1)
    if num_classes is not None and k > num_classes - 1:
        raise ValueError(
            f"num_targets must be 'all' or 1..{num_classes - 1} (the wrong labels); "
            f"got {num_targets!r}."
        )
    return k


@dataclass(frozen=True)
class BPDASettings:
    """BPDA's knobs (see :func:`~manifold_tf.attacks.bpda.bpda` for what each one does).

    Attributes:
      steps: attack steps per run, ``>= 0``.
      schedule: ``"sign"`` (fixed signed steps) or ``"apgd"`` (Auto-PGD's schedule and momentum).
      step_size: pixels per signed step of ``"sign"`` (``None``: ``2.5 * epsilon / steps``); not
        with ``"apgd"``, which starts at ``2 * epsilon`` and halves it.
      random_start: one run starts uniformly in ``N(x, epsilon)`` (not with an ``x_init``; the
        chains of :mod:`~manifold_tf.attacks.bpda_suite` take ``random_restarts`` instead).
      eot_samples: for a shell with ``random_start``: average the gradient and the progress
        measure over this many copies with other seeds (0: use the shell's own evaluation).
        Ignored for deterministic shells.
      warm_steps: with ``> 0`` (a deterministic shell that offers
        :meth:`~manifold_tf.shells.FactorShell.warm_search`), the steps between the first and
        the last evaluate the attacker's approximation of the shell instead of the shell: its
        search warm-started from the previous step's points, ``warm_steps`` steps per label.
        Every success it claims is checked with the shell itself (and the last iterate is
        always the shell's), so reported successes stay the shell's; only the gradient and
        the progress measure come from the approximation. Not with a ``proxy``.
      proxy: a cheaper copy of the shell (``shell.proxy(steps=..., labels=...)``, issue 22's
        surrogate) to steer by: the steps between the first and the last take their gradient,
        progress measure and decisions from it (and EOT's copies are its copies); every success
        it claims is checked on the shell before the point is frozen (the point goes on if the
        shell disagrees), the first and last iterates are the shell's, and at the end each
        point's best iterate by the proxy's margin is checked on the shell too. A proxy
        searching some labels only searches ``y``, the target and the best wrong labels by the
        shell's ranking at the start. ``None`` (or the shell itself): the shell at every step.
      from_x, random_restarts: the starts of ``bpda_restarts`` / ``bpda_targeted``: ``x``, then
        the call's ``x_init``, then this many seeded uniform points of the ball.
      num_targets: ``bpda_targeted``'s best wrong labels tried, an int ``>= 1`` or ``"all"``.
    """

    steps: int = 20
    schedule: str = "sign"
    step_size: float | None = None
    random_start: bool = False
    eot_samples: int = 0
    warm_steps: int = 0
    proxy: FactorShell | None = None
    from_x: bool = True
    random_restarts: int = 0
    num_targets: int | str = 3

    def __post_init__(self):
        for name in ("steps", "eot_samples", "warm_steps", "random_restarts"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, 0))
        check_choice(self.schedule, "schedule", SCHEDULES)
        if self.step_size is not None:
            if self.schedule == "apgd":
                raise ValueError(
                    f"step_size is for schedule='sign'; APGD starts at 2 * epsilon and halves "
                    f"it (got step_size={self.step_size})."
                )
            validate_radius(self.step_size, "step_size")
        if self.proxy is not None and not isinstance(self.proxy, FactorShell):
            raise ValueError(
                f"proxy must be a copy of the shell (shell.proxy(...)); got "
                f"{type(self.proxy).__name__}."
            )
        object.__setattr__(self, "num_targets", check_num_targets(self.num_targets))
        for name in ("random_start", "from_x"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}.")


@dataclass(frozen=True)
class LiftSettings:
    """The ``lift`` attack's knobs (see :func:`~manifold_tf.attacks.bpda_suite.lift`).

    Attributes:
      delta: the shell's radius in pixels (``None``: ``shell.search_radius``).
      num_targets: best wrong labels tried, an int ``>= 1`` or ``"all"``.
      steps, schedule: the base's ascent over ``N(x, epsilon + delta)`` (``"apgd"`` or ``"sign"``).
      bpda_steps, eot_samples: the follow-up targeted BPDA from the lifted point (APGD schedule;
        ``bpda_steps = 0``: only the shell's check of that point).
    """

    delta: float | None = None
    num_targets: int | str = "all"
    steps: int = 20
    schedule: str = "apgd"
    bpda_steps: int = 0
    eot_samples: int = 0

    def __post_init__(self):
        for name in ("steps", "bpda_steps", "eot_samples"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, 0))
        check_choice(self.schedule, "schedule", SCHEDULES)
        if self.delta is not None:
            validate_radius(self.delta, "delta")
        object.__setattr__(self, "num_targets", check_num_targets(self.num_targets))


# One run's defaults (bpda: signed steps) and the chains' (bpda_restarts, bpda_targeted: APGD).
DEFAULT_BPDA = BPDASettings()
DEFAULT_CHAIN = BPDASettings(schedule="apgd")
DEFAULT_LIFT = LiftSettings()
