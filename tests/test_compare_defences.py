"""Several defences on the same points (``--shell=mcn,ncn,...``): the base's suite runs once per
batch, each defence's records and summary are those of a single-shell run on the same points, the
comparison report agrees with the summaries, the budget and resume hold for the comparison as a
whole, and bad shell lists are clear errors.

Tiny shapes: 8x8x3 images (pixels 0..255), 4 classes, 12 points in batches of 4. The defences:
MCN and a defence defined outside the package (the dithered quantisation of
``test_custom_defence``, registered there as ``test_dither``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import small_conv, subprocess_env
from manifold_tf import interrupts
from manifold_tf.attacks import CWSettings
from manifold_tf.evaluation import (
    adaptive,
    adaptive_budget,
    adaptive_report,
    adaptive_suites,
    compare,
    compare_report,
    suite_batch,
)
from manifold_tf.evaluation.config import AdaptiveConfig, ShellConfig, ThreatConfig, shell_kinds
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.store import RunStore
from manifold_tf.shells import SHELLS, HedgeShell, MCNShell
from test_custom_defence import DitherShell

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = AdaptiveConfig(
    num_points=12,
    steps=2,
    sanity_points=3,
    sanity_steps=2,
    base_apgd_steps=2,
    targets=1,
    eot_samples=2,
    shell_attacks=("transfer_cw", "bpda"),
    budget=None,
)
CW = CWSettings(max_iterations=2)
EPSILON = 1.0  # CW (2 steps) breaks none, the base suite some: both suites have work
KINDS = ("mcn", "test_dither")


@pytest.fixture(scope="module")
def setup():
    base = small_conv(seed=3, shape=(8, 8, 3), classes=4)
    shells = {
        "mcn": MCNShell(base, 4.0, steps=2),
        "test_dither": DitherShell(base, step=16.0, seed=3, jit_compile=False),
        "hedge": HedgeShell(base, 4.0, steps=2, step_size=2.0, seed=1),
    }
    x = np.random.default_rng(0).uniform(0, 255, size=(12, 8, 8, 3)).astype(np.float32)
    y = base.predict(x, verbose=0).argmax(1)
    y[[1, 6]] = (y[[1, 6]] + 1) % 4  # two points every classifier gets wrong at x
    return base, shells, x, y


class Counter:
    """Counts calls of a module function (``base_suite``, ``shell_batch``) while patched in."""

    def __init__(self, monkeypatch, module, name, before=None):
        self.calls, real = [], getattr(module, name)

        def counted(*args, **kwargs):
            self.calls.append((args, kwargs))
            if before is not None:
                before(len(self.calls), args, kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def compare_run(setup, path, *, kinds=KINDS, config=SMALL, resume=False, clock=None):
    base, shells, x, y = setup
    store = RunStore(str(path), resume=resume)
    comparison = compare.run_comparison(
        base,
        {k: shells[k] for k in kinds},
        x,
        y,
        config,
        RunContext(
            store=store,
            epsilon=EPSILON,
            cw_settings=CW,
            seed=0,
            batch_points=4,
            **({} if clock is None else dict(clock=clock)),
        ),
    )
    return comparison, store


def timeless(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "base_seconds")} for r in records]


def without_shared_note(summary: dict) -> dict:
    out = copy.deepcopy(summary)
    out["ledger"].pop("base_suite_shared")
    return out


@pytest.fixture(scope="module")
def compared(setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("compare") / "run"
    with pytest.MonkeyPatch.context() as mp:
        base_calls = Counter(mp, adaptive_suites, "base_suite")
        comparison, store = compare_run(setup, path)
    report = compare_report.write_comparison(comparison, setup[2], store)
    store.close()
    return comparison, path, report, len(base_calls.calls)


@pytest.fixture(scope="module")
def singles(setup, tmp_path_factory):
    """Each defence alone, as ``--shell=<kind>`` runs it, on the same points."""
    base, shells, x, y = setup
    out = {}
    for kind in KINDS:
        store = RunStore(str(tmp_path_factory.mktemp("single") / kind))
        with pytest.MonkeyPatch.context() as mp:
            base_calls = Counter(mp, adaptive_suites, "base_suite")
            run = adaptive.run_adaptive(
                base,
                shells[kind],
                x,
                y,
                SMALL,
                RunContext(store=store, epsilon=EPSILON, cw_settings=CW, seed=0, batch_points=4),
            )
        adaptive_report.write_adaptive_report(run, x, store)
        summary = json.load(open(store.path("summary.json")))
        store.close()
        out[kind] = (run, summary, len(base_calls.calls))
    return out


def test_the_base_suite_runs_once_per_batch_and_its_cost_is_counted_once(setup, compared, singles):
    comparison, path, report, base_calls = compared
    assert base_calls == 3  # 12 points in batches of 4, for both defences
    assert all(calls == 3 for _, _, calls in singles.values())  # each single run pays it again
    assert sorted(os.listdir(path / compare.BASE)) == sorted(
        ["settings.json"] + [f"batch_{b:03d}{s}" for b in range(3) for s in (".json", "_xcw.npy")]
    )
    base_passes = sum(r["base_passes"] for r in comparison.base_records)
    assert base_passes > 0 and report["base"]["cost"]["passes"] == base_passes
    single_totals = {
        k: sum(r["cost"]["base_passes"] for r in run.records) for k, (run, _, _) in singles.items()
    }
    own = {k: d["cost"]["shell_suite_passes"] for k, d in report["defences"].items()}
    for k in KINDS:  # each defence's own suite: what its single run spent beyond the base's
        assert own[k] == single_totals[k] - base_passes
    assert report["cost"]["total_passes"] == base_passes + sum(own.values())
    assert report["cost"]["separate_runs_passes"] == sum(single_totals.values())
    for k in KINDS:
        c = report["defences"][k]["cost"]
        assert c["passes_per_prediction"] == setup[1][k].passes_per_prediction()
        assert c["shell_suite_passes_per_point"] == pytest.approx(own[k] / 12)
        # Each ledger counts the base's suite as a single run would, and says it is shared.
        summary = json.load(open(path / k / "summary.json"))
        shared = summary["ledger"]["base_suite_shared"]
        assert shared["passes"] == base_passes and shared["shared_with"] == [
            o for o in KINDS if o != k
        ]
        assert summary["ledger"]["total_passes"] == single_totals[k]
        assert "counts it once" in open(path / k / "adaptive.md").read()


def test_each_defence_gets_the_records_and_summary_of_a_single_shell_run(compared, singles):
    comparison, path, _, _ = compared
    for kind, (run, summary, _) in singles.items():
        got = comparison.runs[kind]
        assert timeless(got.records) == timeless(run.records), kind
        assert got.settings == run.settings and got.sanity == run.sanity
        assert got.stopping == run.stopping
        mine = json.load(open(path / kind / "summary.json"))
        assert without_shared_note(mine) == summary, kind
    # The defences disagree somewhere, or the test could not tell their records apart.
    a, b = (comparison.runs[k].records for k in KINDS)
    assert any(ra["shell_broken_by"] != rb["shell_broken_by"] for ra, rb in zip(a, b, strict=True))


def test_the_comparison_report_holds_the_summaries_numbers_and_a_png(compared):
    _, path, report, _ = compared
    saved = json.load(open(path / "comparison.json"))
    assert saved["kinds"] == list(KINDS) and saved["n"] == 12
    for k in KINDS:
        summary = json.load(open(path / k / "summary.json"))
        d = saved["defences"][k]
        for key in ("robust_accuracy", "clean_accuracy"):
            for f in ("estimate", "ci_low", "ci_high", "shell_only", "base_only", "n", "method"):
                assert d["difference"][key][f] == summary["difference"][key][f], (k, key, f)
            assert d["difference"][key]["method"] == "tango"  # the stats module's default
            assert d[key.split("_")[0]]["rate"] == summary["shell"][key]
        assert saved["base"]["robust"]["rate"] == summary["base"]["robust_accuracy"]
        assert saved["base"]["clean"]["rate"] == summary["base"]["clean_accuracy"]
        assert d["mcnemar_p_value"] == summary["mcnemar_p_value"]
    # Read back from the run directory: the same numbers (the run's saved sanity checks too).
    read = compare_report.comparison_of(compare.read_comparison(str(path)))
    assert read["kinds"] == list(KINDS) and read["cost"] == saved["cost"]
    for k in KINDS:
        assert read["defences"][k] == saved["defences"][k], k
    md = open(path / "comparison.md").read()
    assert "n = 12" in md and all(f"`{k}`" in md for k in KINDS) and "counted once" in md
    with open(path / "comparison.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_stopped_comparison_resumes_where_it_stopped(setup, compared, tmp_path, monkeypatch):
    done, _, _, _ = compared
    mcn = setup[1]["mcn"]

    def stop_in_batch_1(calls, args, kwargs):  # during MCN's half of batch 1, before its save
        if args[0] is mcn and args[4][0] == done.base_records[1]["indices"][0]:
            interrupts.request()

    shell_calls = Counter(monkeypatch, suite_batch, "shell_batch", before=stop_in_batch_1)
    try:
        with pytest.raises(interrupts.Stopped):
            compare_run(setup, tmp_path / "run")
    finally:
        interrupts.uninstall()
    assert len(shell_calls.calls) == 3  # both in batch 0, MCN in batch 1 (saved, then stopped)
    store = RunStore(str(tmp_path / "run"), resume=True)
    assert store.finished(compare.BASE) == [0, 1]
    assert store.sub("mcn").finished(adaptive.PROTOCOL) == [0, 1]
    assert store.sub("test_dither").finished(adaptive.PROTOCOL) == [0]
    store.close()
    # Read while stopped (as while running): the batch both defences finished, nothing written.
    files = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    partial = compare_report.comparison_of(compare.read_comparison(str(tmp_path / "run")))
    assert partial["n"] == 4 and partial["kinds"] == list(KINDS)
    assert partial["stopping"]["rule"] == "read"
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == files

    monkeypatch.undo()
    base_calls = Counter(monkeypatch, adaptive_suites, "base_suite")
    shell_calls = Counter(monkeypatch, suite_batch, "shell_batch")
    again, store = compare_run(setup, tmp_path / "run", resume=True)
    store.close()
    assert len(base_calls.calls) == 1  # batch 2 only: batches 0 and 1 kept their base half
    assert len(shell_calls.calls) == 3  # test_dither in batch 1, both in batch 2
    for k in KINDS:
        assert timeless(again.runs[k].records) == timeless(done.runs[k].records), k
    assert timeless(again.base_records) == timeless(done.base_records)


def test_a_resumed_comparison_may_add_a_defence_on_the_same_points(
    setup, compared, tmp_path, monkeypatch
):
    done, path, _, _ = compared
    shutil.copytree(path, tmp_path / "run")
    base_calls = Counter(monkeypatch, adaptive_suites, "base_suite")
    more, store = compare_run(setup, tmp_path / "run", kinds=(*KINDS, "hedge"), resume=True)
    assert len(base_calls.calls) == 0  # the base's half of every batch is reused
    for k in KINDS:
        assert timeless(more.runs[k].records) == timeless(done.runs[k].records)
    hedge = more.runs["hedge"].records
    assert [r["indices"] for r in hedge] == [r["indices"] for r in done.base_records]
    assert [r["base_broken_by"] for r in hedge] == [r["base_broken_by"] for r in done.base_records]
    report = compare_report.write_comparison(more, setup[2], store)
    store.close()
    assert report["kinds"] == [*KINDS, "hedge"] and report["n"] == 12


class Clock:
    """Fake seconds: each read advances one second."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_the_budget_holds_for_the_comparison_as_a_whole(setup, tmp_path, monkeypatch):
    clock, dither = Clock(), setup[1]["test_dither"]

    def late(calls, args, kwargs):  # the second defence's half of batch 1 overruns the budget
        if args[0] is dither and calls == 4:
            clock.t += 10_000.0

    Counter(monkeypatch, suite_batch, "shell_batch", before=late)
    config = dataclasses.replace(SMALL, budget="2000s")
    cut, store = compare_run(setup, tmp_path / "run", config=config, clock=clock)
    store.close()
    assert cut.stopping["rule"] == "budget" and cut.stopping["cut"]["batch"] == 1
    # Batch 1 is dropped for every defence, though MCN finished its half: the same points.
    assert all(len(run.records) == 1 for run in cut.runs.values())
    assert len(cut.base_records) == 1
    saved = RunStore(str(tmp_path / "run"), resume=True)
    note = saved.load_note(compare.BASE, adaptive_budget.CUT_NOTE)
    assert note["cut"][0]["batch"] == 1 and note["cut"][0]["seconds"] >= 10_000
    # What batch 1 finished before the cut stays on disk for a resume: the base's and MCN's half.
    assert saved.finished(compare.BASE) == [0, 1]
    assert saved.sub("mcn").finished(adaptive.PROTOCOL) == [0, 1]
    assert saved.sub("test_dither").finished(adaptive.PROTOCOL) == [0]

    monkeypatch.undo()
    base_calls = Counter(monkeypatch, adaptive_suites, "base_suite")
    shell_calls = Counter(monkeypatch, suite_batch, "shell_batch")
    more, store = compare_run(
        setup, tmp_path / "run", config=dataclasses.replace(SMALL, budget="100000s"), resume=True
    )
    store.close()
    assert all(len(run.records) == 3 for run in more.runs.values())
    assert len(base_calls.calls) == 1  # batch 2: batch 1's base half was saved before the cut
    assert len(shell_calls.calls) == 3  # test_dither's batch 1, then both on batch 2


