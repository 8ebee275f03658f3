"""Tests of the defence evaluation (Table 2) and the adaptive attack run after it: protocol, CLI,
resume."""

from __future__ import annotations

import json
import os
import random
import sys
import time

import keras
import numpy as np
import pytest

import warm
from helpers import subprocess_env, without_timings
from manifold_tf.evaluation import defence, walk
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.store import RunStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_categories_and_rates_follow_the_paper():
    y = np.array([1, 1, 1, 1, 1, 1])
    base_success = np.array([False, True, True, True, False, False])
    g_x = np.array([1, 1, 2, 2, 1, 3])
    g_adv = np.array([1, 1, 2, 3, 4, 1])
    cats = defence.categorize(base_success, g_x, g_adv, y)
    assert cats.tolist() == [
        "robust_kept",
        "vulnerable_fixed",
        "wrong_but_robust",
        "wrong_not_robust",
        "wrong_not_robust",
        "wrong_not_robust",
    ]
    r = defence.batch_rates(
        dict(labels=y, base_success=base_success, shell_clean=g_x, shell_adv=g_adv, category=cats)
    )
    assert r["base_successes"] == 3
    # The attack "succeeds" on the shell where it changes the answer into a wrong one: points
    # 3 (2 -> 3) and 4 (1 -> 4); point 5 (3 -> 1) was wrong before and is right after.
    assert r["shell_successes"] == 2
    assert r["retained"] == 4 - 1  # G(x) == y at points 0, 1, 4
    assert r["categories"] == dict(
        robust_kept=1, vulnerable_fixed=1, wrong_but_robust=1, wrong_not_robust=3
    )
    assert r["new_vulnerabilities"] == 2  # base-robust points 4 and 5, inconsistent under G


def test_paper_permutation_is_the_authors_order():
    random.seed(123)
    expected = random.sample(range(50), 50)[::-1]
    assert walk.walk_order(50, seed=123, kind="paper").tolist() == expected
    with pytest.raises(ValueError, match="permutation.*'shuffled'"):
        walk.walk_order(5, seed=0, kind="shuffled")


class LabelInPixel(keras.Model):
    """Predicts the label stored in pixel (0, 0, 0) as a one-hot logit vector."""

    def call(self, x, training=False):
        return keras.ops.one_hot(keras.ops.cast(x[:, 0, 0, 0], "int32"), 3) * 10.0


def test_selection_walks_the_permutation_and_keeps_correct_points():
    x = np.zeros((20, 32, 32, 3), np.float32)
    y = np.arange(20) % 3
    pred = y.copy()
    pred[::2] = (y[::2] + 1) % 3  # even indices are misclassified
    x[:, 0, 0, 0] = pred
    chosen = walk.select_correct_points(LabelInPixel(), x, y, num_points=5, seed=4, chunk=3)
    order = walk.walk_order(20, seed=4)
    assert chosen.tolist() == [int(i) for i in order if i % 2][:5]
    with pytest.raises(ValueError, match="only 10 of the 20"):
        walk.select_correct_points(LabelInPixel(), x, y, num_points=11, seed=4)


# ------------------------------------------------------------------------------------------------
# The command line, on a small synthetic run with a tiny nearest-centre base model


@pytest.fixture(scope="module")
def tiny_checkpoint(nearest_centre_checkpoint) -> str:
    """The session's nearest-centre checkpoint (``conftest.py``)."""
    return nearest_centre_checkpoint


