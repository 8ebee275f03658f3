"""Several defences judged on the same points: the base's suite once per batch, each shell's suite
on the same points (``--shell=mcn,ncn,hedge``).

One run store (``RunStore``) holds the comparison::

    <run>/adaptive_base/settings.json, batch_000.json, batch_000_xcw.npy ...   the base's half
    <run>/<kind>/adaptive/...   each defence's verdict records, as a single-shell run writes them
    <run>/<kind>/summary.json, adaptive.md, defence.md ...        each defence's own reports
    <run>/comparison.json, comparison.md, comparison.png          (compare_report)

The base's half of batch ``b`` (:func:`~manifold_tf.evaluation.suite_batch.base_batch`: CW's x'
and the base's suite) is computed once and saved before any shell's half; each shell's half
(:func:`~manifold_tf.evaluation.suite_batch.shell_batch`) reads it, so that each defence's record
is the one a single-shell run on these points writes. A batch is done when the base and every
shell are done on it; only done batches are reported, so every defence has the same points.

The stopping rule is the comparison's: ``--adaptive_budget`` counts the time of every part (the
base's and each shell's); ``--adaptive_until=decided`` stops once every defence's paired robust
difference is decided. Resuming keeps every saved part; a resumed comparison may name more
defences (each new one runs its suite on the batches already done, reusing the base's half) or
fewer (those left out keep their folders and leave the comparison); a shell's changed settings
are refused as in a single-shell run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from types import SimpleNamespace

import numpy as np
from absl import logging

from manifold_tf.evaluation import adaptive, adaptive_budget, suite_batch
from manifold_tf.evaluation.adaptive import PROTOCOL, AdaptiveRun, verdict_settings
from manifold_tf.evaluation.adaptive_config import AdaptiveConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.store import RunStore
from manifold_tf.evaluation.walk import continue_batches, walk_order

BASE = "adaptive_base"  # the base's half of every batch, shared by the compared defences
RESERVED = (BASE, PROTOCOL, adaptive.SANITY, adaptive.DEFENCE_PROTOCOL, "comparison")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What :func:`run_comparison` returns: per kind its :class:`AdaptiveRun` (done batches
    only, the same points for every kind), the base's halves of those batches, the base's bound
    settings, each shell's passes per prediction, and why the comparison stopped."""

    runs: dict
    base_records: list
    settings: dict
    passes_per_prediction: dict
    stopping: dict


def check_kinds(kinds) -> list[str]:
    """The kinds as folder names of a comparison (at least two, distinct, none reserved)."""
    kinds = list(kinds)
    if len(kinds) < 2 or len(set(kinds)) != len(kinds):
        raise ValueError(f"a comparison needs two or more distinct shell kinds; got {kinds}.")
    clash = [k for k in kinds if k in RESERVED]
    if clash:
        raise ValueError(f"shell kinds {clash} clash with the run's folders {RESERVED}.")
    return kinds


def _combined(base_rec: dict | None, shell_recs: list) -> dict | None:
    """A batch as the budget sees it: its points and the seconds of every part saved so far
    (None when not even the base's half is)."""
    if base_rec is None:
        return None
    own = [r["seconds"]["total"] - base_rec["seconds"]["total"] for r in shell_recs if r]
    return dict(
        indices=base_rec["indices"], seconds=dict(total=base_rec["seconds"]["total"] + sum(own))
    )


def _decided(config: AdaptiveConfig, n_total: int):
    """``check(per_kind_records) -> dict | None``: stop when every defence is decided."""
    rule = adaptive_budget.stopping_rule(dataclasses.replace(config, budget=None), n_total)

    def check(per_kind: dict) -> dict | None:
        whys = {k: rule(recs) for k, recs in per_kind.items()}
        if not all(whys.values()):
            return None
        return dict(
            rule="decided",
            reason="every defence's paired robust difference is decided: "
            + "; ".join(f"{k}: {w['reason']}" for k, w in whys.items()),
            n=next(iter(whys.values()))["n"],
        )

    return check


