"""One runner for "attack only the points still standing; the first success per point wins".

AutoAttack's loop, written once: APGD's and FAB's restarts and target labels (both through
:func:`run_targets`), the BPDA chains, ``lift`` and both suites of the adaptive evaluation are
lists of :class:`Step` run by :func:`run_standing`.

A step sees only the points no earlier step broke (its batch shrinks), and is told their indices
in the whole batch so that it can pick per-point inputs (a transfer start, a target label). A point
broken by a step keeps that step's ``x_adv``; a point never broken keeps, among the steps that
ran on it, the ``x_adv`` with the highest :attr:`AttackResult.score` (the first step's on ties).
Costs add up over steps. With ``verify``, success is what ``verify`` says at the step's ``x_adv``
(a fresh prediction of the real classifier), not what the step reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from manifold_tf.attacks.result import AttackResult

__all__ = [
    "Step",
    "Suite",
    "TargetRun",
    "check_num_targets",
    "run_standing",
    "run_targets",
    "targets_by_restarts",
    "top_wrong_labels",
]

# The value a detail holds for points no step ran on: -1 for labels and counts, NaN for values.
_EMPTY = {"i": -1, "u": 0, "f": np.nan, "b": False}
# (x [M, ...], y [M], idx [M] indices of these points in the whole batch) -> AttackResult of M rows
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray], AttackResult]
# (x_adv [M, ...], idx [M]) -> [M] bool: broken by a fresh prediction
VerifyFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Step:
    """One attack of a chain: a name (reports use it) and the function that runs it."""

    name: str
    run: StepFn


@dataclass(frozen=True, eq=False)
class Suite:
    """The outcome of :func:`run_standing` on ``N`` points.

    Attributes:
      result: the merged :class:`AttackResult`; ``details["run"]`` ``[N]`` is the index of the step
        whose ``x_adv`` a point keeps (-1: no step ran on it) and the steps' own details are
        merged where all steps report them.
      broken_by: ``[N]`` object, the name of the step that broke each point; ``""`` standing;
        points broken before the first step keep the name given in ``broken``.
      attempted: points each step ran on; seconds: wall time per step.
      step_cost: per step, ``{"base_passes": [N], "shell_predictions": [N]}`` int64, what it
        spent on each point (0 where it did not run); summed over steps, ``result``'s cost.
      complete: False when ``stop`` ended the run before its last step (the points still
        standing then were not attacked by every step).
    """

    result: AttackResult
    broken_by: np.ndarray
    attempted: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    step_cost: dict = field(default_factory=dict)
    complete: bool = True

    @property
    def standing(self) -> np.ndarray:
        """``[N]`` bool: points no step broke (and not broken before)."""
        return self.broken_by == ""


def run_standing(
    steps: Sequence[Step],
    x,
    y,
    *,
    broken=None,
    verify: VerifyFn | None = None,
    on_step: Callable[[str, int, int, float], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Suite:
    """Runs ``steps`` in order, each on the points still standing; the first success wins.

    Args:
      steps: the attacks, in order.
      x: images ``[N, H, W, C]`` (pixels). y: labels ``[N]``.
      broken: ``[N]`` names (``""`` standing), or bool (``True``: broken before the first step,
        named ``"clean"``): points not attacked at all (e.g. already misclassified at ``x``).
      verify: re-checks each step's success with a fresh prediction (see the module docstring).
      on_step: called after each step with ``(name, attempted, broken, seconds)``.
      stop: asked before each step that has points to attack; ``True`` ends the run there
        (e.g. a deadline passed): the :class:`Suite` is marked incomplete.

    Returns:
      A :class:`Suite`.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    n = len(x)
    if broken is None:
        broken_by = np.full(n, "", object)
    else:
        broken = np.asarray(broken)
        broken_by = (np.where(broken, "clean", "") if broken.dtype == bool else broken).astype(
            object
        )
    base = AttackResult.unattacked(x, success=broken_by != "")
    x_adv, success, score = base.x_adv, base.success, base.score
    base_passes, shell_predictions = base.base_passes, base.shell_predictions
    run = np.full(n, -1, np.int32)
    details: dict[str, np.ndarray] = {}
    attempted, seconds, step_cost = {}, {}, {}
    complete = True
    for r, step in enumerate(steps):
        idx = np.flatnonzero(broken_by == "")
        if idx.size and stop is not None and stop():
            complete = False
            break
        attempted[step.name] = int(idx.size)
        cost = step_cost.setdefault(
            step.name,
            dict(base_passes=np.zeros(n, np.int64), shell_predictions=np.zeros(n, np.int64)),
        )
        t0 = time.perf_counter()
        if idx.size == 0:
            seconds[step.name] = 0.0
            continue
        out = step.run(x[idx], y[idx], idx)
        if len(out) != idx.size:
            raise ValueError(
                f"attack step {step.name!r} returned {len(out)} rows for {idx.size} points."
            )
        ok = np.asarray(verify(out.x_adv, idx), bool) if verify is not None else out.success
        base_passes[idx] += out.base_passes
        shell_predictions[idx] += out.shell_predictions
        cost["base_passes"][idx] += out.base_passes
        cost["shell_predictions"][idx] += out.shell_predictions
        replace = ok | (out.score > score[idx]) | (run[idx] < 0)
        rows = idx[replace]
        x_adv[rows], score[rows], run[rows] = out.x_adv[replace], out.score[replace], r
        success[idx] = ok
        first = not any(attempted[s.name] for s in steps[:r])
        for key in [k for k in details if k not in out.details]:
            del details[key]  # a detail only some steps report cannot be merged
        for key, value in out.details.items():
            if key not in details:
                if not first:
                    continue
                details[key] = np.full(
                    (n,) + value.shape[1:], _EMPTY.get(value.dtype.kind, 0), value.dtype
                )
            details[key][rows] = value[replace]
        broken_by[idx[ok]] = step.name
        seconds[step.name] = time.perf_counter() - t0
        if on_step is not None:
            on_step(step.name, int(idx.size), int(ok.sum()), seconds[step.name])
    details["run"] = run
    result = AttackResult(x_adv, success, base_passes, shell_predictions, score, details)
    return Suite(result, broken_by, attempted, seconds, step_cost, complete)


