"""When the verdict stops: all planned points, the answer decided, or the time budget spent.

Batches run by :class:`Schedule`: in order in one process, or in rounds of one batch per worker
under several (the chief decides before each round; a rule met inside a round keeps the batches
before it, as one process would have stopped there).

The time budget holds within one attack step: :class:`Deadline` is asked between the attack steps
of a batch (:func:`~manifold_tf.attacks.run_standing`'s ``stop``), and a batch it cuts is dropped
whole (its points standing then were not attacked by every step: none of them may count as robust,
and keeping only its finished points would choose points by their outcomes). Before a batch,
:func:`fits` sizes it from the seconds per point the batches before it took (before the first:
the plan's upper bound), so that it ends before the deadline, and none starts when not one more
point fits. The points evaluated are then the first ``n`` of the seeded order: a stop by time is
a fixed design (the fixed-n interval), with ``n`` set by the clock. The budget counts every
session of a resumed run (the batches' seconds and the time of batches it cut), so that
``--resume`` with a larger budget goes on where the last one stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np

from manifold_tf import reporting
from manifold_tf.evaluation import random_draws, sequential
from manifold_tf.evaluation.adaptive_config import AdaptiveConfig, parse_budget

CUT_NOTE = "budget"  # <protocol>/budget.json: seconds of the batches the deadline cut
# Settings a resumed run may change (more points, more time): they extend it.
EXTENDS = ("num_points", "suite.num_points", "suite.budget")


class Deadline:
    """``left`` seconds from now on ``clock`` (seconds; a test may pass a fake one)."""

    def __init__(self, left: float, clock=time.perf_counter):
        self.clock = clock
        self.at = clock() + float(left)

    def left(self) -> float:
        return self.at - self.clock()

    def passed(self) -> bool:
        return self.left() <= 0.0


def spent(records: list[dict], note: dict | None) -> float:
    """Seconds the budget has paid for: the batches' own and those of batches cut before."""
    cut = sum(c["seconds"] for c in (note or {}).get("cut", []))
    return float(sum(r["seconds"]["total"] for r in records) + cut)


def deadline(config: AdaptiveConfig, records: list[dict], note: dict, clock) -> Deadline | None:
    """The deadline of this session: the budget minus what the run's finished batches and cut
    ones spent (None without a budget)."""
    if config.budget is None:
        return None
    return Deadline(parse_budget(config.budget) - spent(records, note), clock)


