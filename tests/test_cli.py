"""Fuzz cases over the command line: bad input exits non-zero with a message naming the problem,
and nothing is written where the user pointed the run."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

import warm
from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    """``python evaluate.py *args`` (forked warm: ``tests/warm.py``)."""
    return warm.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), *args],
        env=subprocess_env(),
        timeout=300,
    )


@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data") / "cifar-10-batches-py"
    folder.mkdir()
    blob = pickle.dumps({b"data": [[0] * 3072], b"labels": [0]})
    (folder / "test_batch").write_bytes(blob[:20])
    return str(folder.parent)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode=accuracy", "--epsilon=-1"], "epsilon must be a finite number >= 0"),
        (["--mode=accuracy", "--epsilon=300"], "exceeds the pixel range"),
        (["--mode=accuracy", "--pgd_steps=-2"], "pgd_steps must be an integer >= 0"),
        (["--shell=mcn", "--num_points=0"], "num_points must be an integer >= 1"),
        (["--shell=mcn", "--p=1.5"], "p must lie in \\(0, 1\\)"),
        (["--shell=sgd"], "--shell"),
        (["--mode=accuracy", "--checkpoint=/nonexistent/model.keras"], "no model at"),
        (["--mode=accuracy", "--shell_steps=3"], "belong to the defence evaluation"),
        (["--mode=separation", "--separation_batches=0"], "batches must be an integer >= 1"),
    ],
)
def test_bad_flags_exit_non_zero_naming_the_problem(tmp_path, args, message):
    import re

    out = tmp_path / "out"
    done = _evaluate(*args, f"--output_dir={out}", "--dataset=synthetic")
    assert done.returncode != 0
    assert re.search(message, done.stderr), done.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "script, tf_config, message",
    [
        ("evaluate.py", "{not json", "TF_CONFIG is not JSON"),
        (
            "evaluate.py",
            '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}',
            "not in the cluster",
        ),
        (
            "train.py",
            (
                '{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, '
                '"task": {"type": "worker", "index": 0}}'
            ),
            "only 'worker'",
        ),
    ],
)
def test_bad_tf_config_exits_non_zero_naming_the_problem(tmp_path, script, tf_config, message):
    out = tmp_path / "out"
    args = (
        [f"--model_dir={out}", "--dataset=synthetic"]
        if script == "train.py"
        else ["--shell=mcn", "--dataset=synthetic", f"--output_dir={out}"]
    )
    done = warm.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        env=subprocess_env(TF_CONFIG=tf_config),
        timeout=300,
    )
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert not out.exists()


def test_corrupt_data_file_is_named(tmp_path, corrupt_data):
    done = _evaluate(
        "--mode=accuracy",
        f"--data_dir={corrupt_data}",
        "--dataset=cifar10",
        f"--output_dir={tmp_path / 'out'}",
    )
    assert done.returncode != 0
    assert "test_batch: corrupt or truncated CIFAR-10 batch file" in done.stderr


def test_corrupt_batch_in_a_resumed_run_is_named(tmp_path):
    out = tmp_path / "out"
    args = [
        "--mode=separation",
        "--dataset=synthetic",
        "--separation_batches=2",
        "--separation_batch_points=2",
        "--separation_steps=1",
        "--separation_convergence_batches=0",
        f"--output_dir={out}",
    ]
    assert _evaluate(*args).returncode == 0
    (out / "separation_synthetic_narrow" / "batch_001.json").write_text('{"batch": 1, "conf')
    done = _evaluate(*args, "--resume")
    assert done.returncode != 0 and "batch_001.json is corrupt" in done.stderr


def test_help_lists_every_preset_and_what_it_changes():
    from manifold_tf.evaluation.presets import PRESETS

    done = _evaluate("--help")
    text = " ".join(done.stdout.split())  # absl wraps the help text
    for name, (description, _) in PRESETS.items():
        assert f"{name}: {' '.join(description.split())}" in text, text[-3000:]
    assert "--num_points=150" in text and "--shell=cw" in text
    for flag in ("--epsilon", "--delta", "--p:", "--adaptive_until", "--adaptive_budget"):
        assert flag in text
