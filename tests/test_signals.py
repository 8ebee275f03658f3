"""Clean stops and failing writes.

- SIGTERM / SIGINT to a real ``evaluate.py`` / ``train.py`` stop it at the next safe point: exit
  143 / 130, a message with the exact ``--resume`` command, every finished batch or checkpoint kept,
  and that command completes the run.
- A write that fails (disk full, read-only directory) leaves no partial file, keeps the previous
  one and names the path.
- Usage errors print the problem and a pointer to --help, not the whole help; training checkpoints
  at its last step when ``steps`` is not a multiple of ``checkpoint_every``.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import sys
import time

import numpy as np
import pytest

import warm
from helpers import ROOT, subprocess_env
from manifold_tf import interrupts, reporting
from manifold_tf.evaluation.store import RunStore

SEPARATION = [
    "--mode=separation",
    "--dataset=synthetic",
    "--separation_batches=4",
    "--separation_batch_points=2",
    "--separation_steps=10",
    "--separation_convergence_batches=0",
]


def _start(cmd: list[str]) -> warm.Process:
    """``cmd`` as a real process (forked warm: ``tests/warm.py``), both streams captured."""
    return warm.popen(cmd, env=subprocess_env())


def _signal_after(proc: warm.Process, marker: str, signum: int) -> tuple[int, str]:
    """Waits for ``marker`` to exist, sends ``signum``; returns (exit code, stderr)."""
    deadline = time.time() + 600
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _resume_command(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    at = next(i for i, line in enumerate(lines) if "To continue from there, run:" in line)
    words = shlex.split(lines[at + 1])
    assert words[0] == "python" and words[-1] == "--resume", words
    return [sys.executable, *words[1:]]


def test_sigterm_stops_evaluate_after_a_batch_and_resume_completes(tmp_path):
    out = tmp_path / "run"
    folder = out / "separation_synthetic_narrow"
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), *SEPARATION, f"--output_dir={out}"]
    code, err = _signal_after(_start(cmd), str(folder / "batch_000.json"), signal.SIGTERM)
    if code == 0:
        pytest.skip("the run finished before the signal (machine too fast for this timing)")
    assert code == 143, err[-3000:]
    assert "stopped by SIGTERM after saving" in err and "Traceback" not in err, err[-3000:]
    done = sorted(p.name for p in folder.glob("batch_*.json"))
    assert 1 <= len(done) < 4 and not (out / "separation.json").exists()
    assert not list(out.rglob(".tmp-*"))  # no partial file
    assert not (out / ".lock").exists()  # released on the way out
    resumed = warm.run(
        _resume_command(err),
        env=subprocess_env(),
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(list(folder.glob("batch_*.json"))) == 4 and (out / "separation.json").exists()


@pytest.mark.slow  # default run: SIGTERM on evaluate.py here, test_kill_resume's killed training
def test_sigint_stops_training_after_a_checkpoint_and_the_last_step_is_checkpointed(tmp_path):
    # steps=5 is not a multiple of checkpoint_every=2: checkpoints at 2, 4 and the last step, 5.
    out = tmp_path / "model"
    args = [
        "--dataset=synthetic",
        "--steps=5",
        "--checkpoint_every=2",
        "--batch_size=8",
        "--seed=3",
        "--lr_boundaries=",
        "--lr_values=0.05",
    ]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--model_dir={out}", *args]
    code, err = _signal_after(_start(cmd), str(out / "checkpoints" / "checkpoint"), signal.SIGINT)
    if code == 0:
        pytest.skip("the run finished before the signal (machine too fast for this timing)")
    assert code == 130, err[-3000:]
    assert "stopped by SIGINT after checkpoint" in err, err[-3000:]
    assert not (out / "final.keras").exists()
    resumed = warm.run(
        _resume_command(err),
        env=subprocess_env(),
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "final.keras").exists()
    assert (out / "checkpoints" / "ckpt-5.index").exists()
    state = (out / "checkpoints" / "checkpoint").read_text()
    assert 'model_checkpoint_path: "ckpt-5"' in state


def test_safe_points_raise_stopped_after_the_write(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.bind("p", {"a": 1})
    interrupts.request(signal.SIGTERM)
    try:
        with pytest.raises(interrupts.Stopped) as info:
            store.save("p", 0, {"x": 1}, arrays={"v": np.arange(3)})
        assert info.value.exit_code == 143
        assert store.load("p", 0) == {"x": 1}  # saved before stopping
        with pytest.raises(interrupts.Stopped):
            store.bind("q", {})
    finally:
        interrupts.uninstall()
        store.close()


def test_resume_command_drops_overwrite_and_adds_resume():
    argv = ["/x/evaluate.py", "--shell=mcn", "--overwrite", "--output_dir=a b", "--resume"]
    assert interrupts.resume_command(argv) == (
        "python /x/evaluate.py --shell=mcn '--output_dir=a b' --resume"
    )
    assert interrupts.resume_command(["manifold-tf-train", "--model_dir=m"]) == (
        "manifold-tf-train --model_dir=m --resume"
    )


# --------------------------------------------------------------------------------------------------
# Failing writes


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["os.replace", "fsync"])
def test_disk_full_keeps_the_previous_file_and_names_the_path(tmp_path, monkeypatch, where):
    path = str(tmp_path / "report.json")
    reporting.write_json(path, {"version": 1})
    monkeypatch.setattr(os, where.split(".")[-1], _enospc)
    with pytest.raises(reporting.WriteError) as info:
        reporting.write_json(path, {"version": 2})
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert path in str(info.value) and "No space left on device" in str(info.value)
    assert "previous version is kept" in str(info.value)
    assert json.load(open(path)) == {"version": 1}
    assert sorted(os.listdir(tmp_path)) == ["report.json"]  # no temporary file left


def test_disk_full_during_a_batch_keeps_the_finished_ones(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path / "run"))
    store.bind("p", {})
    store.save("p", 0, {"x": 0})
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(OSError, match="batch_001_v.npy"):
        store.save("p", 1, {"x": 1}, arrays={"v": np.zeros(3)})
    monkeypatch.undo()
    assert store.finished("p") == [0]
    assert not list((tmp_path / "run").rglob(".tmp-*"))
    store.close()


def test_read_only_directory_is_named(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = str(folder / "a.json")
    reporting.write_json(path, [1])
    if os.geteuid() == 0:
        # root ignores permission bits: inject the error a read-only file system gives.
        def erofs(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr("tempfile.mkstemp", erofs)
    else:
        folder.chmod(0o555)
    try:
        with pytest.raises(reporting.WriteError) as info:
            reporting.write_json(path, [2])
    finally:
        folder.chmod(0o755)
    assert path in str(info.value) and info.value.errno in (errno.EROFS, errno.EACCES)
    assert json.load(open(path)) == [1] and sorted(os.listdir(folder)) == ["a.json"]


def test_unwritable_output_directory_exits_non_zero_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = warm.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            *SEPARATION,
            f"--output_dir={blocker / 'run'}",
        ],
        env=subprocess_env(),
        timeout=300,
    )
    assert done.returncode == 1 and str(blocker / "run") in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------------
# Usage errors a newcomer can read


@pytest.mark.parametrize(
    "script, args, message",
    [
        (
            "evaluate.py",
            ["--num_examples=-3", "--dataset=synthetic"],
            "num_examples must be an integer >= 1; got -3.",
        ),
        ("train.py", ["--model_dir=/nonexistent/m", "--steps=0"], "steps must be an integer >= 1"),
        ("train.py", [], "--model_dir is required"),
    ],
)
def test_usage_errors_print_the_problem_not_the_help(script, args, message):
    done = warm.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        env=subprocess_env(),
        timeout=300,
    )
    assert done.returncode == 2
    lines = [
        line
        for line in done.stderr.splitlines()
        if line.startswith(("evaluate:", "train:", "Run "))
    ]
    assert message in lines[0], done.stderr[-2000:]
    assert lines[1] == f"Run 'python {script} --help' to list the flags."
    assert "--width" not in done.stderr and len(done.stderr.splitlines()) < 20