def fits(records: list[dict], left: float, want: int, seconds_per_point: float | None) -> int:
    """Points of the next batch (at most ``want``) that fit in ``left`` seconds at the seconds per
    point the finished batches took (before any: ``seconds_per_point``, the plan's; None: all)."""
    points = sum(len(r["indices"]) for r in records)
    rate = sum(r["seconds"]["total"] for r in records) / points if points else seconds_per_point
    if not rate or rate <= 0 or math.isinf(left):
        return want
    return int(max(min(want, left // rate), 0))


def stopping_rule(
    config: AdaptiveConfig,
    n_total: int,
    note: dict | None = None,
    seconds_per_point: float | None = None,
):
    """``check(records, left=None, want=1) -> dict | None``: why to stop before another batch of
    ``want`` points after these records (``left``: the deadline's seconds left, else the budget
    minus what ``records`` and the cut batches of ``note`` spent), or None to go on."""
    budget = parse_budget(config.budget) if config.budget else None

    def check(records: list[dict], left: float | None = None, want: int = 1) -> dict | None:
        if config.until == "decided" and records:
            shell = sum(([b == "" for b in r["shell_broken_by"]] for r in records), [])
            if random_draws.outcomes(records) is not None:  # a random shell: worst of its runs
                shell = random_draws.outcomes(records)[1]
            base = sum(([b == "" for b in r["base_broken_by"]] for r in records), [])
            d = np.asarray(shell, float) - np.asarray(base, float)
            decision = sequential.decide(d, n_total=n_total, margin=config.margin / 100.0)
            if decision.stop:
                return dict(rule="decided", reason=decision.reason, n=int(len(d)))
        if budget is None:
            return None
        left = budget - spent(records, note) if left is None else left
        # Not one more point fits at the measured rate: the deadline would cut the batch and its
        # time would be lost, so it is not started.
        if left <= 0 or fits(records, left, want, seconds_per_point) < 1:
            if not records:
                raise ValueError(
                    f"the time budget {config.budget} was spent before any batch finished "
                    f"({reporting.format_duration(spent(records, note))} on batches it cut): "
                    f"give a larger --adaptive_budget with --resume, or smaller batches."
                )
            return dict(
                rule="budget",
                reason=f"the time budget {config.budget} is spent or would be overrun by another "
                f"batch ({reporting.format_duration(spent(records, note))} spent on "
                f"{len(records)} batch(es), {reporting.format_duration(max(left, 0))} left)",
                n=sum(len(r["indices"]) for r in records),
                cut=None,
            )
        return None

    return check


def shrink(order, batches: list, records: list, b: int, fit: int, batch_points: int):
    """Batch ``b`` of ``batches`` (index arrays of ``order``) cut to its first ``fit`` points and
    the rest of the order laid out again after it, in place (``records`` follows); returns the
    batch."""
    if fit >= len(batches[b]):
        return batches[b]
    start = sum(map(len, batches[:b])) + fit
    rest = [order[i : i + batch_points] for i in range(start, len(order), batch_points)]
    batches[b:] = [batches[b][:fit]] + rest
    records[b:] = [None] * (len(batches) - b)
    return batches[b]


def cut_stop(config: AdaptiveConfig, records: list[dict], cut: dict, store, protocol, note) -> dict:
    """Why the run stopped when the deadline cut batch ``cut["batch"]`` (its points dropped); the
    cut's seconds are added to ``note`` in the store (the budget paid for them)."""
    note["cut"].append(cut)
    store.save_note(protocol, CUT_NOTE, note)
    n = sum(len(r["indices"]) for r in records)
    if not records:
        raise ValueError(
            f"the time budget {config.budget} ran out inside the first batch ({cut['points']} "
            f"points, after {reporting.format_duration(cut['seconds'])}): no point was "
            f"evaluated. Give a larger --adaptive_budget (--resume goes on from here) or "
            f"smaller batches (--defence_batch_points)."
        )
    return dict(
        rule="budget",
        reason=f"the time budget {config.budget} ran out inside batch {cut['batch'] + 1} "
        f"(dropped whole: its {cut['points']} points were not attacked by every step); the "
        f"{n} points of the {len(records)} batch(es) before it are the first of the order",
        n=n,
        cut=cut,
    )


@dataclasses.dataclass
class Schedule:
    """How a verdict's batches run until its stopping rule holds. ``run_batch(b, idx)`` evaluates
    and saves batch ``b`` (points ``idx`` of ``order``) and returns its record, or None when the
    deadline cut it; each method returns ``(records, stopping)``, ``records`` the batches that
    count (the first of the order) and ``stopping`` why the run ended."""

    config: AdaptiveConfig
    store: object  # RunStore
    protocol: str
    order: np.ndarray
    n_total: int
    batch_points: int
    seconds_per_point: float | None
    note: dict
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self):
        self.rule = stopping_rule(self.config, self.n_total, self.note, self.seconds_per_point)
        self.done = dict(
            rule="points",
            reason=f"all {len(self.order)} planned points were evaluated",
            n=int(len(self.order)),
        )

    def every_batch(self, batches: list, records: list, run_batch) -> tuple[list, dict]:
        """No stopping rule: this process's batches, then every worker's (a barrier)."""
        for b, idx in enumerate(batches):
            if records[b] is None and self.store.mine(b):
                records[b] = run_batch(b, idx)
        return self.store.gather(self.protocol, len(batches)), self.done

    def in_order(self, batches: list, records: list, run_batch, deadline) -> tuple[list, dict]:
        """One process: batch after batch, the rule asked before each, each new batch sized to the
        time left."""
        for b in range(len(batches)):
            idx = batches[b]
            # A finished batch was paid for: only the sequential rule may stop before it.
            left = math.inf if records[b] is not None or deadline is None else deadline.left()
            why = self.rule(records[:b], left=left, want=len(idx))
            if why is not None:
                return records[:b], why
            if records[b] is not None:
                continue
            if all(r is None for r in records[b:]):  # a smaller batch may fit the time left
                fit = fits(records[:b], left, len(idx), self.seconds_per_point)
                idx = shrink(self.order, batches, records, b, fit, self.batch_points)
            started = self.clock()
            record = run_batch(b, idx)
            if record is None:  # the deadline cut it: dropped whole, its time counted
                cut = dict(batch=b, points=len(idx), seconds=self.clock() - started)
                return records[:b], self._cut(records[:b], cut)
            records[b] = record
        return records, self._decided_at_end(records)

    def in_rounds(self, batches: list, records: list, run_batch, deadline) -> tuple[list, dict]:
        """Several workers: rounds of one batch per worker (whole batches: no resizing). Before a
        round the chief asks the rule (time left, the answer decided) and every worker follows;
        after it every worker reads the round's records and stops, as one process would have, at
        the first batch the deadline cut or after which the answer was decided."""
        workers = self.store.workers
        for start in range(0, len(batches), workers.count):
            round_ = range(start, min(start + workers.count, len(batches)))
            why, failed = None, None
            if workers.is_chief:  # a finished batch was paid for, as in_order
                finished = records[start] is not None or deadline is None
                left = math.inf if finished else deadline.left()
                try:
                    why = self.rule(records[:start], left=left, want=len(batches[start]))
                except ValueError as e:  # no batch fits: every worker must hear it
                    failed = e
            flag = 2.0 if failed is not None else 1.0 if why is not None else 0.0
            (said,) = workers.all_sum([flag if workers.is_chief else 0.0], "round start")
            if said == 2.0:
                raise failed or ValueError(
                    "the chief stopped the verdict before its first batch (see its log)."
                )
            if said == 1.0:
                return records[:start], why or dict(rule="chief", n=start)
            cuts = [0.0] * len(round_)
            for b in round_:
                if records[b] is None and self.store.mine(b):
                    started = self.clock()
                    records[b] = run_batch(b, batches[b])
                    if records[b] is None:
                        cuts[b - start] = max(self.clock() - started, 1e-9)
            cuts = workers.all_sum(cuts, "round end")
            for b in round_:
                if records[b] is None and not cuts[b - start]:
                    records[b] = self.store.load(self.protocol, b)
            for b in round_:
                if cuts[b - start]:
                    cut = dict(batch=b, points=len(batches[b]), seconds=cuts[b - start])
                    return records[:b], self._cut(records[:b], cut)
                why = self.rule(records[: b + 1], left=math.inf) if b + 1 < len(batches) else None
                if why is not None:
                    return records[: b + 1], why
        return records, self._decided_at_end(records)

    def _decided_at_end(self, records: list) -> dict:
        why = self.rule(records, left=math.inf)
        return why if why is not None and why["rule"] == "decided" else self.done

    def _cut(self, records: list, cut: dict) -> dict:
        if not self.store.workers.is_chief:  # the chief keeps the note and reports
            if not records:
                raise ValueError(
                    f"the time budget {self.config.budget} ran out inside the first round: no "
                    f"point was evaluated (see the chief's log)."
                )
            return dict(rule="budget", n=sum(len(r["indices"]) for r in records), cut=cut)
        return cut_stop(self.config, records, cut, self.store, self.protocol, self.note)
