"""The verdict's settings: :class:`AdaptiveConfig` (the attack suites, their budgets, when to stop).

Part of the typed settings of :mod:`manifold_tf.evaluation.config` (which re-exports it), in a
module of its own because it is the largest section. Units: pixels (0..255) and attack steps.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from manifold_tf.attacks.bpda_settings import BPDASettings
from manifold_tf.evaluation.paired_intervals import DEFAULT_METHOD, PAIRED_METHODS
from manifold_tf.settings import setting
from manifold_tf.validation import check_choice, check_int, validate_radius

SHELL_ATTACKS = ("transfer_cw", "transfer_confident", "lift", "bpda", "bpda_targeted", "square")
# The attacks on the base alone, AutoAttack's standard version in this order.
BASE_ATTACKS = ("apgd_ce", "apgd_t", "fab_t", "square")
UNTIL = ("points", "decided")
PROXIED_ATTACKS = ("bpda", "bpda_targeted", "square")  # the attacks that steer by a cheaper copy
NO_BUDGET = ("", "none", "off")

_BUDGET_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_budget(text: str) -> float:
    """Seconds of a wall-time budget written ``"90s"``, ``"10m"``, ``"1.5h"`` (a bare number:
    seconds). Raises ValueError naming ``text`` when it is not such a positive, finite time."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text).lower())
    seconds = float(match.group(1)) * _BUDGET_UNITS[match.group(2) or "s"] if match else math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"budget must be a positive wall time such as 90s, 10m or 1h; got {text!r}."
        )
    return seconds


