"""The expected duration of a defence run, printed before it starts.

Every attack and shell here costs a countable number of forward+backward passes of the base model;
the estimate is that count (an upper bound: every point is assumed to stand until the last attack,
and CW to use its whole constant schedule) divided by the base's forward+backward rate, measured on
this machine in a few seconds. Real runs are shorter when points fall early: about half the bound
on the CIFAR default; :data:`EXPECTED_SHARE` sizes the first batch under a time budget.
"""

from __future__ import annotations

import math
import time

import numpy as np
import tensorflow as tf

from manifold_tf import reporting
from manifold_tf.compiled import graph_function
from manifold_tf.cw_search import CWSettings
from manifold_tf.shells import FactorShell


def passes_per_second(base, image_shape=(32, 32, 3), batch: int = 32, repeats: int = 3) -> float:
    """Forward+backward passes (images) per second of ``base`` on this machine."""
    x = tf.random.stateless_uniform((batch,) + tuple(image_shape), seed=[1, 2], maxval=255.0)

    @graph_function
    def step(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            out = tf.reduce_sum(base(z, training=False))
        return tape.gradient(out, z)

    step(x)  # trace and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        step(x).numpy()
    return batch * repeats / max(time.perf_counter() - start, 1e-9)


def cw_passes(attack: CWSettings) -> float:
    """Upper bound on CW L-inf passes per point: every constant of the schedule, plus tau rounds."""
    constants = math.ceil(math.log2(attack.largest_const / attack.initial_const)) + 1
    tau_rounds = 1 if attack.stop_within_epsilon else 35  # 255 -> 1 px in steps of 0.9
    return attack.max_iterations * (constants + tau_rounds)


def defence_passes(
    *, table2_points: int, num_points: int, shell, per_prediction: int, cw: CWSettings, suite
) -> dict:
    """Pass counts per phase of a defence run (``suite=None``: Table 2 only)."""
    phases = {
        "Table 2: CW on the base": table2_points * cw_passes(cw),
        "Table 2: the shell on x and x'": 2 * table2_points * per_prediction,
    }
    if suite is None or suite.attack == "none":
        return phases
    c = int(shell.num_classes)
    k = c - 1 if suite.targets == 0 else min(suite.targets, c - 1)
    starts = 2 + suite.restarts
    # A deterministic shell's outputs at x and at CW's x' are known when BPDA, targeted BPDA and
    # lift start there (attacks.known): their first prediction at those starts is not paid.
    known = 0 if getattr(shell, "is_random", False) else 1
    shell_predictions = {
        "bpda": starts * (suite.steps + 1) - 2 * known,
        "bpda_targeted": k * (1 + suite.restarts) * (suite.steps + 1) + 1 - (k + 1) * known,
        "lift": 1 + k - known,
        "square": suite.square_queries,
        "transfer_cw": 1,
        "transfer_confident": 1,
    }
    base_only = {
        "bpda": 2 * starts * suite.steps,
        "bpda_targeted": 2 * k * suite.steps,
        "lift": k * suite.lift_steps,
        "transfer_confident": (c - 1) * suite.steps,
    }
    # The copies the suite steers by; a stand-in that is no FactorShell (a test's) has none.
    copies = dict(bpda=shell, bpda_targeted=shell, square=shell)
    if isinstance(shell, FactorShell):
        copies = {name: suite.attack_proxy(shell, attack=name) for name in copies}
    for name, runs, extra in (
        ("bpda", starts, -2 * known),
        ("bpda_targeted", k * (1 + suite.restarts), 1 - (k + 1) * known),  # 1: ranking at x
    ):
        if copies[name] is not shell:  # the shell at each run's start, end and best iterate
            proxied = copies[name].passes_per_prediction() / per_prediction
            shell_predictions[name] = runs * (3 + (suite.steps - 1) * proxied) + extra
    square = copies["square"]
    if square is not shell:
        shell_predictions["square"] = (
            (suite.square_queries + 1) * square.passes_per_prediction() / per_prediction
        )
    for name in suite.shell_attacks:
        phases[f"adaptive: {name} on the shell"] = num_points * (
            shell_predictions.get(name, 0) * per_prediction + base_only.get(name, 0)
        )
    targets = min(suite.base_targets, c - 1)
    base_passes = {
        "apgd_ce": suite.base_apgd_steps,
        "apgd_t": targets * suite.base_apgd_steps,
        "fab_t": targets * suite.base_apgd_steps,
        # Square's queries are forward passes only: about a third of a forward+backward.
        "square": suite.base_square_queries / 3.0,
    }
    for name in suite.base_attacks:
        phases[f"adaptive: {name} on the base"] = num_points * base_passes[name]
    phases["adaptive: CW on the base (points not in Table 2)"] = max(
        num_points - table2_points, 0
    ) * cw_passes(cw)
    # Per point: the zero-epsilon run (3 predictions), G at x before and after it, and the
    # epsilon sweep's three BPDA runs, which steer by BPDA's proxy (the shell at each run's last
    # and best iterate; its start, G at x, is known), a standing point's check read from them.
    sweep = suite.sanity_steps + 1 - known
    if copies["bpda"] is not shell:
        proxied = copies["bpda"].passes_per_prediction() / per_prediction
        sweep = 3 - known + (suite.sanity_steps - 1) * proxied
    phases["adaptive: sanity checks"] = (
        suite.sanity_points * (3 * (sweep + 1 - known) + 5) * per_prediction
    )
    return phases


# What a verdict spends, as a share of its upper bound (every point standing to the last attack,
# CW through its whole schedule): 0.42 in passes on the CIFAR default's first 30 points (84,300 of
# 201,900 with CW's; most points fall to the transfers, CW stops within epsilon), 0.53 in time for
# the headline's first batch of 18 (tracing and a small batch's slower passes included: 481 s at
# 0.5 of an 8-minute budget, one attack step short of being cut). It sizes the first batch under a
# time budget, with room: at the upper bound a few points would fit, and a small batch spends most
# of its time on per-step overhead.
EXPECTED_SHARE = 0.6


def verdict_seconds_per_point(
    phases: dict, rate: float, num_points: int, *, expected: bool = False
) -> float:
    """The verdict's seconds per point: its phases and CW's (the verdict computes CW first; Table 2
    reuses it), not Table 2's shell or the sanity checks, which run after it. The upper bound, or
    with ``expected`` its :data:`EXPECTED_SHARE`."""
    skip = ("Table 2: the shell", "adaptive: sanity")
    bound = sum(p for k, p in phases.items() if not k.startswith(skip)) / max(num_points, 1) / rate
    return bound * EXPECTED_SHARE if expected else bound


def under_budget(
    phases_for, *, budget_s: float | None, rate: float, num_points: int, batch_points: int
) -> tuple[dict, str]:
    """``(phases, note)``: the phases of what will run under the verdict's time budget.

    ``phases_for(n)``: the phases (:func:`defence_passes`) with the verdict on ``n`` points. The
    budget holds within one attack step and drops a batch it cuts; the first batch is sized at the
    expected cost (:data:`EXPECTED_SHARE` of the upper bound), later ones at the rate the finished
    batches took. The table counts the points that fit at the expected cost (whole batches, or the
    first batch cut to fit); Table 2 then runs on those points. ``note`` says so ("" without a
    budget or when every point fits).
    """
    phases = phases_for(num_points)
    if budget_s is None:
        return phases, ""
    per_point = verdict_seconds_per_point(phases, rate, num_points, expected=True)
    per_batch = batch_points * per_point
    fit = (
        num_points if per_batch <= 0 else min(num_points, int(budget_s // per_batch) * batch_points)
    )
    if fit >= num_points:
        return phases, ""
    bound = batch_points * verdict_seconds_per_point(phases, rate, num_points)
    note = (
        f"The time budget ({reporting.format_duration(budget_s)}) fits {{fit}} of the "
        f"{num_points} points at the expected cost ({reporting.format_duration(per_batch)} per "
        f"batch of {batch_points}, {EXPECTED_SHARE:.0%} of the upper bound "
        f"{reporting.format_duration(bound)}); the verdict stops at the budget, within one attack "
        f"step, dropping a batch it cuts."
    )
    if fit == 0:
        first = min(int(budget_s // per_point), batch_points, num_points)
        if first == 0:
            return phases_for(min(batch_points, num_points)), note.format(fit=0) + (
                " Not even one point fits: the first batch may be cut, leaving no verdict (give "
                "a larger --adaptive_budget)."
            )
        return phases_for(first), note.format(fit=first) + (
            f" The first batch is cut to those {first} points; the table counts them."
        )
    return phases_for(fit), note.format(fit=fit) + " The table counts those points."


def describe(phases: dict, rate: float) -> str:
    """A Markdown table of each phase's passes and expected time, and the total."""
    rows = [[name, f"{p:,.0f}", reporting.format_duration(p / rate)] for name, p in phases.items()]
    total = sum(phases.values())
    rows.append(["total (upper bound)", f"{total:,.0f}", reporting.format_duration(total / rate)])
    return (
        f"Expected duration at {rate:,.0f} forward+backward images/s (measured now):\n\n"
        + reporting.markdown_table(["phase", "forward+backward passes", "time"], rows)
    )


def total_seconds(phases: dict, rate: float) -> float:
    return float(np.sum(list(phases.values())) / rate)