def _saved_batches(store, subs: dict, order, batch_points: int) -> tuple[list, list, dict]:
    """``(batches, base_records, {kind: records})`` of a comparison so far: the batches laid out
    after those the base's half finished, each kind's finished records beside them (a kind new in
    the comparison has none yet: its suite runs on the finished batches)."""
    saved_base = {b: store.load(BASE, b) for b in store.finished(BASE)}
    batches = continue_batches(
        order, {b: r["indices"] for b, r in saved_base.items()}, batch_points
    )
    base_recs = [saved_base.get(b) for b in range(len(batches))]
    recs = {k: [None] * len(batches) for k in subs}
    for k, sub in subs.items():
        for b in sub.finished(PROTOCOL):
            rec = sub.load(PROTOCOL, b)
            if (
                b >= len(batches)
                or base_recs[b] is None
                or rec["indices"] != base_recs[b]["indices"]
            ):
                raise ValueError(
                    f"{sub.path(PROTOCOL)}: batch {b} has no matching batch of the base's "
                    f"suite in {store.path(BASE)} (other points): resume with the settings it "
                    f"ran with, or --overwrite."
                )
            recs[k][b] = rec
        if base_recs[0] is not None and recs[k][0] is None:
            logging.info(f"{k}: new in this comparison, its suite runs on the finished batches")
    return batches, base_recs, recs


def run_comparison(
    base,
    shells: dict,
    images: np.ndarray,
    labels: np.ndarray,
    config: AdaptiveConfig,
    context: RunContext,
    *,
    seconds_per_point: float | None = None,
) -> Comparison:
    """Runs (or resumes) the verdict of every shell of ``shells`` (kind -> shell around ``base``)
    on the first ``config.num_points`` points of the seeded order, batch by batch, the base's
    suite once per batch (module docstring). Arguments as
    :func:`~manifold_tf.evaluation.adaptive.run_adaptive`'s; one process only."""
    check_kinds(shells)
    if context.store.workers.distributed:
        raise ValueError("a comparison of several shells runs in one process: drop TF_CONFIG.")
    run = _Comparing(base, shells, images, labels, config, context, seconds_per_point)
    for b in range(len(run.batches)):  # the batches planned now (a shrunk batch adds none)
        if not run.batch(b):
            break
    else:
        run.last_look()
    return run.result()


