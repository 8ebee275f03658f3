"""The two attack suites of the adaptive evaluation, as lists of :class:`~manifold_tf.attacks.Step`.

The shell G and its base F are attacked on the same points, each by its own strongest attacks
(METHOD.md, "Adaptive evaluation"); both suites run through
:func:`~manifold_tf.attacks.run_standing` (each attack on the points still standing, the first
verified success wins):

- F alone: the paper's CW L-inf (the transfer ``x'``), then ``config.base_attacks`` in order:
  APGD-CE, APGD-T (the DLR loss, ``base_targets`` target labels), FAB-T, Square.
- G: ``transfer_cw`` (the paper's CW x' on F), ``transfer_confident`` (the most confident wrong
  point of ``N(x, epsilon)`` for F: the separation search), ``lift`` (MCN answers the label that can
  be made most confident within delta of its input: a confident point of ``N(x, epsilon + delta)``
  clipped into ``N(x, epsilon)``), ``bpda`` (identity BPDA, APGD schedule, from x, from the
  transfer x' and random starts), ``bpda_targeted`` (the shell's top wrong labels) and ``square``
  (score-based black box on the shell's probabilities; it tells whether gradients are masked).
  BPDA, targeted BPDA and Square steer by the shell's cheaper copy
  (:meth:`AdaptiveConfig.attack_proxy`); every success is verified on the shell itself.

Units: pixels (0..255).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from absl import logging

from manifold_tf import attacks, reporting, seeds
from manifold_tf.attacks import AttackResult, Step
from manifold_tf.attacks.known import KnownOutputs, embed
from manifold_tf.attacks.surrogate import proxy_slots
from manifold_tf.evaluation.config import AdaptiveConfig
from manifold_tf.projected import madry_step_size
from manifold_tf.shells import FactorShell


class Ticker:
    """A throttled progress callback for an attack: a line with counts, rate and ETA every 20 s."""

    def __init__(self, desc: str, every: float = 20.0):
        self.desc, self.every = desc, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done, total=None, standing=None):
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if total and rate > 0 else float("nan")
        logging.info(
            f"{self.desc}: {done}/{total if total else '?'} steps, {rate:.2g} steps/s, "
            f"ETA {reporting.format_duration(eta)}"
            + (f", {standing} points standing" if standing is not None else "")
        )


def in_ball(step: Step, x: np.ndarray, epsilon: float) -> Step:
    """``step`` with its ``x_adv`` clipped into ``N(x, epsilon)`` and the box: a success is only
    counted inside the threat model, whatever an attack returns (float rounding included)."""
    lo, hi = np.maximum(x - epsilon, 0.0), np.minimum(x + epsilon, 255.0)

    def run(xs, ys, idx):
        out = step.run(xs, ys, idx)
        return out.replace(x_adv=np.clip(out.x_adv, lo[idx], hi[idx]))

    return Step(step.name, run)


def given(name: str, x_given: np.ndarray) -> Step:
    """A transfer attack whose ``x'`` is already known: no cost, success left to verification."""
    return Step(name, lambda xs, ys, idx: AttackResult(x_given[idx], np.zeros(len(idx), bool)))


@dataclass(frozen=True, eq=False)
class ShellTarget:
    """What every attack of :func:`shell_suite` is given besides its settings: the shell and its
    base, CW's ``x'`` on F ``[N, H, W, C]`` (pixels), the budget ``epsilon`` (pixels), the batch's
    per-point seeds int64 ``[N]``, the shell's known outputs and the progress lines' prefix."""

    shell: FactorShell
    base: keras.Model
    x_cw: np.ndarray
    epsilon: float
    seed: np.ndarray
    known: KnownOutputs | None
    desc: str


@dataclass(frozen=True)
class ShellSquare:
    """Square on the shell: the copy it queries (the shell or its proxy) and Square's knobs."""

    model: FactorShell
    settings: attacks.SquareSettings


def _transfer_cw(t: ShellTarget, settings: None, xs, ys, idx) -> AttackResult:
    """CW's ``x'`` on F: no cost, success left to the suite's verification."""
    return AttackResult(t.x_cw[idx], np.zeros(len(idx), bool))


def _transfer_confident(t: ShellTarget, steps: int, xs, ys, idx) -> AttackResult:
    """The most confident wrong point of ``N(x, epsilon)`` for F (``steps`` signed steps)."""
    return attacks.high_confidence(
        t.base,
        xs,
        ys,
        epsilon=t.epsilon,
        steps=steps,
        step_size=madry_step_size(t.epsilon, steps),
        seed=seeds.take(t.seed, idx),
    )


def _lift(t: ShellTarget, settings: attacks.LiftSettings, xs, ys, idx) -> AttackResult:
    return attacks.lift(
        t.shell,
        xs,
        ys,
        epsilon=t.epsilon,
        settings=settings,
        seed=seeds.take(t.seed, idx),
        known=t.known,
        progress=Ticker(f"{t.desc}: lift"),
    )


def _bpda(
    chain, name: str, t: ShellTarget, settings: attacks.BPDASettings, xs, ys, idx
) -> AttackResult:
    """One of BPDA's chains from the transfer x' (``chain``: :func:`attacks.bpda_restarts`, which
    also starts at x and at random points, or :func:`attacks.bpda_targeted`)."""
    return chain(
        t.shell,
        xs,
        ys,
        epsilon=t.epsilon,
        settings=settings,
        x_init=t.x_cw[idx],
        seed=seeds.take(t.seed, idx),
        known=t.known,
        progress=Ticker(f"{t.desc}: {name}"),
    )