def top_wrong_labels(logits: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """``[N, k]`` int32: each point's ``k`` highest-scored wrong labels by ``logits`` ``[N, C]``,
    highest first (ties: the lower label first); AutoAttack's targets."""
    n, c = logits.shape
    order = np.argsort(-logits, axis=1, kind="stable")
    return order[order != np.asarray(y)[:, None]].reshape(n, c - 1)[:, :k].astype(np.int32)


def targets_by_restarts(
    make: Callable[[int, int, int], Step], num_targets: int, restarts: int
) -> list[Step]:
    """AutoAttack's order of a targeted attack's runs: every restart of the first target, then of
    the next: ``make(j, r, run)`` for target ``j``, restart ``r``, ``run = j * restarts + r`` (a
    run's index, which seeds its random start)."""
    return [make(j, r, j * restarts + r) for j in range(num_targets) for r in range(restarts)]


def check_num_targets(num_targets: int, num_classes: int) -> int:
    """``num_targets`` (an int >= 1), refused above ``num_classes - 1`` (the wrong labels)."""
    if num_targets > num_classes - 1:
        raise ValueError(
            f"num_targets must be <= num_classes - 1 = {num_classes - 1}; got "
            f"{num_targets}. Pass num_targets={num_classes - 1} to try every "
            f"wrong label."
        )
    return num_targets


@dataclass(frozen=True)
class TargetRun:
    """One run of :func:`run_targets`: ``rank`` of its target among the wrong labels (0: the
    highest; 0 for an untargeted attack), ``restart`` within that target (0: the first run) and
    ``index`` = ``rank * restarts + restart`` over all runs (what seeds its random start)."""

    rank: int
    restart: int
    index: int


# (x [M, ...], y [M], idx [M] indices in the whole batch, target [M] int32 (-1: untargeted), run)
#   -> AttackResult of M rows
TargetRunFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, TargetRun], AttackResult]


def run_targets(
    attack: TargetRunFn,
    x: np.ndarray,
    y: np.ndarray,
    clean_logits: np.ndarray,
    *,
    num_targets: int | None,
    restarts: int,
    name: Callable[[TargetRun], str],
) -> Suite:
    """AutoAttack's targets x restarts: runs ``attack`` on the points still standing.

    Targets are each point's ``num_targets`` highest wrong labels by ``clean_logits`` ``[N, K]``
    (:func:`top_wrong_labels`); ``num_targets=None``: one untargeted set of runs, target -1.
    Per target, ``restarts`` runs in the order of :func:`targets_by_restarts` (``restarts=0``: no
    run at all), each a :class:`Step` named ``name(run)``; points the clean logits already
    misclassify are broken before the first (``"clean"``, not attacked). ``x``: images
    ``[N, H, W, C]`` (pixels), ``y``: labels ``[N]``. Returns :func:`run_standing`'s
    :class:`Suite`.
    """
    y = np.asarray(y)
    if num_targets is None:
        targets = np.full((len(y), 1), -1, np.int32)
    else:
        targets = top_wrong_labels(clean_logits, y, num_targets)

    def make(rank: int, restart: int, index: int) -> Step:
        run = TargetRun(rank, restart, index)
        return Step(name(run), lambda xs, ys, idx: attack(xs, ys, idx, targets[idx, rank], run))

    chain = targets_by_restarts(make, targets.shape[1], restarts)
    return run_standing(chain, x, y, broken=np.argmax(clean_logits, axis=1) != y)