class _Comparing:
    """A comparison as it runs: per batch the base's half (``base_recs``) and each kind's record
    (``recs``, kind -> list), the stopping rules, and why it stopped (``stopping``, before batch
    ``stopped_at``)."""

    def __init__(self, base, shells: dict, images, labels, config, context, seconds_per_point):
        self.base, self.shells, self.kinds = base, shells, list(shells)
        self.images, self.labels, self.config, self.context = images, labels, config, context
        self.store, self.clock = context.store, context.clock
        self.seconds_per_point = seconds_per_point
        self.order = walk_order(len(images), seed=context.seed, kind=context.permutation)
        self.order = self.order[: config.num_points]
        self._bind()
        self.batches, self.base_recs, self.recs = _saved_batches(
            self.store, self.subs, self.order, context.batch_points
        )
        # Table 2's CW x' where it ran first (a resumed comparison on more points), as run_adaptive.
        self.known = adaptive._known_transfer(self.subs[self.kinds[0]], images)
        self._rules()

    def _bind(self) -> None:
        """Binds the base's settings and each kind's in its folder (``subs``)."""
        config, context, kinds = self.config, self.context, self.kinds
        common = dict(num_points=len(self.order), num_test_points=len(self.images))
        free = ("strategy",) + adaptive_budget.EXTENDS
        self.base_settings = self.store.bind(
            BASE, verdict_settings(None, config, context, **common), free=free
        )
        self.subs = {k: self.store.sub(k) for k in kinds}
        self.settings = {
            k: self.subs[k].bind(
                PROTOCOL,
                verdict_settings(
                    adaptive.shell_settings(self.shells[k], config), config, context, **common
                ),
                free=free,
            )
            for k in kinds
        }

    def _rules(self) -> None:
        """The stopping rules (budget, decided), the deadline and the progress bar."""
        config, n_total, batches = self.config, len(self.images), self.batches
        self.sequential = config.until == "decided" or config.budget is not None
        self.note = self.store.load_note(BASE, adaptive_budget.CUT_NOTE) or dict(cut=[])
        self.budget_rule = adaptive_budget.stopping_rule(
            dataclasses.replace(config, until="points"), n_total, self.note, self.seconds_per_point
        )
        self.decided = _decided(config, n_total)
        paid = [c for b in range(len(batches)) if (c := self._combined(b))]
        self.deadline = adaptive_budget.deadline(config, paid, self.note, self.clock)
        n = len(self.order)
        self.stopping = dict(rule="points", reason=f"all {n} planned points were evaluated", n=n)
        self.stopped_at = len(batches)
        self.progress = self.store.progress(
            [len(i) for i in batches],
            [True if self.done(b) else None for b in range(len(batches))],
            "comparison",
        )

    def _combined(self, b: int) -> dict | None:
        return _combined(self.base_recs[b], [self.recs[k][b] for k in self.kinds])

    def done(self, b: int) -> bool:
        """The base and every kind finished batch ``b``."""
        return self.base_recs[b] is not None and all(
            self.recs[k][b] is not None for k in self.kinds
        )

    def finished(self, upto: int) -> list[dict]:
        """The done batches before ``upto`` (a prefix), as the budget sees them."""
        out = []
        for b in range(upto):
            if not self.done(b):
                break
            out.append(self._combined(b))
        return out

    def cut(self, b: int, points: int, started: float) -> None:
        """The deadline cut batch ``b`` (``points`` points, begun at ``started``): it stops here."""
        part = dict(batch=b, points=points, seconds=self.clock() - started)
        self.stopping = adaptive_budget.cut_stop(
            self.config, self.finished(b), part, self.store, BASE, self.note
        )
        self.stopped_at = b

    def look(self, b: int) -> np.ndarray | None:
        """Batch ``b``'s points (shrunk to the time left when none of it is saved), or None when
        a stopping rule holds before it (``stopping`` says which)."""
        idx = self.batches[b]
        if not self.sequential:
            return idx
        before = self.finished(b)  # every batch before b is done (a cut ends the loop)
        why = self.decided({k: self.recs[k][:b] for k in self.kinds})
        if why is None:
            # A done batch was paid for: only the sequential rule may stop before it.
            left = math.inf if self.done(b) or self.deadline is None else self.deadline.left()
            why = self.budget_rule(before, left=left, want=len(idx))
        if why is not None:
            self.stopping, self.stopped_at = why, b
            return None
        if all(r is None for r in self.base_recs[b:]):  # a smaller batch may fit the time left
            left = math.inf if self.deadline is None else self.deadline.left()
            fit = adaptive_budget.fits(before, left, len(idx), self.seconds_per_point)
            idx = adaptive_budget.shrink(
                self.order, self.batches, self.base_recs, b, fit, self.context.batch_points
            )
            for k in self.kinds:  # no shell half without its base half: none from b on
                self.recs[k] = self.recs[k][:b] + [None] * (len(self.batches) - b)
        return idx

    def batch(self, b: int) -> bool:
        """Batch ``b`` looked at, its missing halves computed and saved; False when it ends the
        comparison (a stopping rule held, or the deadline cut it)."""
        idx = self.look(b)
        if idx is None:
            return False
        if self.done(b):
            return True
        x = self.images[idx].astype(np.float32)
        y = self.labels[idx].astype(np.int64)
        stop = None if self.deadline is None else self.deadline.passed
        started = self.clock()
        if self.base_recs[b] is None:
            x_cw = self._base_half(b, idx, x, y, stop, started)
            if x_cw is None:
                self.cut(b, len(idx), started)
                return False
        else:
            x_cw = self.store.load_array(BASE, b, "xcw")
        started = self._shell_halves(b, idx, x, y, x_cw, stop, started)
        if not self.done(b):
            self.cut(b, len(idx), started)
            return False
        self.progress.update(
            len(idx),
            extra=f"batch {b + 1}/{len(self.batches)}: robust base "
            f"{self.base_recs[b]['base_broken_by'].count('')}/{len(idx)}, "
            + ", ".join(f"{k} {self.recs[k][b]['shell_broken_by'].count('')}" for k in self.kinds),
        )
        return True

    def _base_half(self, b: int, idx, x, y, stop, started: float) -> np.ndarray | None:
        """The base's half of batch ``b`` computed and saved: its CW x' ``[N, H, W, C]``, or None
        when ``stop()`` cut it."""
        half = suite_batch.base_batch(
            self.base,
            x,
            y,
            idx,
            config=self.config,
            context=self.context,
            known_transfer=self.known,
            stop=stop,
        )
        if half is None:
            return None
        part, x_cw = half
        part = dict(
            batch=b,
            indices=[int(i) for i in idx],
            labels=y.tolist(),
            **part,
            seconds=dict(total=self.clock() - started),
        )
        self.store.save(BASE, b, part, arrays={"xcw": x_cw.astype(np.float32)})
        self.base_recs[b] = part
        return x_cw

    def _shell_halves(self, b: int, idx, x, y, x_cw, stop, started: float) -> float:
        """Each kind's missing half of batch ``b``, saved in its folder, until ``stop()`` cuts
        one; returns when the last one began (``started`` if none ran)."""
        for k in self.kinds:
            if self.recs[k][b] is not None:
                continue
            started = self.clock()
            out = suite_batch.shell_batch(
                self.shells[k],
                self.base,
                x,
                y,
                idx,
                (self.base_recs[b], x_cw),
                config=self.config,
                context=self.context,
                desc=f"{k}: batch {b + 1}/{len(self.batches)}",
                stop=stop,
            )
            if out is None:
                break
            record, x_worst = out
            record["seconds"]["total"] = (
                self.base_recs[b]["seconds"]["total"] + self.clock() - started
            )
            record["batch"] = b
            arrays = {"xadv": x_worst.astype(np.float32), "xcw": x_cw.astype(np.float32)}
            self.subs[k].save(PROTOCOL, b, record, arrays=arrays)
            self.recs[k][b] = record
        return started

    def last_look(self) -> None:
        """After the last planned batch: the sequential rule may have decided there."""
        why = self.decided({k: self.recs[k] for k in self.kinds}) if self.sequential else None
        if why is not None:  # decided at the last planned batch
            self.stopping = why

    def result(self) -> Comparison:
        """The done batches' records, each kind's sanity checks (run now) and why it stopped."""
        n_done = len(self.finished(self.stopped_at))
        runs = {
            k: AdaptiveRun(
                self.recs[k][:n_done],
                self.settings[k],
                adaptive.sanity_checks(
                    self.shells[k],
                    self.images,
                    self.labels,
                    self.order,
                    self.config,
                    self.subs[k],
                    epsilon=self.context.epsilon,
                    seed=self.context.seed,
                    records=self.recs[k][:n_done],
                ),
                self.stopping,
            )
            for k in self.kinds
        }
        return Comparison(
            runs=runs,
            base_records=self.base_recs[:n_done],
            settings=self.base_settings,
            passes_per_prediction={
                k: int(self.shells[k].passes_per_prediction()) for k in self.kinds
            },
            stopping=self.stopping,
        )


