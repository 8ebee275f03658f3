"""A time budget that holds: the deadline cuts a batch between attack steps and the batch is
dropped whole (the points reported are a prefix of the order); resume with a larger budget or
more points goes on; changed attack settings are still refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from helpers import small_conv
from manifold_tf.attacks import CWSettings, Step
from manifold_tf.evaluation import adaptive, adaptive_budget, adaptive_report, adaptive_suites
from manifold_tf.evaluation.config import AdaptiveConfig, BaseAttackConfig, DefenceConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.defence import run_table2
from manifold_tf.evaluation.store import RunStore, SettingsMismatch
from manifold_tf.evaluation.walk import continue_batches, walk_order
from manifold_tf.shells import MCNShell

SMALL = AdaptiveConfig(
    num_points=12,
    steps=2,
    sanity_points=0,
    base_apgd_steps=2,
    targets=1,
    shell_attacks=("transfer_cw", "bpda"),
    budget=None,
)
CW = CWSettings(max_iterations=2)
# What a batch's record holds besides its timing: equal across runs on the same points and seeds.
OUTCOME = ("indices", "base_broken_by", "shell_broken_by", "shell_adv", "attempted", "cost")


@pytest.fixture(scope="module")
def setup():
    base = small_conv(seed=3, shape=(8, 8, 3), classes=4)
    shell = MCNShell(base, 4.0, steps=2)
    x = np.random.default_rng(0).uniform(0, 255, size=(12, 8, 8, 3)).astype(np.float32)
    y = shell.predict(x, verbose=0).argmax(1)
    return base, shell, x, y


class Clock:
    """Fake seconds: each read advances one second; ``jump`` adds a block at once."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.fixture
def slow_shell_suite(monkeypatch):
    """From batch ``jump_at`` on, building the shell's suite (after the base suite ran) moves the
    clock past any deadline, and the shell's steps count their calls."""
    state = dict(clock=Clock(), jump_at=1, calls=0, ran=[])
    real = adaptive_suites.shell_suite

    def shell_suite(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] > state["jump_at"]:
            state["clock"].t += 10_000.0
        batch = state["calls"] - 1

        def counted(step):
            return Step(
                step.name, lambda *a: state["ran"].append((batch, step.name)) or step.run(*a)
            )

        return [counted(s) for s in real(*args, **kwargs)]

    monkeypatch.setattr(adaptive_suites, "shell_suite", shell_suite)
    return state


def run(setup, path, config, *, resume=False, clock=None):
    base, shell, x, y = setup
    store = RunStore(str(path), resume=resume)
    out = adaptive.run_adaptive(
        base,
        shell,
        x,
        y,
        config,
        RunContext(
            store=store, epsilon=6.0, cw_settings=CW, seed=0, batch_points=4, clock=clock or Clock()
        ),
    )
    return out, store


