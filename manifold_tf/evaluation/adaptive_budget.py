"""When the verdict stops: all planned points, the answer decided, or the time budget spent.

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

import math
import time

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