def _cli(checkpoint: str, output_dir: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        os.path.join(ROOT, "evaluate.py"),
        "--shell=mcn",
        "--delta=8",
        f"--checkpoint={checkpoint}",
        "--dataset=synthetic",
        f"--output_dir={output_dir}",
        "--defence_batches=4",
        "--defence_batch_points=4",
        "--epsilon=36",
        "--base_attack_max_iterations=10",
        "--shell_steps=20",
        "--noshell_jit_compile",
        "--adaptive=none",
        "--defence_points=paper",
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("runs") / "uninterrupted")
    done = warm.run(
        _cli(tiny_checkpoint, out),
        env=subprocess_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_cli_writes_the_report_and_refuses_to_clobber(uninterrupted, tiny_checkpoint):
    report = json.load(open(os.path.join(uninterrupted, "defence.json")))
    assert report["average"]["points"] == 16
    assert len(report["per_batch"]) == 4
    assert sum(report["average"]["categories"].values()) == 16
    assert report["settings"]["shell"]["steps"] == 20
    assert report["settings"]["attack"]["max_iterations"] == 10
    for name in (
        "defence.md",
        "failures.png",
        "defence/batch_003.json",
        "defence/batch_003_xadv.npy",
        "defence/settings.json",
    ):
        assert os.path.exists(os.path.join(uninterrupted, name)), name
    text = open(os.path.join(uninterrupted, "defence.md")).read()
    assert text.startswith("# Defence evaluation") and "Transfer only, not the verdict" in text
    assert "Average" in text and "shell retained accuracy" in text and "37.33%" in text
    again = warm.run(
        _cli(tiny_checkpoint, uninterrupted),
        env=subprocess_env(),
        timeout=600,
    )
    assert again.returncode != 0
    assert "--resume" in again.stderr and "--overwrite" in again.stderr


def test_resume_after_kill_gives_the_uninterrupted_report(uninterrupted, tiny_checkpoint, tmp_path):
    out = str(tmp_path / "killed")
    proc = warm.popen(_cli(tiny_checkpoint, out), env=subprocess_env())
    first = os.path.join(out, "defence", "batch_000.json")
    deadline = time.time() + 600
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert os.path.exists(first), "the run died before finishing its first batch"
    assert not os.path.exists(os.path.join(out, "defence.json")), "killed too late to test resume"
    # A resume with other settings is refused.
    other = warm.run(
        _cli(tiny_checkpoint, out, "--resume", "--shell_steps=3"),
        env=subprocess_env(),
        timeout=600,
    )
    assert other.returncode != 0 and "differ from the run" in other.stderr
    assert "shell: saved" in other.stderr  # names the setting that differs
    done = warm.run(
        _cli(tiny_checkpoint, out, "--resume"),
        env=subprocess_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout + done.stderr
    a = json.load(open(os.path.join(uninterrupted, "defence.json")))
    b = json.load(open(os.path.join(out, "defence.json")))
    assert without_timings(a) == without_timings(b)


_MIRRORED = """
import runpy, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_mirrored_strategy_on_two_logical_cpus_gives_the_same_results(
    uninterrupted, tiny_checkpoint, tmp_path
):
    out = str(tmp_path / "mirrored")
    cmd = _cli(tiny_checkpoint, out, "--defence_strategy=mirrored")
    done = warm.run(
        [sys.executable, "-c", _MIRRORED, *cmd[1:]],
        env=subprocess_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a = json.load(open(os.path.join(uninterrupted, "defence.json")))
    b = json.load(open(os.path.join(out, "defence.json")))
    assert b["settings"]["strategy"] == "mirrored (2 replicas)"
    assert a["points"] == b["points"]
    assert without_timings(a["per_batch"]) == without_timings(b["per_batch"])


@pytest.mark.slow
def test_default_command_runs_on_a_fresh_checkout(tmp_path):
    # No --checkpoint/--data_dir: the embedded default (CIFAR-10 sample + narrow_adv.keras, or
    # synthetic data with a committed or quickly trained model), shrunk to one tiny batch.
    out = str(tmp_path / "default")
    done = warm.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            "--shell=mcn",
            f"--output_dir={out}",
            "--num_points=4",
            "--base_attack_max_iterations=5",
            "--shell_steps=1",
            "--adaptive_steps=2",
            "--adaptive_square_queries=2",
            "--adaptive_sanity_points=2",
            "--adaptive_sanity_steps=2",
        ],
        env=subprocess_env(),
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.exists(os.path.join(out, "defence.json"))
    assert os.path.exists(os.path.join(out, "summary.json"))


def test_a_second_shell_reuses_the_first_runs_adversarial_examples(
    uninterrupted, tiny_checkpoint, tmp_path
):
    out = str(tmp_path / "ncn")
    cmd = _cli(tiny_checkpoint, out, f"--base_attack_from_run={uninterrupted}")
    cmd[cmd.index("--shell=mcn")] = "--shell=ncn"
    done = warm.run(cmd, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reusing x'" in done.stdout + done.stderr
    a = json.load(open(os.path.join(uninterrupted, "defence.json")))
    b = json.load(open(os.path.join(out, "defence.json")))
    assert b["settings"]["shell"]["shell"] == "ncn"
    # NCN says where no label met p (the fallback answered); MCN has no such diagnostic.
    assert "ncn_unmet" not in a
    assert b["ncn_unmet"]["points"] == 16
    assert 0 <= b["ncn_unmet"]["clean"] <= 16 and 0 <= b["ncn_unmet"]["adversarial"] <= 16
    assert "NCN fallback" in open(os.path.join(out, "defence.md")).read()
    for pa, pb in zip(a["points"], b["points"], strict=True):
        assert (pa["index"], pa["base_success"], pa["linf"]) == (
            pb["index"],
            pb["base_success"],
            pb["linf"],
        )
    # Another attack budget cannot reuse them.
    saved = json.load(open(os.path.join(uninterrupted, "defence", "batch_000.json")))
    settings = dict(
        json.load(open(os.path.join(uninterrupted, "defence", "settings.json"))), epsilon=4.0
    )
    with pytest.raises(ValueError, match="cannot reuse"):
        defence._reusable_attack(uninterrupted, 0, settings, np.asarray(saved["indices"]))


def test_where_cw_fails_the_shell_is_probed_inside_the_ball(tiny_checkpoint, tmp_path):
    from manifold_tf.attacks import CWSettings
    from manifold_tf.data import synthetic_arrays
    from manifold_tf.shells import MCNShell

    base = keras.saving.load_model(tiny_checkpoint)
    x, y = synthetic_arrays("test", num_examples=6)
    shell = MCNShell(base, 8.0, steps=2, jit_compile=False)
    context = RunContext(
        store=RunStore(str(tmp_path / "run")),
        epsilon=1.0,
        cw_settings=CWSettings(max_iterations=5),
    )
    record, x_adv = defence.defence_batch(base, shell, x, y, context=context, shell_batch_size=6)
    probes = np.asarray(record["probe"])
    # At 1 px CW cannot break the nearest-centre model: every point gets a probe x' != x.
    assert probes.all() and not any(record["base_success"])
    linf = np.abs(x_adv - x).reshape(6, -1).max(1)
    assert (linf > 0).all() and (linf <= 1.0 + 1e-3).all()
    assert len(record["shell_adv"]) == 6  # the shell ran on every probe


def test_defence_only_flags_without_a_shell_are_refused(tmp_path):
    done = warm.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            "--mode=accuracy",
            "--adaptive=suite",
            f"--output_dir={tmp_path / 'out'}",
        ],
        env=subprocess_env(),
        timeout=300,
    )
    assert done.returncode != 0
    assert "belong to the defence evaluation" in done.stderr
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written