@dataclass(frozen=True)
class AdaptiveConfig:
    """The verdict: a worst-case attack suite on the shell, and on the base alone, on the same
    points.

    Points: the first ``num_points`` of the seeded walk order (all of them, right or wrong at x).
    Every attack runs only on the points still standing, AutoAttack style; a point is robust if it
    is right at x and at every attack's x'. Budgets are in pixels and attack steps.
    """

    attack: str = setting(
        "suite",
        "Attack the shell itself after Table 2 (the verdict), or not.",
        choices=("none", "suite"),
        flag="adaptive",
    )
    num_points: int = setting(
        100,
        "Points of the seeded order evaluated at most (all if the data has fewer); "
        "--adaptive_budget and --adaptive_until=decided may stop earlier.",
        flag="num_points",
    )
    until: str = setting(
        "points",
        "Stop after num_points points, or (decided) as soon as an "
        "anytime-valid 95% interval on the paired robust difference "
        "(shell minus base) excludes 0 (the shell helps, or hurts) or "
        "lies below margin (it gains less than margin).",
        choices=UNTIL,
    )
    margin: float = setting(
        5.0,
        "Percentage points (0..100) for --adaptive_until=decided: an interval on the robust "
        "difference below margin decides 'the shell gains less than margin'.",
    )
    paired_interval: str = setting(
        DEFAULT_METHOD,
        "The fixed-n 95% interval of the paired differences (shell minus base): "
        + ", ".join(PAIRED_METHODS)
        + " (tango: the one measured to keep its coverage with few discordant points; "
        "manifold_tf.evaluation.coverage).",
        choices=PAIRED_METHODS,
        flag="paired_interval",
    )
    budget: str | None = setting(
        "9m",
        "Wall-time budget of the adaptive evaluation, e.g. 90s, 10m, 1h, or none. Holds within "
        "one attack step: a batch it cuts is dropped whole, so the points evaluated are the "
        "first n of the order, whole batches (a fixed design: fixed-n interval). --resume with "
        "a larger budget goes on.",
    )
    shell_attacks: tuple[str, ...] = setting(
        SHELL_ATTACKS, "Attacks on the shell, in order: " + ", ".join(SHELL_ATTACKS) + "."
    )
    steps: int = setting(20, "BPDA steps per run (each one shell prediction).")
    warm_steps: int = setting(
        0,
        "BPDA steps between the first and the last evaluate a warm-started approximation of "
        "the shell (this many search steps per label, from the previous step's points) instead "
        "of the shell; every success it claims is checked with the shell. Faster (1.5x on the "
        "CIFAR sample) but measured weaker on the synthetic default, so off by default (0: the "
        "shell at every step).",
    )
    proxy_steps: int | None = setting(
        None,
        "BPDA and targeted BPDA (and their EOT) on the shell steer by a cheaper copy of it "
        "(FactorShell.proxy) with this many inner steps: MCN's, Hedge's and the "
        "anti-adversary's steps, NCN's steps per round, the CW shell's iterations (at most the "
        "shell's own; 0: the shell's own). Every success, and each run's first, last and best "
        "iterate, is checked on the shell itself. Unset (with proxy_labels): the shell's "
        "measured choice per attack (FactorShell.default_proxy; MCN: BPDA half its steps on y "
        "and 1 wrong label, targeted BPDA its own steps on y and the target, "
        "BUILD.md; the others: the shell itself).",
    )
    proxy_labels: int | None = setting(
        None,
        "MCN/NCN: that copy searches, per point, y and this many wrong labels (the shell's "
        "best at the attack's start; a targeted run's target among them). 0: every label. "
        "Unset (with proxy_steps): the shell's measured choice.",
    )
    square_proxy_steps: int | None = setting(
        None,
        "Square on the shell queries a copy of it with this many inner steps (and "
        "proxy_labels wrong labels per point, the shell's best at x; unset: every label); its "
        "successes are verified on the shell itself. 0: the shell's own steps. Unset: "
        "proxy_steps if set, else the shell's measured choice (MCN: half its steps, y and the "
        "best wrong label at x).",
    )
    restarts: int = setting(
        0, "BPDA random restarts (besides the starts at x and at the transfer x')."
    )
    targets: int = setting(2, "Targeted BPDA / lift: the shell's top wrong labels tried (0: all).")
    lift_steps: int = setting(20, "Lift attack: base ascent steps over N(x, epsilon + delta).")
    square_queries: int = setting(
        30, "Square attack queries per point (each one shell prediction)."
    )
    eot_samples: int = setting(
        4, "EOT samples per step for a shell with randomness (random_start)."
    )
    random_draws: int = setting(
        5,
        "A random shell's clean and robust outcomes come from this many fresh predictions per "
        "point (run 0 the attacked shell, the others fresh seeds): a point counts only if every "
        "one is right (worst of k); the report adds the mean over the runs. A deterministic "
        "shell predicts once whatever this says.",
    )
    base_attacks: tuple[str, ...] = setting(
        ("apgd_ce", "apgd_t"),
        "Attacks on the base alone, in order, from: "
        + ", ".join(BASE_ATTACKS)
        + " (AutoAttack's standard version: all four).",
    )
    base_apgd_steps: int = setting(100, "APGD-CE / APGD-T steps on the base alone.")
    base_targets: int = setting(
        3,
        "APGD-T / FAB-T target labels on the base alone, the base's highest-ranked wrong labels "
        "first (AutoAttack and --preset=full: 9; on the CIFAR sample's first 30 points APGD-T's "
        "one success came from the first target, and the other 11 points it tried stood "
        "against all 9, BUILD.md).",
    )
    base_square_queries: int = setting(
        5000, "Square attack queries per point on the base alone (AutoAttack: 5000)."
    )
    sanity_points: int = setting(10, "Points of the sanity checks (epsilon sweep, epsilon = 0).")
    sanity_steps: int = setting(10, "BPDA steps of the epsilon sweep.")
    large_epsilon: float = setting(64.0, "The sweep's large budget, where success must reach 99%.")

    def __post_init__(self):
        check_int(self.num_points, "num_points", 1)
        check_choice(self.until, "adaptive_until", UNTIL)
        check_choice(self.paired_interval, "paired_interval", PAIRED_METHODS)
        margin = float(self.margin)
        if not (math.isfinite(margin) and 0.0 <= margin <= 100.0):
            raise ValueError(
                f"adaptive_margin is in percentage points, 0..100; got {self.margin!r}."
            )
        if isinstance(self.budget, str) and self.budget.strip().lower() in NO_BUDGET:
            object.__setattr__(self, "budget", None)  # --adaptive_budget=none lifts a preset's
        if self.budget is not None:
            parse_budget(self.budget)
        for name in (
            "steps",
            "restarts",
            "targets",
            "warm_steps",
            "lift_steps",
            "square_queries",
            "eot_samples",
            "base_apgd_steps",
            "base_square_queries",
            "sanity_points",
            "sanity_steps",
        ):
            check_int(getattr(self, name), name, 0)
        for name in ("proxy_steps", "proxy_labels", "square_proxy_steps"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, 0)
        check_int(self.base_targets, "base_targets", 1)
        check_int(self.random_draws, "random_draws", 1)
        for name in self.shell_attacks:
            check_choice(name, "shell_attacks", SHELL_ATTACKS)
        for name in self.base_attacks:
            check_choice(name, "base_attacks", BASE_ATTACKS)
        validate_radius(self.large_epsilon, "large_epsilon")

    def attack_proxy(self, shell, *, attack: str = "bpda"):
        """The copy of ``shell`` that ``attack`` (``"bpda"``, ``"bpda_targeted"``, ``"square"``)
        steers by: ``shell.proxy(steps=proxy_steps, labels=proxy_labels)`` (Square's steps:
        ``square_proxy_steps`` or else ``proxy_steps``); ``shell.default_proxy(attack=...)``
        when those are unset; the shell itself when they are 0."""
        check_choice(attack, "attack", PROXIED_ATTACKS)
        if attack == "square":
            steps = self.square_proxy_steps
            steps = self.proxy_steps if steps is None else steps
            if steps is None and self.proxy_labels is None:
                return shell.default_proxy(attack="square")
            return shell.proxy(steps=steps or None, labels=self.proxy_labels or None)
        if self.proxy_steps is None and self.proxy_labels is None:
            return shell.default_proxy(attack=attack)
        return shell.proxy(steps=self.proxy_steps or None, labels=self.proxy_labels or None)

    def bpda_settings(self, shell, *, attack: str = "bpda") -> BPDASettings:
        """The knobs of the suite's BPDA on ``shell``: ``steps`` APGD steps, ``eot_samples`` EOT
        copies for a random shell (none for a deterministic one), ``warm_steps``, steering by
        :meth:`attack_proxy`. ``"bpda"`` starts from x, the transfer x' and ``restarts`` random
        points; ``"bpda_targeted"`` from the transfer x' alone, for ``targets`` wrong labels
        (0: all)."""
        check_choice(attack, "attack", ("bpda", "bpda_targeted"))
        common = dict(
            steps=self.steps,
            schedule="apgd",
            eot_samples=self.eot_samples if shell.is_random else 0,
            warm_steps=self.warm_steps,
            proxy=self.attack_proxy(shell, attack=attack),
        )
        if attack == "bpda":
            return BPDASettings(**common, from_x=True, random_restarts=self.restarts)
        targets = "all" if self.targets == 0 else self.targets
        return BPDASettings(**common, from_x=False, num_targets=targets)

    def proxies(self, shell) -> dict:
        """What each proxied attack steers by, resolved for ``shell`` (JSON form, recorded with a
        verdict's settings so that a changed default cannot be resumed into): per attack, the
        copy's base passes per prediction and its wrong labels per point (None: every label);
        ``{}`` for a shell that is its own copy throughout."""
        out = {}
        for attack in PROXIED_ATTACKS:
            copy = self.attack_proxy(shell, attack=attack)
            if copy is not shell:
                out[attack] = dict(
                    passes_per_prediction=int(copy.passes_per_prediction()),
                    labels=copy.proxy_labels,
                )
        return out

    @property
    def budget_seconds(self) -> float | None:
        """The wall-time budget in seconds (``None``: no budget)."""
        return None if self.budget is None else parse_budget(self.budget)