def test_shell_lists_name_registered_kinds_a_users_own_included(setup):
    assert ShellConfig(kind=" mcn, test_dither ").kinds == ("mcn", "test_dither")
    assert ShellConfig(kind="mcn").kinds == ("mcn",) and ShellConfig().kinds == ("mcn",)
    both = ShellConfig(kind="mcn,test_dither", steps=2)
    assert isinstance(both.for_kind("test_dither").build(setup[0], ThreatConfig()), DitherShell)
    with pytest.raises(ValueError, match="for_kind"):
        both.build(setup[0], ThreatConfig())
    known = repr(sorted(SHELLS))
    with pytest.raises(ValueError) as e:
        shell_kinds("mcn,bogus,ncm")
    assert "'bogus', 'ncm'" in str(e.value) and known.replace("[", "") in str(e.value)
    with pytest.raises(ValueError, match="empty item"):
        shell_kinds("mcn,,ncn")
    with pytest.raises(ValueError, match="'mcn' more than once"):
        shell_kinds("mcn,ncn,mcn")
    with pytest.raises(ValueError, match="clash"):
        compare.check_kinds(["mcn", "adaptive_base"])
    with pytest.raises(ValueError, match="two or more"):
        compare.check_kinds(["mcn"])


def test_a_bad_shell_list_on_the_command_line_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            "--shell=mcn,hedge,mnc",
            "--dataset=synthetic",
            f"--output_dir={out}",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode != 0
    assert "unknown shell kind 'mnc' in --shell=mcn,hedge,mnc" in done.stderr
    assert "'anti_adversary', 'cw', 'hedge', 'mcn', 'ncn'" in done.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def nearest_centre(tmp_path_factory) -> str:
    """A nearest-centre classifier of the synthetic data (32x32x3, 10 classes), saved."""
    from helpers import nearest_centre_model
    from manifold_tf.data import synthetic_manifold

    centres, _ = synthetic_manifold(num_classes=10)
    path = str(tmp_path_factory.mktemp("model") / "nearest_centre.keras")
    nearest_centre_model(centres, temperature=3e4).save(path)
    return path


