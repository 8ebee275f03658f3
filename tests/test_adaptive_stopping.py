"""The verdict's stopping rules: until=decided (a confidence sequence), a time budget, resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from helpers import small_conv
from manifold_tf.attacks import CWSettings
from manifold_tf.evaluation import adaptive, adaptive_report
from manifold_tf.evaluation.config import AdaptiveConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.store import RunStore
from manifold_tf.shells import MCNShell

SMALL = AdaptiveConfig(
    num_points=12,
    steps=2,
    square_queries=3,
    sanity_points=0,
    lift_steps=2,
    base_apgd_steps=2,
    targets=1,
    shell_attacks=("transfer_cw", "bpda"),
)
CW = CWSettings(max_iterations=2)


@pytest.fixture(scope="module")
def setup():
    base = small_conv(seed=3, shape=(8, 8, 3), classes=4)
    shell = MCNShell(base, 4.0, steps=2)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(12, 8, 8, 3)).astype(np.float32)
    y = shell.predict(x, verbose=0).argmax(1)  # right at x: the attacks decide robustness
    return base, shell, x, y


def run(setup, path, config, *, resume=False):
    base, shell, x, y = setup
    store = RunStore(str(path), resume=resume)
    return adaptive.run_adaptive(
        base,
        shell,
        x,
        y,
        config,
        RunContext(store=store, epsilon=6.0, cw_settings=CW, seed=0, batch_points=4),
    ), store


def test_decided_stops_at_the_first_look_that_decides_and_resumes_there(setup, tmp_path):
    # With 4 of 12 points seen, the set's difference cannot exceed 8/12 even if every unseen point
    # favoured the shell: an upper end below a 100-point margin is certain after the first batch.
    config = dataclasses.replace(SMALL, until="decided", margin=100.0)
    first, store = run(setup, tmp_path / "run", config)
    assert [r["batch"] for r in first.records] == [0]
    assert first.stopping == dict(rule="decided", reason="gains less than margin", n=4)
    report = adaptive_report.write_adaptive_report(first, setup[2], store)
    diff = report["verdict"]["difference"]["robust_accuracy"]
    assert diff["method"] == "betting sequence" and diff["n"] == 4
    assert diff["ci_low"] <= diff["estimate"] <= diff["ci_high"] < 1.0
    again, _ = run(setup, tmp_path / "run", config, resume=True)
    assert again.records == first.records and again.stopping == first.stopping


def test_a_time_budget_spent_inside_the_first_batch_leaves_no_points_and_says_so(setup, tmp_path):
    # The deadline holds between attack steps: a batch it cuts is dropped whole, and with no
    # finished batch there is no verdict (tests/test_budget.py: a cut after finished batches,
    # the fixed-n interval, resume with a larger budget).
    config = dataclasses.replace(SMALL, budget="0.001s")
    with pytest.raises(ValueError, match="ran out inside the first batch"):
        run(setup, tmp_path / "run", config)


def test_without_a_rule_every_planned_point_runs_and_summary_has_the_difference(setup, tmp_path):
    out, store = run(setup, tmp_path / "run", SMALL)
    assert sum(len(r["indices"]) for r in out.records) == 12
    assert out.stopping["rule"] == "points"
    adaptive_report.write_adaptive_report(out, setup[2], store)
    summary = json.load(open(store.path("summary.json")))
    for key in ("robust_accuracy", "clean_accuracy"):
        d = summary["difference"][key]
        assert set(d) >= {"estimate", "ci_low", "ci_high", "shell_only", "base_only"}
        assert d["ci_low"] <= d["estimate"] <= d["ci_high"]
    shell = summary["shell"]["robust_accuracy"] * 12
    base = summary["base"]["robust_accuracy"] * 12
    d = summary["difference"]["robust_accuracy"]
    assert d["shell_only"] - d["base_only"] == pytest.approx(shell - base)
