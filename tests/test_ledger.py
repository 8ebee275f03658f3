"""The verdict's cost ledger: per-attack passes add up to the record's cost, broken counts match
``*_broken_by``, the report's table and figure; ``run_standing``'s per-step costs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import small_conv
from manifold_tf.attacks import AttackResult, CWSettings, Step, run_standing
from manifold_tf.evaluation import adaptive, adaptive_report, ledger
from manifold_tf.evaluation.config import AdaptiveConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.store import RunStore
from manifold_tf.shells import MCNShell

CONFIG = AdaptiveConfig(
    num_points=10,
    steps=2,
    square_queries=3,
    sanity_points=0,
    lift_steps=2,
    base_apgd_steps=2,
    base_targets=2,
    targets=1,
    budget=None,
    shell_attacks=("transfer_cw", "lift", "bpda", "square"),
    base_attacks=("apgd_ce", "apgd_t"),
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = small_conv(seed=3, shape=(8, 8, 3), classes=4)
    shell = MCNShell(base, 4.0, steps=2)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(10, 8, 8, 3)).astype(np.float32)
    y = shell.predict(x, verbose=0).argmax(1)
    y[:2] = (y[:2] + 1) % 4  # two points wrong at x: attacked by neither suite
    store = RunStore(str(tmp_path_factory.mktemp("ledger") / "run"))
    out = adaptive.run_adaptive(
        base,
        shell,
        x,
        y,
        CONFIG,
        RunContext(
            store=store,
            epsilon=12.0,
            cw_settings=CWSettings(max_iterations=3),
            seed=0,
            batch_points=4,
        ),
    )
    report = adaptive_report.write_adaptive_report(out, x, store)
    return out, report, store, shell


def test_each_record_ledger_adds_up_to_its_cost(run):
    out, _, _, shell = run
    per = shell.passes_per_prediction()
    for r in out.records:
        led = r["ledger"]
        total = sum(np.sum(v) for s in ledger.SUITES for v in led[s].values())
        assert total + np.sum(led["shell_checks"]) == r["cost"]["base_passes"]
        n = len(r["indices"])
        assert all(len(v) == n for s in ledger.SUITES for v in led[s].values())
        # The shell's attempted points, derived from broken_by, are run_standing's own count.
        tried = ledger.attempted_masks(r["shell_broken_by"], list(led["shell"]))
        assert {k: int(m.sum()) for k, m in tried.items()} == r["attempted"]
        # A point no attack ran on costs nothing but the shell's checks.
        for k, passes in led["shell"].items():
            assert all(p == 0 for p, t in zip(passes, tried[k], strict=True) if not t), k
            # Every point an attack ran on costs at least its verifying shell prediction.
            assert all(p >= per for p, t in zip(passes, tried[k], strict=True) if t), k
        assert led["cw"] == r["cw_iterations"]


def test_the_run_ledger_is_the_sum_of_its_rows_and_counts_broken_by(run):
    out, report, _, _ = run
    led = report["verdict"]["ledger"]
    n = sum(len(r["indices"]) for r in out.records)
    assert led["n"] == n == 10
    rows = {s: {row["attack"]: row for row in led["suites"][s]} for s in ledger.SUITES}
    assert led["total_passes"] == sum(r["cost"]["base_passes"] for r in out.records)
    assert led["total_passes"] == led["shell_checks"]["passes"] + sum(
        row["passes"] for s in ledger.SUITES for row in rows[s].values()
    )
    shares = led["shell_checks"]["share"] + sum(
        row["share"] for s in ledger.SUITES for row in rows[s].values()
    )
    assert shares == pytest.approx(1.0)
    for suite in ledger.SUITES:
        broken_by = sum((r[f"{suite}_broken_by"] for r in out.records), [])
        for name, row in rows[suite].items():
            assert row["broken"] == broken_by.count(name)
            assert row["broken"] <= row["attempted"] <= n - broken_by.count("clean")
        assert led["clean_broken"][suite] == broken_by.count("clean") >= 2
    assert list(rows["shell"]) == list(CONFIG.shell_attacks)
    assert list(rows["base"]) == ["transfer_cw", "apgd_ce", "apgd_t"]
    assert rows["base"]["transfer_cw"]["passes"] == 0  # CW's x' is given: its cost is beside
    cw = sum((r["cw_iterations"] for r in out.records), [])
    assert led["cw"]["passes"] == sum(i for i in cw if i >= 0) > 0


def test_summary_json_keeps_base_passes_and_carries_the_ledger(run):
    _, report, store, _ = run
    summary = json.load(open(store.path("summary.json")))
    led = summary["ledger"]
    assert summary["passes_per_point"]["base_passes"] == pytest.approx(
        led["total_passes"] / led["n"]
    )
    assert led == json.loads(json.dumps(report["verdict"]["ledger"]))
    md = open(store.path("adaptive.md")).read()
    assert "| attack | points attempted | points broken | passes |" in md
    assert "shell: bpda" in md and "base: apgd_t" in md and "CW x' on the base" in md
    with open(store.path("adaptive_ledger.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_standing_keeps_each_steps_cost_per_point_and_stops_when_asked():
    x = np.zeros((4, 2, 2, 1), np.float32)
    y = np.zeros(4, np.int64)

    def step(name, wins, passes):
        def fn(xs, ys, idx):
            return AttackResult(xs, np.isin(idx, wins), base_passes=passes, shell_predictions=1)

        return Step(name, fn)

    steps = [step("a", [1], 10), step("b", [2], 3), step("c", [], 5)]
    suite = run_standing(steps, x, y, broken=np.array([True, False, False, False]))
    np.testing.assert_array_equal(suite.step_cost["a"]["base_passes"], [0, 10, 10, 10])
    np.testing.assert_array_equal(suite.step_cost["b"]["base_passes"], [0, 0, 3, 3])
    np.testing.assert_array_equal(suite.step_cost["c"]["shell_predictions"], [0, 0, 0, 1])
    total = sum(c["base_passes"] for c in suite.step_cost.values())
    np.testing.assert_array_equal(total, suite.result.base_passes)
    assert suite.complete and list(suite.broken_by) == ["clean", "a", "b", ""]
    asked = []
    cut = run_standing(steps, x, y, stop=lambda: asked.append(1) or len(asked) > 1)
    assert not cut.complete and list(cut.attempted) == ["a"] and len(asked) == 2


def test_bench_suite_compares_outcomes_point_by_point_and_reads_the_ledger(run, capsys):
    from bench import bench_suite

    _, report, store, _ = run
    side = bench_suite.parse_run(store.directory)
    assert side["ledger"] == json.loads(json.dumps(report["verdict"]["ledger"]))
    assert len(side["outcomes"]) == 10
    same = bench_suite.compare_outcomes(side["outcomes"], side["outcomes"])
    assert same["points"] == 10 and not same["lost"] and not same["gained"]
    before = {
        "1": dict(shell="bpda", base=""),
        "2": dict(shell="", base="apgd_ce"),
        "3": dict(shell="clean", base="clean"),
        "5": dict(shell="", base=""),
    }
    after = {
        "1": dict(shell="", base=""),  # lost: the after suite misses what bpda found
        "2": dict(shell="square", base="apgd_t"),  # gained for the shell, same for the base
        "3": dict(shell="clean", base="clean"),
        "4": dict(shell="", base=""),
    }
    out = bench_suite.compare_outcomes(before, after)
    assert out["lost"] == [dict(index=1, suite="shell", before="bpda")]
    assert out["gained"] == [dict(index=2, suite="shell", after="square")]
    assert (out["points"], out["only_before"], out["only_after"]) == (3, ["5"], ["4"])
    assert [r["flag"] for r in out["rows"]] == ["LOST", "", ""]
    assert out["rows"][1] == dict(
        index=2,
        shell_before="",
        shell_after="square",
        base_before="apgd_ce",
        base_after="apgd_t",
        flag="",
    )
    bench_suite._print_outcomes(out)
    assert "WEAKER: 1 point(s) broken before stand after: 1 (shell, by bpda)" in (
        capsys.readouterr().out
    )
    rows = bench_suite._ledger_rows(dict(before=side, after=side))
    assert [r["attack"] for r in rows][:3] == ["base: transfer_cw", "base: apgd_ce", "base: apgd_t"]
    assert all(r["broken_before"] == r["broken_after"] for r in rows)
