"""kill -9 at a random moment of each long job, then --resume: the report of an uninterrupted run.

Each job runs as a subprocess of the real command line; it is killed once its first unit of work is
on disk (a checkpoint or a batch record) and before it has finished, at a random extra delay.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np
import pytest

import warm
from helpers import stand_in_train_command, subprocess_env, without_timings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kill_after(cmd: list[str], marker: str, done: str, seed: int) -> None:
    """Starts ``cmd``, waits for ``marker`` to exist, sleeps a random moment, then SIGKILLs it.

    Commands run as real processes forked warm (``tests/warm.py``)."""
    proc = warm.popen(cmd, env=subprocess_env())
    deadline = time.time() + 600
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    proc.kill()
    proc.wait()
    assert os.path.exists(marker), "the job died before writing its first unit of work"
    if os.path.exists(done):
        pytest.skip("the job finished before the kill (machine too fast for this timing)")


def _run(cmd: list[str]) -> None:
    done = warm.run(cmd, env=subprocess_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


_STARTED: list[warm.Process] = []


@pytest.fixture(autouse=True)
def _no_leftover_process():
    yield
    while _STARTED:  # a skipped or failed test leaves its uninterrupted run behind
        _STARTED.pop().kill()


def _start(cmd: list[str]) -> warm.Process:
    """The uninterrupted run, alongside the one to be killed (two cores: one each)."""
    _STARTED.append(warm.popen(cmd, env=subprocess_env()))
    return _STARTED[-1]


def _finish(proc: warm.Process) -> None:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]


def _evaluate(out: str, *args: str) -> list[str]:
    return [
        sys.executable,
        os.path.join(ROOT, "evaluate.py"),
        "--dataset=synthetic",
        f"--output_dir={out}",
        *args,
    ]


@pytest.mark.slow  # default run: test_separation's in-process resume, and the adaptive kill below
def test_separation_killed_then_resumed_gives_the_same_report(tmp_path):
    args = [
        "--mode=separation",
        "--separation_batches=3",
        "--separation_batch_points=4",
        "--separation_steps=3",
        "--separation_convergence_batches=1",
        "--separation_convergence_steps=4",
    ]
    full = _start(_evaluate(str(tmp_path / "full"), *args))
    killed = str(tmp_path / "killed")
    _kill_after(
        _evaluate(killed, *args),
        os.path.join(killed, "separation_synthetic_narrow", "batch_000.json"),
        os.path.join(killed, "separation.json"),
        seed=1,
    )
    _run(_evaluate(killed, *args, "--resume"))
    _finish(full)
    a = json.load(open(tmp_path / "full" / "separation.json"))
    b = json.load(open(os.path.join(killed, "separation.json")))
    assert without_timings(a) == without_timings(b)


def test_adaptive_run_killed_then_resumed_gives_the_same_verdict(
    tmp_path, nearest_centre_checkpoint
):
    # A linear base (the session's nearest-centre checkpoint): the kill and the resume are the
    # subject; three batches leave the kill time to land before the report.
    args = [
        "--shell=mcn",
        f"--checkpoint={nearest_centre_checkpoint}",
        "--num_points=12",
        "--defence_batch_points=4",
        "--shell_steps=2",
        "--base_attack_max_iterations=3",
        "--adaptive_steps=2",
        "--adaptive_square_queries=3",
        "--adaptive_sanity_points=2",
        "--adaptive_sanity_steps=2",
        "--adaptive_lift_steps=2",
        "--adaptive_base_apgd_steps=3",
        "--adaptive_targets=1",
        "--adaptive_budget=none",  # both runs do the same work, however loaded the machine
    ]
    full = _start(_evaluate(str(tmp_path / "full"), *args))
    killed = str(tmp_path / "killed")
    _kill_after(
        _evaluate(killed, *args),
        os.path.join(killed, "adaptive", "batch_000.json"),
        os.path.join(killed, "summary.json"),
        seed=2,
    )
    _run(_evaluate(killed, *args, "--resume"))
    _finish(full)
    a = json.load(open(tmp_path / "full" / "summary.json"))
    b = json.load(open(os.path.join(killed, "summary.json")))
    for key in (
        "n",
        "shell",
        "base",
        "mcnemar_p_value",
        "sanity_checks_passed",
        "passes_per_point",
    ):
        assert a[key] == b[key], key


@pytest.mark.parametrize("model", ["stand_in", pytest.param("resnet", marks=pytest.mark.slow)])
def test_training_killed_then_resumed_gives_the_same_weights(tmp_path, model):
    # The training loop's checkpoints are what is killed: by default around a small stand-in of
    # the ResNet (helpers.resnet_stand_in), the narrow ResNet itself under slow.
    args = [
        "--dataset=synthetic",
        "--steps=6",
        "--checkpoint_every=2",
        "--batch_size=8",
        "--adversarial",
        "--attack=fgsm",
        "--seed=3",
        "--lr_boundaries=4",
        "--lr_values=0.05,0.01",
    ]
    train = (
        stand_in_train_command([])
        if model == "stand_in"
        else [sys.executable, os.path.join(ROOT, "train.py")]
    )
    full = _start(train + [f"--model_dir={tmp_path / 'full'}", *args])
    killed = str(tmp_path / "killed")
    ckpt = os.path.join(killed, "checkpoints", "checkpoint")
    _kill_after(
        train + [f"--model_dir={killed}", *args], ckpt, os.path.join(killed, "final.keras"), seed=3
    )
    _run(train + [f"--model_dir={killed}", *args, "--resume"])
    _finish(full)
    import keras

    import manifold_tf  # noqa: F401  (registers the custom layers)

    a = keras.saving.load_model(str(tmp_path / "full" / "final.keras"))
    b = keras.saving.load_model(os.path.join(killed, "final.keras"))
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