def test_the_deadline_cuts_a_batch_between_steps_and_resume_goes_on(
    setup, tmp_path, slow_shell_suite
):
    order = walk_order(12, seed=0)
    config = dataclasses.replace(SMALL, budget="500s")
    out, store = run(setup, tmp_path / "run", config, clock=slow_shell_suite["clock"])
    # Batch 0 (a few fake seconds) fitted; batch 1 was cut before the shell's first step.
    assert out.stopping["rule"] == "budget" and out.stopping["cut"]["batch"] == 1
    assert [r["batch"] for r in out.records] == [0]
    assert sum((r["indices"] for r in out.records), []) == order[:4].tolist()
    assert {b for b, _ in slow_shell_suite["ran"]} == {0}  # no shell step ran after the deadline
    assert store.finished(adaptive.PROTOCOL) == [0]  # the cut batch left no record
    note = store.load_note(adaptive.PROTOCOL, adaptive_budget.CUT_NOTE)
    assert note["cut"][0]["batch"] == 1 and note["cut"][0]["seconds"] >= 10_000
    report = adaptive_report.write_adaptive_report(out, setup[2], store)
    assert report["verdict"]["n"] == 4
    assert report["verdict"]["difference"]["robust_accuracy"]["method"] == "tango"
    assert "ran out inside batch 2" in open(store.path("adaptive.md")).read()
    store.close()

    # The same budget again: spent (batch 0 and the cut batch), so nothing more runs.
    again, s2 = run(setup, tmp_path / "run", config, resume=True)
    assert again.records == out.records and again.stopping["rule"] == "budget"
    s2.close()

    # A larger budget goes on from batch 1; the finished batch stays what it was, and every
    # batch is the one an unbudgeted run computes.
    slow_shell_suite["jump_at"] = 10**9
    bigger = dataclasses.replace(config, budget="20000s")
    more, s3 = run(setup, tmp_path / "run", bigger, resume=True)
    s3.close()
    assert more.stopping["rule"] == "points" and more.records[0] == out.records[0]
    assert sum((r["indices"] for r in more.records), []) == order.tolist()
    plain, _ = run(setup, tmp_path / "plain", SMALL)
    for a, b in zip(more.records, plain.records, strict=True):
        assert {k: a[k] for k in OUTCOME} == {k: b[k] for k in OUTCOME}


def test_a_cut_first_batch_is_a_clear_error_and_resume_with_more_time_runs_it(
    setup, tmp_path, slow_shell_suite
):
    slow_shell_suite["jump_at"] = 0
    config = dataclasses.replace(SMALL, num_points=4, budget="60s")
    with pytest.raises(ValueError, match="ran out inside the first batch"):
        run(setup, tmp_path / "run", config, clock=slow_shell_suite["clock"])
    with pytest.raises(ValueError, match="was spent before any batch finished"):
        run(setup, tmp_path / "run", config, resume=True)
    slow_shell_suite["jump_at"] = 10**9
    out, _ = run(setup, tmp_path / "run", dataclasses.replace(config, budget="20000s"), resume=True)
    assert out.stopping["rule"] == "points" and len(out.records) == 1


def test_more_points_on_resume_extend_the_run_and_other_attack_settings_are_refused(
    setup, tmp_path
):
    order = walk_order(12, seed=0)
    first, s1 = run(setup, tmp_path / "run", dataclasses.replace(SMALL, num_points=6))
    s1.close()
    assert [len(r["indices"]) for r in first.records] == [4, 2]
    more, s2 = run(setup, tmp_path / "run", SMALL, resume=True)
    s2.close()
    # The last partial batch is kept as it was; the run goes on after it.
    assert [len(r["indices"]) for r in more.records] == [4, 2, 4, 2]
    assert more.records[:2] == first.records
    assert sum((r["indices"] for r in more.records), []) == order.tolist()
    with pytest.raises(SettingsMismatch, match="suite"):
        run(setup, tmp_path / "run", dataclasses.replace(SMALL, steps=3), resume=True)
    with pytest.raises(ValueError, match="beyond the 6 points planned|not the next ones"):
        run(setup, tmp_path / "run", dataclasses.replace(SMALL, num_points=6), resume=True)


def test_table2_on_more_walked_points_keeps_its_finished_batches(tmp_path):
    base = small_conv(seed=3, shape=(32, 32, 3), classes=4)
    shell = MCNShell(base, 4.0, steps=1)
    x = np.random.default_rng(0).uniform(0, 255, size=(12, 32, 32, 3)).astype(np.float32)
    y = base.predict(x, verbose=0).argmax(1)  # every point base-correct: Table 2 takes them all
    config = DefenceConfig(batch_points=4, attack=BaseAttackConfig(max_iterations=2))

    def table2(walk, resume):
        store = RunStore(str(tmp_path / "t2"), resume=resume)
        context = RunContext.for_defence(config, store, epsilon=6.0, seed=0)
        out = run_table2(base, shell, x, y, config, context, walk=walk)
        store.close()
        return out

    first = table2(6, False)
    more = table2(12, True)
    assert [len(r["indices"]) for r in more.records] == [4, 2, 4, 2]
    assert more.records[:2] == first.records
    order = walk_order(12, seed=0)
    assert sum((r["indices"] for r in more.records), []) == order.tolist()