def test_evaluate_compares_the_listed_kinds_with_cw_computed_once(
    nearest_centre, tmp_path, monkeypatch
):
    from manifold_tf import attacks, evaluation
    from manifold_tf.evaluation import presets

    attacked = []
    real_cw = attacks.cw_linf

    def cw_linf(model, x, *args, **kwargs):
        attacked.append(len(x))
        return real_cw(model, x, *args, **kwargs)

    monkeypatch.setattr(attacks, "cw_linf", cw_linf)
    out = tmp_path / "run"
    config = presets.from_preset(
        "default",
        dict(
            mode="defence",
            inputs=dict(checkpoint=nearest_centre, dataset="synthetic"),
            run=dict(output_dir=str(out)),
            threat=dict(epsilon=16.0),
            defence=dict(
                batch_points=2,
                shell=dict(kind="test_dither,anti_adversary", anti_steps=1),
                attack=dict(max_iterations=3),
            ),
            adaptive=dict(
                num_points=4,
                budget=None,
                steps=2,
                shell_attacks=("transfer_cw", "bpda"),
                base_attacks=("apgd_ce",),
                base_apgd_steps=2,
                eot_samples=2,
                sanity_points=0,
            ),
        ),
    )
    text = evaluation.evaluate(config)
    assert "Defences compared on the same points (n = 4" in text
    # CW ran once per point, in the verdict's base half: Table 2 of both defences reused it.
    assert sum(attacked) == 4
    report = json.load(open(out / "comparison.json"))
    assert report["kinds"] == ["test_dither", "anti_adversary"]
    assert set(report["table2"]) == {"test_dither", "anti_adversary"}
    for kind in report["kinds"]:
        for name in ("summary.json", "adaptive.md", "defence.md", "defence.json"):
            assert (out / kind / name).exists(), (kind, name)
        t2 = json.load(open(out / kind / "defence.json"))
        assert t2["settings"]["shell"]["shell"] == kind
        assert report["table2"][kind]["points"] == t2["average"]["points"]
    a, b = (json.load(open(out / k / "defence.json"))["points"] for k in report["kinds"])
    assert [p["base_success"] for p in a] == [p["base_success"] for p in b]  # the same x'
    assert not (out / "summary.json").exists()  # no single-shell report at the top


def test_until_decided_waits_for_every_defence():
    config = dataclasses.replace(SMALL, until="decided")
    helps = [dict(indices=list(range(60)), shell_broken_by=[""] * 60, base_broken_by=["x"] * 60)]
    unclear = [dict(indices=[0, 1, 2, 3], shell_broken_by=["", "x", "", "x"],
                    base_broken_by=["x", "", "x", ""])]  # fmt: skip
    rule = compare._decided(config, n_total=10_000)
    assert adaptive_budget.stopping_rule(config, 10_000)(helps)["rule"] == "decided"
    assert rule({"mcn": helps, "ncn": unclear}) is None
    both = rule({"mcn": helps, "ncn": helps})
    assert both["rule"] == "decided" and "mcn:" in both["reason"] and "ncn:" in both["reason"]