def _square(t: ShellTarget, square: ShellSquare, xs, ys, idx) -> AttackResult:
    """Square on the shell's probabilities through ``square.model`` (the shell or its proxy); a
    proxy searching some labels searches ``y`` and the wrong labels the shell ranks best at ``xs``
    (its output there is known from the suite's check at ``x``, or paid as one shell
    prediction)."""
    shell, model = t.shell, square.model
    slots, paid = None, 0
    if model is not shell and model.proxy_labels is not None and len(xs):
        out, paid = embed(shell, xs, t.known)
        slots = proxy_slots(shell.scores(out), ys, model.proxy_labels, int(shell.num_classes))
    result = _on_proxy(
        shell,
        model,
        attacks.square(
            model,
            xs,
            ys,
            epsilon=t.epsilon,
            settings=square.settings,
            seed=seeds.take(t.seed, idx),
            slots=slots,
            progress=_square_ticker(f"{t.desc}: square (queries)", square.settings.queries),
        ),
    )
    if paid:
        result = result.with_cost(shell_predictions=np.ones(len(xs), np.int64))
    return result


def shell_table(config: AdaptiveConfig, shell) -> tuple[tuple[str, Callable, object], ...]:
    """Every attack on the shell as ``(name, attack, settings)``, in :data:`SHELL_ATTACKS` order,
    the settings built once from ``config`` for ``shell``; ``attack(target, settings, xs, ys,
    idx)`` with ``target`` a :class:`ShellTarget`. BPDA, targeted BPDA and Square steer by the
    copies of :meth:`AdaptiveConfig.attack_proxy`."""
    targets = "all" if config.targets == 0 else config.targets
    lift = attacks.LiftSettings(num_targets=targets, steps=config.lift_steps)
    bpda = config.bpda_settings(shell)
    targeted = config.bpda_settings(shell, attack="bpda_targeted")
    square = ShellSquare(
        config.attack_proxy(shell, attack="square"),
        attacks.SquareSettings(queries=config.square_queries, output="probabilities"),
    )
    return (
        ("transfer_cw", _transfer_cw, None),
        ("transfer_confident", _transfer_confident, config.steps),
        ("lift", _lift, lift),
        ("bpda", functools.partial(_bpda, attacks.bpda_restarts, "bpda"), bpda),
        (
            "bpda_targeted",
            functools.partial(_bpda, attacks.bpda_targeted, "bpda_targeted"),
            targeted,
        ),
        ("square", _square, square),
    )


def shell_suite(
    shell,
    base,
    config: AdaptiveConfig,
    x_cw: np.ndarray,
    *,
    epsilon: float,
    seed,
    desc: str = "adaptive",
    known=None,
) -> list[Step]:
    """The attacks on the shell (:func:`shell_table`), in ``config.shell_attacks`` order
    (``x_cw``: CW's ``x'`` on F; ``seed``: the batch's per-point seeds int64 ``[N]``,
    :func:`manifold_tf.seeds.point_seeds`, each step passing on those of the points it runs on;
    ``known``: the shell's outputs at the images it was asked about,
    :class:`~manifold_tf.attacks.known.KnownOutputs`)."""
    target = ShellTarget(shell, base, x_cw, epsilon, seed, known, desc)
    table = {name: (attack, settings) for name, attack, settings in shell_table(config, shell)}
    return [
        Step(name, functools.partial(table[name][0], target, table[name][1]))
        for name in config.shell_attacks
    ]


def _on_proxy(shell, model, out: AttackResult) -> AttackResult:
    """Square's result with a proxy's queries (and its final check) counted as the base passes
    they cost: ``shell_predictions`` count the shell's own only (the suite's verification)."""
    if model is shell:
        return out
    passes = (out.shell_predictions + 1) * model.passes_per_prediction()
    return out.replace(shell_predictions=np.zeros(len(out), np.int64)).with_cost(base_passes=passes)


def _square_ticker(desc: str, queries: int):
    ticker = Ticker(desc)
    return lambda spent, standing: ticker(spent, queries, standing)


def base_suite(
    base, config: AdaptiveConfig, x_cw: np.ndarray, *, epsilon: float, seed
) -> list[Step]:
    """The attacks on the base alone: CW's ``x'``, then ``config.base_attacks`` in order (APGD-T
    and FAB-T need at least 4 and 3 classes; a model with fewer skips them). ``seed`` as
    :func:`shell_suite`'s."""
    num_classes = int(base.output_shape[-1])
    targets = min(config.base_targets, num_classes - 1)
    steps = config.base_apgd_steps
    runs = {
        "apgd_ce": lambda xs, ys, idx: attacks.apgd_ce(
            base,
            xs,
            ys,
            epsilon=epsilon,
            settings=attacks.APGDSettings(steps=steps),
            seed=seeds.take(seed, idx),
        ),
        "apgd_t": lambda xs, ys, idx: attacks.apgd_t(
            base,
            xs,
            ys,
            epsilon=epsilon,
            settings=attacks.APGDSettings(steps=steps, num_targets=targets),
            seed=seeds.take(seed, idx),
        ),
        "fab_t": lambda xs, ys, idx: attacks.fab(
            base,
            xs,
            ys,
            epsilon=epsilon,
            # early_exit: only success counts here, not FAB's smallest norm
            settings=attacks.FABSettings(steps=steps, num_targets=targets, early_exit=True),
            targeted=True,
            seed=seeds.take(seed, idx),
        ),
        "square": lambda xs, ys, idx: attacks.square(
            base,
            xs,
            ys,
            epsilon=epsilon,
            settings=attacks.SquareSettings(queries=config.base_square_queries),
            seed=seeds.take(seed, idx),
        ),
    }
    needs = {"apgd_t": 4, "fab_t": 3}
    return [given("transfer_cw", x_cw)] + [
        Step(n, runs[n]) for n in config.base_attacks if num_classes >= needs.get(n, 2)
    ]
