"""The adaptive evaluation, the verdict: a worst-case attack suite on the shell, and on the base
alone.

Points: the first ``num_points`` of the seeded walk order, right or wrong at ``x``. A classifier is
robust on a point when it is right at ``x`` and at the ``x'`` of every attack; attacks run in order,
AutoAttack style, each only on the points still standing
(:func:`~manifold_tf.attacks.run_standing`), and a success always means the real classifier (the
shell itself, run again) answered a wrong label at an ``x'`` inside ``N(x, epsilon)`` and the pixel
box. The suites are in :mod:`~manifold_tf.evaluation.adaptive_suites`.

Each batch's outcome is one record in the run store (resumable); with ``until="decided"`` batches
stop as soon as the paired robust difference is decided (:mod:`~manifold_tf.evaluation.sequential`)
and with a ``budget`` when its time is spent. The sanity checks of Carlini et al. 2019 run here too
(:func:`sanity_checks`); :mod:`~manifold_tf.evaluation.adaptive_report` renders the records.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from manifold_tf import attacks, reporting, seeds
from manifold_tf.attacks import run_standing  # noqa: F401  (bench_surrogate reads it here)
from manifold_tf.attacks.known import KnownOutputs
from manifold_tf.evaluation import adaptive_budget
from manifold_tf.evaluation.adaptive_config import AdaptiveConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.suite_batch import (  # noqa: F401  (this module's API too)
    TransferPoint,
    adaptive_batch,
    shell_labels,
    verified_labels,
)
from manifold_tf.evaluation.walk import continue_batches, walk_order

PROTOCOL = "adaptive"
SANITY = "adaptive_sanity"
DEFENCE_PROTOCOL = "defence"  # Table 2's records, whose CW x' the suite reuses


def transfer_points(store) -> dict:
    """Point index -> :class:`TransferPoint`: CW's result on every point the adaptive evaluation
    ran, for Table 2 to reuse (the same attack on the same points and labels)."""
    out = {}
    for b in store.finished(PROTOCOL):
        rec = store.load(PROTOCOL, b)
        if "cw_success" not in rec:
            continue  # a record written before the CW results were kept
        x_cw = store.load_array(PROTOCOL, b, "xcw")
        for k, i in enumerate(rec["indices"]):
            out[int(i)] = TransferPoint(
                x_cw[k], bool(rec["cw_success"][k]), int(rec["cw_iterations"][k])
            )
    return out


def sanity_checks(
    shell,
    images,
    labels,
    order,
    config: AdaptiveConfig,
    store,
    *,
    epsilon: float,
    seed: int,
    records: list[dict],
) -> dict:
    """Carlini et al. 2019's checks, run (or loaded) on the first ``sanity_points`` of ``order``.

    - ``zero_epsilon``: with ``epsilon = 0`` BPDA returns ``x`` and G there is G(x) (no success);
    - ``epsilon_sweep``: BPDA's success does not fall as ``epsilon`` grows and reaches 99% at
      ``large_epsilon`` (an attack that cannot win with a huge budget is broken, or the gradients
      are masked);
    - ``black_box``: Square, run after the white-box attacks on the points they left standing,
      breaks none of them (if it does, the gradient attacks missed what a query attack found).
    """
    broken_by_square = sum(r["shell_broken_by"].count("square") for r in records)
    black_box = dict(
        passed=broken_by_square == 0,
        square_only=int(broken_by_square),
        ran="square" in config.shell_attacks,
        note="points Square broke after every white-box attack failed on them",
    )
    saved = store.load(SANITY, 0) if store.settings(SANITY) else None
    if saved is None and config.sanity_points:
        store.bind(
            SANITY,
            dict(
                points=int(config.sanity_points),
                steps=int(config.sanity_steps),
                epsilon=float(epsilon),
                large_epsilon=float(config.large_epsilon),
            ),
        )
        idx = order[: config.sanity_points]
        saved = _zero_and_sweep(shell, images[idx], labels[idx], idx, config, epsilon, seed)
        store.save(SANITY, 0, saved)
    if saved is None:
        return dict(
            black_box=black_box,
            passed=black_box["passed"],
            failures=[] if black_box["passed"] else ["black_box"],
        )
    z = saved["zero_epsilon"]
    zero_ok = z["successes"] == 0 and z["moved"] == 0.0 and z["consistent"]
    rates = [s["broken"] / s["attacked"] if s["attacked"] else 1.0 for s in saved["epsilon_sweep"]]
    sweep_ok = all(b >= a for a, b in zip(rates, rates[1:], strict=False)) and rates[-1] >= 0.99
    checks = dict(
        zero_epsilon=dict(passed=zero_ok, **z),
        epsilon_sweep=dict(passed=sweep_ok, rates=rates, runs=saved["epsilon_sweep"]),
        black_box=black_box,
    )
    failures = [k for k, v in checks.items() if not v["passed"]]
    return dict(checks, passed=not failures, failures=failures)


def _zero_and_sweep(shell, x, y, idx, config: AdaptiveConfig, epsilon: float, seed: int) -> dict:
    """The zero-epsilon check and the epsilon sweep on images ``x`` (points ``idx``), as saved."""
    x, y = x.astype(np.float32), y.astype(np.int64)
    known = KnownOutputs(shell)  # the sweep's starts at x and its last iterates
    g_x = shell_labels(shell, x, record=known)
    right = g_x == y
    point_seed = seeds.point_seeds(seed, idx[right])
    zero = attacks.bpda(
        shell,
        x[right],
        y[right],
        epsilon=0.0,
        settings=attacks.BPDASettings(steps=2),
        seed=point_seed,
    )
    again = shell_labels(shell, x)
    epsilons = sorted({float(epsilon), float(min(2 * epsilon, 255)), float(config.large_epsilon)})
    sweep = []
    # The sweep checks the BPDA the suite runs: through its proxy, every success confirmed by the
    # shell (and checked again below), at the proxy's cost.
    proxy = config.attack_proxy(shell)
    for eps in epsilons:
        out = attacks.bpda(
            shell,
            x[right],
            y[right],
            epsilon=eps,
            settings=attacks.BPDASettings(
                steps=config.sanity_steps,
                schedule="apgd",
                proxy=None if proxy is shell else proxy,
            ),
            seed=point_seed,
            known=known,
        )
        ok = verified_labels(shell, out.x_adv, y[right], known)[0] != y[right]
        sweep.append(dict(epsilon=eps, broken=int(ok.sum()), attacked=int(right.sum())))
    return dict(
        zero_epsilon=dict(
            successes=int(np.sum(zero.success)),
            moved=float(np.abs(zero.x_adv - x[right]).max(initial=0.0)),
            consistent=bool(np.array_equal(g_x, again)),
            points=int(right.sum()),
        ),
        epsilon_sweep=sweep,
    )


@dataclasses.dataclass(frozen=True)
class AdaptiveRun:
    """What :func:`run_adaptive` returns: the records of the evaluated batches, the settings they
    were run with, the sanity checks and why the run stopped (``stopping``)."""

    records: list
    settings: dict
    sanity: dict
    stopping: dict


def _known_transfer(store, images) -> dict:
    """Table 2's CW ``(x', success, iterations)`` per point index (the probe x' of base-robust
    points is not CW's, its iterations are)."""
    known = {}
    for b in store.finished(DEFENCE_PROTOCOL):
        rec = store.load(DEFENCE_PROTOCOL, b)
        x_adv = store.load_array(DEFENCE_PROTOCOL, b, "xadv")
        its = rec.get("attack_iterations") or [-1] * len(rec["indices"])
        for k, i in enumerate(rec["indices"]):
            ok = bool(rec["base_success"][k])
            known[int(i)] = (x_adv[k] if ok else images[int(i)], ok, int(its[k]))
    return known


def shell_settings(shell, config: AdaptiveConfig) -> dict:
    """The shell's settings and the copies of it the suite steers by (``proxies``)."""
    proxies = config.proxies(shell)
    return {**shell.settings(), **({"proxies": proxies} if proxies else {})}


def verdict_settings(
    shell_settings: dict | None,
    config: AdaptiveConfig,
    context: RunContext,
    *,
    num_points: int,
    num_test_points: int,
) -> dict:
    """The settings a verdict is bound with (JSON form); ``shell_settings`` None: the base suite's
    alone (a comparison's shared records)."""
    shell = {} if shell_settings is None else dict(shell=shell_settings)
    return reporting.to_jsonable(
        dict(
            protocol="adaptive (METHOD.md, Adaptive evaluation)",
            epsilon=float(context.epsilon),
            **shell,
            suite=config,
            base_attack_cw=context.cw_settings.recorded(),
            seed=int(context.seed),
            seeding="per point: the run's seed and the point's index (random shells: the input)",
            permutation=context.permutation,
            num_points=int(num_points),
            batch_points=int(context.batch_points),
            num_test_points=int(num_test_points),
            **(context.metadata or {}),
        )
    )


def run_adaptive(
    base,
    shell,
    images: np.ndarray,
    labels: np.ndarray,
    config: AdaptiveConfig,
    context: RunContext,
    *,
    seconds_per_point: float | None = None,
) -> AdaptiveRun | None:
    """Runs (or resumes) the suite on the points of the order, batch by batch, until the stopping
    rule holds (``num_points`` reached, the answer decided, or the budget spent:
    :mod:`~manifold_tf.evaluation.adaptive_budget`; ``context.clock`` times the budget, and
    ``seconds_per_point``, the plan's, sizes the first batch under it). A resumed run
    keeps its finished batches and may be given a larger ``num_points`` or budget (the attack
    settings must not change). ``images``: the test set ``[M, H, W, C]``, pixels; ``labels``
    ``[M]``; ``context``: the store, epsilon, base attack, seed, order and batch size.

    Reuses the CW ``x'`` of a Table-2 run in the same store for the points it has. Under several
    workers each computes its own batches and only the chief returns the :class:`AdaptiveRun`
    (the others return None); a stopping rule then runs in rounds
    (:meth:`~manifold_tf.evaluation.adaptive_budget.Schedule.in_rounds`).
    """
    store = context.store
    order = walk_order(len(images), seed=context.seed, kind=context.permutation)
    order = order[: config.num_points]
    settings = verdict_settings(
        shell_settings(shell, config),
        config,
        context,
        num_points=len(order),
        num_test_points=len(images),
    )
    # More points or time extend a run: its finished batches stay what they were.
    settings = store.bind(PROTOCOL, settings, free=("strategy",) + adaptive_budget.EXTENDS)
    known = _known_transfer(store, images)
    saved = {b: store.load(PROTOCOL, b) for b in store.finished(PROTOCOL)}
    batches = continue_batches(
        order, {b: r["indices"] for b, r in saved.items()}, context.batch_points
    )
    records = [saved.get(b) for b in range(len(batches))]
    progress = store.progress([len(b) for b in batches], records, "adaptive")
    note = store.load_note(PROTOCOL, adaptive_budget.CUT_NOTE) or dict(cut=[])
    deadline = adaptive_budget.deadline(config, list(saved.values()), note, context.clock)

    def run_batch(b: int, idx: np.ndarray) -> dict | None:
        """Batch ``b`` evaluated and saved (None: the deadline cut it)."""
        out = adaptive_batch(
            base,
            shell,
            images[idx].astype(np.float32),
            labels[idx].astype(np.int64),
            idx,
            config=config,
            context=context,
            known_transfer=known,
            desc=f"adaptive batch {b + 1}/{len(batches)}",
            stop=None if deadline is None else deadline.passed,
        )
        if out is None:
            return None
        return _save_batch(store, b, out, progress, len(batches))

    schedule = adaptive_budget.Schedule(
        config=config,
        store=store,
        protocol=PROTOCOL,
        order=order,
        n_total=len(images),
        batch_points=context.batch_points,
        seconds_per_point=seconds_per_point,
        note=note,
        clock=context.clock,
    )
    records, stopping = _schedule_batches(config, schedule, batches, records, run_batch, deadline)
    if not store.workers.is_chief:
        return None  # the chief runs the sanity checks and writes the reports
    store = store.alone()
    sanity = sanity_checks(
        shell,
        images,
        labels,
        order,
        config,
        store,
        epsilon=context.epsilon,
        seed=context.seed,
        records=records,
    )
    return AdaptiveRun(records, settings, sanity, stopping)


def _save_batch(store, b: int, out: tuple, progress, num_batches: int) -> dict:
    """Batch ``b``'s ``out`` (:func:`adaptive_batch`'s ``(record, x_worst, x_cw)``) saved and
    counted; its record."""
    record, x_worst, x_cw = out
    record["batch"] = b
    store.save(
        PROTOCOL,
        b,
        record,
        arrays={"xadv": x_worst.astype(np.float32), "xcw": x_cw.astype(np.float32)},
    )
    n = len(record["indices"])
    progress.update(
        n,
        extra=(
            f"batch {b + 1}/{num_batches}: shell robust {record['shell_broken_by'].count('')}/"
            f"{n}, base robust {record['base_broken_by'].count('')}/{n}"
        ),
    )
    return record


def _schedule_batches(config: AdaptiveConfig, schedule, batches, records, run_batch, deadline):
    """``(records, stopping)``: every batch, or under a stopping rule in order (several workers:
    in rounds) until it holds."""
    if not (config.until == "decided" or config.budget is not None):
        return schedule.every_batch(batches, records, run_batch)
    if schedule.store.workers.distributed:
        return schedule.in_rounds(batches, records, run_batch, deadline)
    return schedule.in_order(batches, records, run_batch, deadline)