def read_comparison(directory: str, kinds=None) -> Comparison:
    """The comparison in run directory ``directory`` as far as it got, read only (a run still
    going included): the batches the base and every defence have finished, a prefix of the
    order. ``kinds``: the defences to read (default: every folder holding a verdict, in the order
    they were bound). The sanity checks are those the run saved (they run once every batch is
    done); before that only the black-box check, which the records hold, is reported. Raises
    ValueError when ``directory`` holds no comparison."""
    store = RunStore(directory, resume=True, lock=False)
    settings = store.settings(BASE)
    if settings is None:
        raise ValueError(f"{directory!r} holds no comparison ({BASE}/settings.json is missing).")
    if kinds is None:
        found = [
            d
            for d in os.listdir(directory)
            if os.path.isfile(store.path(d, PROTOCOL, "settings.json"))
        ]
        kinds = sorted(
            found, key=lambda d: os.path.getmtime(store.path(d, PROTOCOL, "settings.json"))
        )
    kinds = check_kinds(kinds)
    subs = {k: store.sub(k) for k in kinds}
    base_records, recs = [], {k: [] for k in kinds}
    for b in store.finished(BASE):
        loaded = {k: subs[k].load(PROTOCOL, b) for k in kinds}
        if b != len(base_records) or any(r is None for r in loaded.values()):
            break
        base_records.append(store.load(BASE, b))
        for k in kinds:
            recs[k].append(loaded[k])
    n = sum(len(r["indices"]) for r in base_records)
    if not n:
        raise ValueError(f"{directory!r}: no batch is done by the base and {kinds} yet.")
    stopping = dict(
        rule="read",
        reason=f"read from {directory} while or after it ran: the {n} points of the "
        f"{len(base_records)} batch(es) every defence has finished, of {settings['num_points']} "
        f"planned",
        n=n,
    )
    runs = {}
    for k in kinds:
        own = subs[k].settings(PROTOCOL)
        # Only what sanity_checks reads when it runs nothing: the suite's attacks, no new points.
        suite = SimpleNamespace(shell_attacks=own["suite"]["shell_attacks"], sanity_points=0)
        sanity = adaptive.sanity_checks(
            None, None, None, None, suite, subs[k], epsilon=own["epsilon"], seed=0, records=recs[k]
        )
        runs[k] = AdaptiveRun(recs[k], own, sanity, stopping)
    # The shell's declared cost, as its ledger saved it (a random shell's checks add its draws, so
    # they cannot be divided back into it); older records lack it and counted 2 checks per point.
    first = {k: recs[k][0]["ledger"] for k in kinds}
    per_prediction = {
        k: int(first[k].get("per_prediction", first[k]["shell_checks"][0] // 2)) for k in kinds
    }
    return Comparison(runs, base_records, settings, per_prediction, stopping)
