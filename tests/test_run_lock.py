"""One run per directory: a RunStore locks its directory against other processes, a stale lock is
taken over, workers of one run share it, the lock goes when the process exits.

The "other process" is real: a subprocess that opens a RunStore on the directory and waits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import pytest

import warm
from helpers import ROOT, subprocess_env
from manifold_tf.distributed import Workers
from manifold_tf.evaluation import store as store_lib
from manifold_tf.evaluation.store import LOCK_FILE, RunLocked, RunStore

HOLDER = """
import sys, time
from manifold_tf.evaluation.store import RunStore
store = RunStore(sys.argv[1], resume=True)
store.bind("p", {"a": 1})
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(directory: str, seconds: float = 120.0) -> warm.Process:
    """A process holding a RunStore on ``directory`` (bound, so locked) for ``seconds`` (forked
    warm: ``tests/warm.py``)."""
    proc = warm.popen([sys.executable, "-c", HOLDER, directory, str(seconds)], env=subprocess_env())
    proc.wait_for_output("holding\n", timeout=300)
    return proc


class _NoBarrier(Workers):
    """Worker 1 of 2 without the collective (no strategy here): the chief has already bound."""

    def barrier(self, name: str = "") -> None:
        pass


@pytest.fixture(autouse=True)
def _forget_locks():
    yield
    for key in list(store_lib._HELD):
        store_lib.release_lock(key)


def test_a_second_process_is_refused_naming_the_owner(tmp_path):
    run = str(tmp_path / "run")
    proc = _holder(run)
    try:
        owner = json.load(open(os.path.join(run, LOCK_FILE)))
        assert owner["pid"] == proc.pid and owner["host"] == socket.gethostname()
        for kwargs in (dict(resume=True), dict(overwrite=True), {}):
            with pytest.raises(RunLocked) as info:
                RunStore(run, **kwargs).bind("p", {"a": 1})
            message = str(info.value)
            assert f"pid {proc.pid}" in message and socket.gethostname() in message
            assert owner["started"] in message and "in use by another run" in message
        assert json.load(open(os.path.join(run, LOCK_FILE)))["pid"] == proc.pid  # untouched
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_is_released_when_the_owner_exits(tmp_path):
    run = str(tmp_path / "run")
    proc = _holder(run, seconds=0.0)
    assert proc.wait(timeout=60) == 0
    assert not os.path.exists(os.path.join(run, LOCK_FILE))
    RunStore(run, resume=True).bind("p", {"a": 1})  # free again


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, caplog):
    run = str(tmp_path / "run")
    proc = _holder(run)
    proc.send_signal(signal.SIGKILL)  # no exit handler: the lock stays behind
    proc.wait()
    assert json.load(open(os.path.join(run, LOCK_FILE)))["pid"] == proc.pid
    with caplog.at_level("WARNING"):
        store = RunStore(run, resume=True)
        store.bind("p", {"a": 1})
    assert f"pid {proc.pid}" in caplog.text and "is gone" in caplog.text
    assert json.load(open(os.path.join(run, LOCK_FILE)))["pid"] == os.getpid()
    store.close()
    assert not os.path.exists(os.path.join(run, LOCK_FILE))


def test_a_stale_lock_does_not_make_the_directory_non_empty(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(
        json.dumps(
            dict(pid=2**22 + 12345, host=socket.gethostname(), started="then", command="gone")
        )
    )
    RunStore(str(run))  # neither --resume nor --overwrite: the lock alone is not a run


def test_a_lock_from_another_host_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(
        json.dumps(dict(pid=1, host="elsewhere.example", started="t", command="python evaluate.py"))
    )
    with pytest.raises(RunLocked, match="another host"):
        RunStore(str(run), resume=True).bind("p", {})


def test_a_corrupt_lock_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("{not json")
    with pytest.raises(RunLocked, match=r"\.lock cannot be read"):
        RunStore(str(run), resume=True).bind("p", {})


def test_one_process_may_open_many_stores_and_readers_take_no_lock(tmp_path):
    run = str(tmp_path / "run")
    a = RunStore(run)
    a.bind("p", {"a": 1})
    b = RunStore(run, resume=True)  # the same process: the runner and training do this
    b.save("p", 0, {"x": 1})
    other = str(tmp_path / "other")
    os.makedirs(other)
    reader = RunStore(other, resume=True, lock=False)
    assert reader.load("p", 0) is None
    assert not os.path.exists(os.path.join(other, LOCK_FILE))


def test_workers_of_one_run_share_the_chiefs_lock(tmp_path):
    run = str(tmp_path / "run")
    proc = _holder(run)  # stands for the chief (worker 0)
    try:
        worker = _NoBarrier(index=1, count=2)
        store = RunStore(run, workers=worker)
        store.save("p", 1, {"x": 1})  # a non-chief worker writes its batches under the lock
        assert json.load(open(os.path.join(run, LOCK_FILE)))["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_second_evaluate_on_a_running_directory_is_refused(tmp_path):
    run = str(tmp_path / "run")
    proc = _holder(run)
    try:
        start = time.time()
        done = warm.run(
            [
                sys.executable,
                os.path.join(ROOT, "evaluate.py"),
                "--mode=separation",
                "--dataset=synthetic",
                f"--output_dir={run}",
                "--resume",
            ],
            env=subprocess_env(),
            timeout=300,
        )
        assert done.returncode == 1, done.stderr[-2000:]
        assert f"in use by another run (pid {proc.pid}" in done.stderr
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        assert time.time() - start < 300
    finally:
        proc.kill()
        proc.wait()
