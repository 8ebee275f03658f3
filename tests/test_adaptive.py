"""Tests of the adaptive evaluation (the verdict): the CLI headline, summary.json, sanity checks."""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import warm
from helpers import subprocess_env
from manifold_tf.attacks import CWSettings
from manifold_tf.evaluation import adaptive, adaptive_report
from manifold_tf.evaluation.config import AdaptiveConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.stats import mcnemar_exact
from manifold_tf.evaluation.store import RunStore
from manifold_tf.shells import MCNShell

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--adaptive_steps=3",
    "--adaptive_square_queries=4",
    "--adaptive_sanity_points=3",
    "--adaptive_sanity_steps=4",
    "--adaptive_lift_steps=3",
    "--adaptive_base_apgd_steps=5",
]


@pytest.fixture(scope="module")
def headline(nearest_centre_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "headline")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "evaluate.py"),
        "--shell=mcn",
        "--delta=8",
        f"--checkpoint={nearest_centre_checkpoint}",
        "--dataset=synthetic",
        f"--output_dir={out}",
        "--num_points=8",
        "--defence_batch_points=4",
        "--epsilon=36",
        "--base_attack_max_iterations=5",
        "--shell_steps=3",
        *SMALL,
    ]
    done = warm.run(cmd, env=subprocess_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout, cmd


def test_headline_prints_the_verdict_first_and_writes_summary_json(headline):
    out, stdout, _ = headline
    verdict_at = stdout.index("Adaptive evaluation of the MCN shell")
    assert verdict_at < stdout.index("Defence evaluation (Table 2 protocol)")
    assert "shell, robust (worst case" in stdout and "McNemar" in stdout
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["n"] == 8
    for who in ("shell", "base"):
        clean, robust = summary[who]["clean_accuracy"], summary[who]["robust_accuracy"]
        assert 0 <= robust <= clean <= 1
        lo, hi = summary[who]["robust_accuracy_ci"]
        assert lo <= robust <= hi
        # Robust accuracy after each attack never rises along the suite.
        steps = list(summary[who]["robust_accuracy_by_attack"].values())
        assert all(b <= a for a, b in zip(steps, steps[1:], strict=False))
        assert steps[-1] == robust
    assert summary["threat_model"]["epsilon_pixels"] == 36
    assert summary["threat_model"]["epsilon_fraction"] == pytest.approx(36 / 255)
    assert 0 <= summary["mcnemar_p_value"] <= 1
    assert summary["versions"]["tensorflow"] and "passes_per_point" in summary
    report = json.load(open(os.path.join(out, "adaptive.json")))
    # Every broken point's x' is inside the ball and the box.
    for b in range(2):
        x_adv = np.load(os.path.join(out, "adaptive", f"batch_{b:03d}_xadv.npy"))
        assert x_adv.min() >= 0 and x_adv.max() <= 255
    assert max(p["linf"] for p in report["points"]) <= 36 + 1e-3
    for name in ("adaptive.md", "adaptive_failures.png", "adaptive_attacks.png", "defence.md"):
        assert os.path.exists(os.path.join(out, name)), name
    md = open(os.path.join(out, "adaptive.md")).read().splitlines()
    assert md[2].startswith(("Sanity checks passed.", "SANITY CHECKS FAILED"))


def test_a_lost_batch_is_recomputed_on_resume_with_the_same_verdict(headline, tmp_path):
    import shutil

    out, _, cmd = headline
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    os.remove(os.path.join(copy, "adaptive", "batch_001.json"))
    cmd = [c if not c.startswith("--output_dir=") else f"--output_dir={copy}" for c in cmd] + [
        "--resume"
    ]
    done = warm.run(cmd, env=subprocess_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    a = json.load(open(os.path.join(out, "summary.json")))
    b = json.load(open(os.path.join(copy, "summary.json")))
    for key in ("n", "shell", "base", "mcnemar_p_value", "sanity_checks_passed"):
        assert a[key] == b[key], key


def test_summary_counts_robust_accuracy_over_all_points_and_mcnemar():
    records = [
        dict(
            base_broken_by=["", "clean", "apgd_ce", ""],
            shell_broken_by=["", "", "bpda", "clean"],
            cost=dict(base_passes=40, shell_predictions=8),
            seconds=dict(total=1.0),
        )
    ]
    settings = dict(suite=dict(shell_attacks=["transfer_cw", "bpda"]))
    v = adaptive_report.summarize(records, settings, dict(passed=True, failures=[]))
    assert (v["n"], v["base"]["clean"]["k"], v["base"]["robust"]["k"]) == (4, 3, 2)
    assert (v["shell"]["clean"]["k"], v["shell"]["robust"]["k"]) == (3, 2)
    assert (
        v["shell"]["by_attack"]["transfer_cw"]["k"] == 3
        and v["shell"]["by_attack"]["bpda"]["k"] == 2
    )
    assert (v["mcnemar"]["shell_only"], v["mcnemar"]["base_only"]) == (1, 1)
    robust = v["difference"]["robust_accuracy"]  # shell minus base on the same 4 points
    assert (robust["estimate"], robust["shell_only"], robust["base_only"]) == (0.0, 1, 1)
    assert robust["ci_low"] < 0 < robust["ci_high"] and robust["method"] == "tango"
    assert v["difference"]["clean_accuracy"]["estimate"] == 0.0
    assert v["passes_per_point"] == dict(base_passes=10, shell_predictions=2)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 * 0.5**10)


@keras.saving.register_keras_serializable(package="tests")
class Quantise(keras.layers.Layer):
    """Rounds pixels to multiples of 64 with a zero gradient: a textbook gradient mask."""

    def call(self, x):
        return tf.stop_gradient(tf.round(x / 64.0) * 64.0)


def test_sanity_checks_flag_a_model_that_masks_gradients(tmp_path):
    rng = np.random.default_rng(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Flatten()(Quantise()(inp))
    out = keras.layers.Dense(
        3, kernel_initializer=keras.initializers.RandomNormal(0, 0.05, seed=1)
    )(h)
    base = keras.Model(inp, out)
    shell = MCNShell(base, 4.0, steps=2, jit_compile=False)
    x = rng.uniform(0, 255, size=(12, 8, 8, 3)).astype(np.float32)
    y = base(x).numpy().argmax(1)
    store = RunStore(str(tmp_path / "run"))
    cfg = AdaptiveConfig(
        num_points=12,
        steps=3,
        square_queries=60,
        sanity_points=12,
        sanity_steps=5,
        lift_steps=3,
        base_apgd_steps=3,
        shell_attacks=("bpda", "square"),
    )
    run = adaptive.run_adaptive(
        base,
        shell,
        x,
        y,
        cfg,
        RunContext(
            store=store,
            epsilon=40.0,
            cw_settings=CWSettings(max_iterations=2),
            seed=0,
            batch_points=12,
        ),
    )
    report = adaptive_report.write_adaptive_report(run, x, store)
    sanity = report["verdict"]["sanity"]
    # Zero gradients: BPDA never moves, so it cannot win even at 64 px; only the black box can.
    assert not sanity["passed"]
    assert "epsilon_sweep" in sanity["failures"]
    assert open(store.path("adaptive.md")).read().splitlines()[2].startswith("SANITY CHECKS FAILED")


def test_the_duration_estimate_counts_every_phase_and_grows_with_the_budget():
    from manifold_tf.evaluation import estimate

    class Shell:
        num_classes = 10

    cw = CWSettings(
        max_iterations=100, initial_const=1e-5, largest_const=20.0, stop_within_epsilon=True
    )
    small = estimate.defence_passes(
        table2_points=10,
        num_points=30,
        shell=Shell(),
        per_prediction=100,
        cw=cw,
        suite=AdaptiveConfig(),
    )
    big = estimate.defence_passes(
        table2_points=10,
        num_points=30,
        shell=Shell(),
        per_prediction=100,
        cw=cw,
        suite=AdaptiveConfig(steps=100, restarts=2, targets=0),
    )
    assert set(small) == set(big)
    assert len(small) == 4 + len(AdaptiveConfig().base_attacks) + len(
        AdaptiveConfig().shell_attacks
    )
    assert sum(big.values()) > sum(small.values())
    # CW's schedule: 22 constants from 1e-5 to 20 (doubling), plus one tau round, 100 steps each.
    assert estimate.cw_passes(cw) == 100 * (22 + 1)
    assert "total (upper bound)" in estimate.describe(small, 1000.0)


def test_every_protocol_reads_the_shell_answer_as_predict_does():
    """Table 2, the adaptive suite and BPDA all take the argmax of the shell's output."""
    from helpers import small_conv
    from manifold_tf.evaluation import defence
    from manifold_tf.shells import NCNShell

    base = small_conv(seed=4, shape=(32, 32, 3))
    x = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    for shell in (
        MCNShell(base, delta=8.0, steps=2),
        NCNShell(base, p=0.99, delta_max=8.0, steps=2, rounds=1),
    ):
        expected = np.argmax(shell.predict(x, verbose=0), -1)
        np.testing.assert_array_equal(adaptive.shell_labels(shell, x), expected)
        np.testing.assert_array_equal(defence._shell_labels(shell, x, 5)[0], expected)
        np.testing.assert_array_equal(shell.scores(shell.embed(x)).pick, expected)


def test_the_report_flags_a_suite_whose_last_attack_still_breaks_points_and_square_only_hits():
    flags = adaptive_report.suite_flags(
        ["", "square", "bpda", "clean"],
        ["bpda", "square"],
        ["", "apgd_t", "", ""],
        ["transfer_cw", "apgd_ce", "apgd_t"],
    )
    kinds = {(f["kind"], f["classifier"], f["points"]) for f in flags}
    assert kinds == {
        ("not converged", "shell", 1),
        ("gradient masking", "shell", 1),
        ("not converged", "base", 1),
    }
    assert (
        adaptive_report.suite_flags(
            ["", "bpda"], ["bpda", "square"], ["", ""], ["transfer_cw", "apgd_ce"]
        )
        == []
    )
