"""Typed settings of every evaluation, with the paper's protocol as a named preset.

One dataclass per thing a user configures: the data and model (:class:`InputConfig`), where the run
lives (:class:`RunConfig`), the threat model (:class:`ThreatConfig`: the attacker's budget epsilon
and the shell's delta and p, shared by every protocol), and one per protocol
(:class:`AccuracyConfig`, :class:`SeparationConfig`, :class:`DefenceConfig` with its
:class:`BaseAttackConfig` and :class:`ShellConfig`, :class:`AdaptiveConfig`). The command-line flags
are generated from these fields (:mod:`manifold_tf.cli.flags`), so a setting is declared once, with
its help text, here.

A preset (:data:`manifold_tf.evaluation.presets.PRESETS`) is a named set of changes to the
defaults, as a nested dict of the :class:`EvaluationConfig` tree;
:func:`manifold_tf.evaluation.presets.make` builds a config from such changes (with any overrides
on top), so presets and flags apply to every setting the same way.

Units: pixels (0..255) for every radius, budget and step size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

from manifold_tf import projected, shells
from manifold_tf.cw_search import CWSettings
from manifold_tf.evaluation.adaptive_config import AdaptiveConfig
from manifold_tf.settings import setting
from manifold_tf.shells.registry import parse_kinds as shell_kinds
from manifold_tf.validation import (
    check_choice,
    check_int,
    check_positive,
    check_real,
    validate_radius,
)


def section(cls, prefix: str):
    """A nested config field: the settings of ``cls``, as flags named ``prefix + field``.

    The prefix is absolute (a section inside a section does not inherit its parent's).
    """
    return field(default_factory=cls, metadata={"section": cls, "prefix": prefix})


@dataclass(frozen=True)
class InputConfig:
    """What is evaluated: the model and the data."""

    checkpoint: str | None = setting(
        None, "TF1 checkpoint (prefix or dir), .keras or .weights.h5 (default: a shipped model)."
    )
    width: str | None = setting(
        None, "Model width, narrow or wide (default: detected).", choices=("narrow", "wide")
    )
    dataset: str = setting(
        "auto",
        "Data: cifar10, synthetic, or auto (cifar10 when a CIFAR-10 "
        "folder is known, else synthetic).",
        choices=("auto", "cifar10", "synthetic"),
    )
    data_dir: str | None = setting(
        None, "cifar-10-batches-py folder (default: $MANIFOLD_TF_CIFAR10_DIR)."
    )


@dataclass(frozen=True)
class RunConfig:
    """Where a run's files go and how an existing run directory is treated."""

    output_dir: str | None = setting(None, "Where reports go (default: results/<mode>).")
    seed: int = setting(0, "Seed for point selection and attacks.")
    resume: bool = setting(False, "Continue the run in --output_dir, skipping finished batches.")
    overwrite: bool = setting(False, "Replace the run in a non-empty --output_dir.")


P_AUTO = "auto"  # ThreatConfig.p: NCN's p chosen from held-out confidences (shells.calibrate)


@dataclass(frozen=True)
class ThreatConfig:
    """The threat model, one setting each for every protocol: the attacker's budget and the shell's
    radius and confidence level."""

    epsilon: float = setting(
        8.0, "Attacker's L-inf budget, pixels (0..255; 8 = 8/255), every mode."
    )
    delta: float = setting(
        8.0,
        "Radius delta of the separation test and of the shells (MCN radius, the cw shell's "
        "all_labels tau), pixels.",
    )
    # A string flag so that it can say "auto"; a number is stored as a float (__post_init__).
    p: str | float = setting(
        "0.9",
        "Confidence level p of the separation test and of the NCN shell, in (0, 1); "
        "auto (NCN): the --p_quantile quantile of the base model's top-label confidence "
        "on held-out test points (those after the evaluated ones in the walk order).",
    )

    def __post_init__(self):
        validate_radius(self.epsilon, "epsilon")
        validate_radius(self.delta, "delta")
        if isinstance(self.p, str) and self.p.strip().lower() == P_AUTO:
            object.__setattr__(self, "p", P_AUTO)  # resolved where the shell is built
            return
        try:
            p = float(self.p)
        except (TypeError, ValueError):
            raise ValueError(
                f"p must be a number in (0, 1) or {P_AUTO!r}; got {self.p!r}."
            ) from None
        if not 0.0 < p < 1.0:
            raise ValueError(f"p must lie in (0, 1); got {p} (a number, or {P_AUTO!r}).")
        object.__setattr__(self, "p", p)


@dataclass(frozen=True)
class AccuracyConfig:
    """Clean accuracy and PGD accuracy of a base model."""

    pgd_steps: int = setting(20, "PGD steps.")
    pgd_step_size: float = setting(2.0, "PGD step size, pixels.")
    pgd_restarts: int = setting(1, "PGD random restarts.")
    apgd_steps: int = setting(
        100, "APGD-CE and APGD-T iterations per run (AutoAttack: 100; 0 skips both)."
    )
    apgd_targets: int = setting(9, "APGD-T target classes (AutoAttack: 9).")
    batch_size: int = setting(128, "Images per attack batch.")
    num_examples: int | None = setting(None, "Evaluate only the first N test images.")

    def __post_init__(self):
        validate_radius(self.pgd_step_size, "pgd_step_size")
        check_int(self.pgd_steps, "pgd_steps", 0)
        check_int(self.pgd_restarts, "pgd_restarts", 1)
        check_int(self.apgd_steps, "apgd_steps", 0)
        check_int(self.apgd_targets, "apgd_targets", 1)
        check_int(self.batch_size, "batch_size", 1)
        if self.num_examples is not None:
            check_int(self.num_examples, "num_examples", 1)


@dataclass(frozen=True)
class SeparationConfig:
    """The (p, q, delta)-separation test (Table 1): the high-confidence search on random points.

    delta and p are the threat model's (:class:`ThreatConfig`).
    """

    batches: int = setting(10, "Batches of random test points (paper: 10).")
    batch_points: int = setting(30, "Points per batch (paper: 30).")
    steps: int = setting(20, "Ascent steps per wrong label.")
    step_size: float | None = setting(None, "Ascent step, pixels (default 2.5 * delta / steps).")
    optimizer: str = setting(
        "sign",
        "Ascent optimiser: " + " or ".join(projected.OPTIMIZERS) + ".",
        choices=projected.OPTIMIZERS,
    )
    random_start: bool = setting(False, "Start the ascent at a random point of the ball.")
    compare_checkpoint: str | None = setting(
        None, "A second model, run on the same points.", flag="compare_checkpoint"
    )
    extra_radius: float = setting(
        0.0,
        "Search N(x, delta + extra_radius): give epsilon to measure what an attacker of "
        "MCN_delta with budget epsilon can reach.",
    )
    convergence_steps: tuple[int, ...] = setting(
        (100, 200),
        "Rerun the search with these step counts (and once with a random restart) on "
        "the first convergence_batches batches, to show whether the count has "
        "converged.",
    )
    convergence_batches: int = setting(2, "Batches the convergence check reruns (0: none).")

    def __post_init__(self):
        check_int(self.batches, "batches", 1)
        check_int(self.batch_points, "batch_points", 1)
        check_int(self.steps, "steps", 0)
        check_choice(self.optimizer, "optimizer", projected.OPTIMIZERS)
        if self.step_size is not None:
            validate_radius(self.step_size, "step_size")
        validate_radius(self.extra_radius, "extra_radius")
        check_int(self.convergence_batches, "convergence_batches", 0)
        for steps in self.convergence_steps:
            check_int(steps, "convergence_steps", 1)

    def radius(self, delta: float) -> float:
        """The radius searched around the threat model's ``delta``: ``delta + extra_radius``
        pixels."""
        return float(delta + self.extra_radius)

    def attack(self, delta: float, steps: int | None = None) -> dict:
        """Keyword arguments of :func:`manifold_tf.attacks.high_confidence` (``steps`` overrides).

        ``delta``: the threat model's radius, pixels; the default step is Madry's rule over
        :meth:`radius`.
        """
        steps = int(self.steps if steps is None else steps)
        step = (
            self.step_size
            if self.step_size is not None
            else projected.madry_step_size(self.radius(delta), steps)
        )
        return dict(
            steps=steps,
            step_size=float(step),
            optimizer=self.optimizer,
            random_start=bool(self.random_start),
        )


@dataclass(frozen=True)
class BaseAttackConfig:
    """The transfer attack of Table 2: Carlini-Wagner L-inf on the base model."""

    max_iterations: int = setting(100, "Adam steps per constant (paper: 1000).")
    learning_rate: float = setting(5e-3, "Adam learning rate (paper: 5e-3).")
    initial_const: float = setting(
        1e-2,
        "First constant (paper: 1e-5). The paper's schedule spends 10 rounds of "
        "max_iterations at constants below 0.01, where the penalty dominates and nothing "
        "moves.",
    )
    largest_const: float = setting(20.0, "Largest constant (paper: 20).")
    stop_within_epsilon: bool = setting(
        True,
        "Stop a point once it has a success within epsilon (same success set; the paper's "
        "code shrinks tau further).",
    )
    from_run: str | None = setting(
        None,
        "Reuse the x' of an earlier run's output dir (same model, data, points and attack; "
        "checked) to compare shells cheaply.",
    )

    def __post_init__(self):
        check_int(self.max_iterations, "max_iterations", 1)
        check_positive(self.learning_rate, "learning_rate")
        check_positive(self.initial_const, "initial_const")
        if not check_positive(self.largest_const, "largest_const") > self.initial_const:
            raise ValueError(
                f"need initial_const < largest_const; got {self.initial_const} and "
                f"{self.largest_const}."
            )

    @functools.cached_property
    def cw_settings(self) -> CWSettings:
        """The attack's :class:`~manifold_tf.cw_search.CWSettings` (the paper's for the knobs not
        set here), built once and passed whole (``settings=`` of
        :func:`manifold_tf.attacks.cw_linf`); its ``recorded()`` is what reports record."""
        return CWSettings(
            max_iterations=self.max_iterations,
            stop_within_epsilon=self.stop_within_epsilon,
            learning_rate=self.learning_rate,
            initial_const=self.initial_const,
            largest_const=self.largest_const,
        )


@dataclass(frozen=True)
class ShellConfig:
    """The model shell around the base: a registered kind (MCN_delta, NCN_p, the paper's
    CarliniWagnerShell, Hedge, the anti-adversary, or one added with ``shells.register``).

    Its delta and p are the threat model's (:class:`ThreatConfig`). The shell registry
    (:func:`manifold_tf.shells.build`) reads the other fields by name.
    """

    kind: str = setting(
        "mcn",
        "Shell: mcn (Algorithm 1), ncn (Algorithm 2), cw (the paper's code), hedge (Wu et "
        "al. 2021) or anti_adversary (Alfarra et al. 2022), or a registered kind. Several, "
        "comma-separated (mcn,ncn,hedge): each judged on the same points with one run of the "
        "base's suite (comparison.json, .md, .png; each kind's reports in its own folder).",
        flag="shell",
    )
    optimizer: str = setting(
        "sign",
        "MCN optimiser: " + " or ".join(projected.OPTIMIZERS) + ".",
        choices=projected.OPTIMIZERS,
    )
    steps: int = setting(10, "Optimiser steps K per label (MCN; NCN per penalty round).")
    step_size: float | None = setting(
        None, "MCN step / Adam rate, pixels (default 2.5 * delta / K)."
    )
    random_start: bool = setting(False, "MCN ascent from a random point of the ball.")
    ncn_delta_max: float = setting(16.0, "NCN search box radius, pixels.")
    ncn_rounds: int = setting(3, "NCN penalty rounds (alpha values).")
    ncn_alpha: float = setting(1.0, "NCN first penalty weight.")
    ncn_alpha_factor: float = setting(10.0, "NCN penalty growth per round.")
    ncn_learning_rate: float = setting(0.05, "NCN Adam learning rate.")
    cw_variant: str = setting(
        "paper_code",
        "cw shell: the authors' code, or every label at tau = delta.",
        choices=("paper_code", "all_labels"),
    )
    cw_const: float = setting(0.1, "cw shell constant (all_labels).")
    cw_max_iterations: int = setting(100, "cw shell Adam steps per constant (paper: 1000).")
    hedge_steps: int = setting(20, "hedge: signed ascent steps of sum_k CE (Wu et al.: 20).")
    hedge_step_size: float = setting(
        1.785,
        "hedge: pixels per step (Wu et al.: 0.007 of the range = 1.785); its radius is --delta.",
    )
    hedge_random_start: bool = setting(
        True, "hedge: start at a random point of the ball (as Wu et al.)."
    )
    anti_steps: int = setting(
        2, "anti_adversary: steps K against the predicted label's loss (Alfarra et al.: 2)."
    )
    anti_step_size: float = setting(
        38.25, "anti_adversary: alpha, pixels per step (Alfarra et al.: 0.15 of the range = 38.25)."
    )
    anti_radius: float | None = setting(
        None,
        "anti_adversary: L-inf radius of its steps, pixels (default K * alpha: "
        "unconstrained, as Alfarra et al.).",
    )
    p_quantile: float = setting(
        0.5,
        "--p=auto: the quantile of the base's top-label confidence on held-out points that "
        "becomes NCN's p (0.5: the median).",
        flag="p_quantile",
    )
    p_calibration_points: int = setting(
        500,
        "--p=auto: held-out test points (those after the evaluated ones in the walk order) "
        "whose confidences choose p.",
        flag="p_calibration_points",
    )
    batch_size: int = setting(30, "Images per shell call (global, all devices).")
    jit_compile: bool | None = setting(None, "Compile the shell with XLA (default: the shell's).")

    def __post_init__(self):
        object.__setattr__(self, "kind", ",".join(shell_kinds(self.kind)))
        check_choice(self.optimizer, "shell_optimizer", projected.OPTIMIZERS)
        check_int(self.steps, "shell_steps", 0)
        check_int(self.batch_size, "shell_batch_size", 1)
        check_int(self.hedge_steps, "shell_hedge_steps", 0)
        check_int(self.anti_steps, "shell_anti_steps", 0)
        check_int(self.p_calibration_points, "p_calibration_points", 1)
        # Every kind's settings, not only the chosen kind's: a NaN given for another kind is still
        # a mistake, and the chosen kind's would otherwise surface only once data and model load.
        check_int(self.ncn_rounds, "shell_ncn_rounds", 1)
        check_int(self.cw_max_iterations, "shell_cw_max_iterations", 1)
        for name in ("step_size", "anti_radius"):
            if getattr(self, name) is not None:
                validate_radius(getattr(self, name), f"shell_{name}")
        for name in ("ncn_delta_max", "hedge_step_size", "anti_step_size"):
            validate_radius(getattr(self, name), f"shell_{name}")
        for name in ("ncn_alpha", "ncn_alpha_factor", "ncn_learning_rate", "cw_const"):
            check_positive(getattr(self, name), f"shell_{name}")
        if not 0.0 <= check_real(self.p_quantile, "p_quantile") <= 1.0:
            raise ValueError(f"p_quantile must lie in [0, 1] (a quantile); got {self.p_quantile}.")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The shell kinds, in the order given (one for a single-shell run)."""
        return tuple(self.kind.split(","))

    def for_kind(self, kind: str) -> ShellConfig:
        """These settings for one of :attr:`kinds`."""
        if kind not in self.kinds:
            raise ValueError(f"shell kind {kind!r} is not one of {self.kinds}.")
        return replace(self, kind=kind)

    def build(self, base, threat: ThreatConfig, *, seed: int = 0, p: float | None = None):
        """The shell around ``base`` at the threat model's delta and p (call inside the strategy
        scope the evaluation uses). ``p`` overrides ``threat.p``: it must be given when
        ``threat.p`` is ``"auto"`` (resolved by :func:`manifold_tf.shells.calibrate.resolve_p`)."""
        if len(self.kinds) > 1:
            raise ValueError(
                f"--shell={self.kind} names {len(self.kinds)} shells: build each with "
                f"for_kind(kind).build(...)."
            )
        if p is None:
            if threat.p == P_AUTO:
                raise ValueError(
                    "p='auto' must be resolved from held-out points before the shell "
                    "is built (manifold_tf.shells.calibrate.resolve_p)."
                )
            p = threat.p
        return shells.build(self.kind, base, self, delta=threat.delta, p=p, seed=seed)


@dataclass(frozen=True)
class DefenceConfig:
    """Table 2: CW on the base model, the shell applied to x and x' (paper, Section 6).

    The budget epsilon is the threat model's (:class:`ThreatConfig`).
    """

    batches: int = setting(5, "Batches of base-correct test points (paper: 5).")
    batch_points: int = setting(30, "Points per batch (paper: 30).")
    permutation: str = setting(
        "numpy",
        "Order of test points (paper: Python random.sample, seed 123, reversed).",
        choices=("numpy", "paper"),
    )
    points: str = setting(
        "walked",
        "Table 2's points: walked = the base-correct ones among the first --num_points "
        "of the order (the adaptive evaluation's points); paper = batches x "
        "batch_points base-correct points.",
        choices=("walked", "paper"),
    )
    strategy: str = setting(
        "default",
        "Spread shell batches over devices (MirroredStrategy).",
        choices=("default", "mirrored"),
    )
    shell: ShellConfig = section(ShellConfig, "shell_")
    attack: BaseAttackConfig = section(BaseAttackConfig, "base_attack_")

    def __post_init__(self):
        check_int(self.batches, "batches", 1)
        check_int(self.batch_points, "batch_points", 1)


MODES = ("accuracy", "separation", "defence")


@dataclass(frozen=True)
class EvaluationConfig:
    """Everything one ``evaluate.py`` run needs: the mode and every protocol's settings.

    Each section's settings are flags named with its prefix (``section``): the threat model's and
    accuracy mode's without one, ``--separation_*``, ``--defence_*``, ``--shell_*``,
    ``--base_attack_*``, ``--adaptive_*``.
    """

    mode: str = "accuracy"
    inputs: InputConfig = section(InputConfig, "")
    run: RunConfig = section(RunConfig, "")
    threat: ThreatConfig = section(ThreatConfig, "")
    accuracy: AccuracyConfig = section(AccuracyConfig, "")
    separation: SeparationConfig = section(SeparationConfig, "separation_")
    defence: DefenceConfig = section(DefenceConfig, "defence_")
    adaptive: AdaptiveConfig = section(AdaptiveConfig, "adaptive_")

    def __post_init__(self):
        check_choice(self.mode, "mode", MODES)
        if self.mode != "defence" and self.defence.attack.from_run:
            raise ValueError(
                "--base_attack_from_run belongs to the defence evaluation: give "
                "--shell=KIND (a registered shell kind, e.g. mcn) or --mode=defence."
            )