def test_continue_batches_keeps_saved_batches_and_refuses_others():
    points = np.arange(10)
    assert [b.tolist() for b in continue_batches(points, {}, 4)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    kept = continue_batches(points, {0: [0, 1], 2: [6, 7, 8, 9]}, 4)
    assert [b.tolist() for b in kept] == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(ValueError, match="not the next ones"):
        continue_batches(points, {0: [1, 2]}, 4)
    with pytest.raises(ValueError, match="beyond"):
        continue_batches(points[:4], {0: [0, 1, 2, 3], 3: [9]}, 4)


def test_the_planned_duration_counts_the_points_the_budget_fits():
    from manifold_tf.evaluation import estimate

    class Shell:
        num_classes = 10

    cw = CWSettings(
        max_iterations=10, initial_const=1e-5, largest_const=20.0, stop_within_epsilon=True
    )

    def phases_for(n):
        return estimate.defence_passes(
            table2_points=n,
            num_points=n,
            shell=Shell(),
            per_prediction=100,
            cw=cw,
            suite=AdaptiveConfig(),
        )

    full = phases_for(100)
    skip = ("Table 2: the shell", "adaptive: sanity")
    per_point = (
        estimate.EXPECTED_SHARE * sum(p for k, p in full.items() if not k.startswith(skip)) / 100
    )  # the expected cost sizes the batches the plan counts
    rate = 1000.0
    batch_s = 30 * per_point / rate
    phases, note = estimate.under_budget(
        phases_for, budget_s=2.5 * batch_s, rate=rate, num_points=100, batch_points=30
    )
    assert phases == phases_for(60) and "fits 60 of the 100 points" in note  # 2 whole batches
    same, none = estimate.under_budget(
        phases_for, budget_s=None, rate=rate, num_points=100, batch_points=30
    )
    assert same == full and none == ""
    roomy, note = estimate.under_budget(
        phases_for, budget_s=10 * batch_s, rate=rate, num_points=100, batch_points=30
    )
    assert roomy == full and note == ""
    tight, note = estimate.under_budget(
        phases_for, budget_s=0.5 * batch_s, rate=rate, num_points=100, batch_points=30
    )
    assert tight == phases_for(15) and "cut to those 15 points" in note  # as fits() cuts it
    none_fit, note = estimate.under_budget(
        phases_for, budget_s=0.5 * batch_s / 30, rate=rate, num_points=100, batch_points=30
    )
    assert none_fit == phases_for(30) and "Not even one point fits" in note


def test_a_batch_is_sized_to_the_time_left_at_the_measured_rate():
    done = [dict(indices=[0, 1, 2, 3], seconds=dict(total=8.0))]  # 2 s per point
    assert adaptive_budget.fits(done, 5.0, 4, None) == 2
    assert adaptive_budget.fits(done, 1.0, 4, None) == 0
    assert adaptive_budget.fits(done, float("inf"), 4, None) == 4
    assert adaptive_budget.fits([], 5.0, 4, None) == 4  # no rate known: the whole batch
    assert adaptive_budget.fits([], 5.0, 4, 2.0) == 2  # the plan's rate before the first batch
    order = np.arange(10)
    batches = continue_batches(order, {}, 4)
    records = [done[0], None, None]
    got = adaptive_budget.shrink(order, batches, records, 1, 2, 4)
    assert got.tolist() == [4, 5]
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert records == [done[0], None, None]
    rule = adaptive_budget.stopping_rule(dataclasses.replace(SMALL, budget="100s"), 100)
    assert rule(done, left=1.0, want=4)["rule"] == "budget"  # not one point fits
    assert rule(done, left=5.0, want=4) is None
