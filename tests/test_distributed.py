"""Several workers under MultiWorkerMirroredStrategy (TF_CONFIG), as real processes on localhost.

The defence evaluation run by two workers must write the same reports as one process; a worker
killed mid-run loses no finished batch; training under two workers keeps one set of weights.
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
from helpers import subprocess_env, without_timings
from manifold_tf import distributed
from manifold_tf.evaluation.store import RunStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# On the session's nearest-centre checkpoint (a linear model): the workers' protocol is the subject,
# not the model, and each of the six processes would otherwise trace a ResNet for every attack.
DEFENCE = [
    "--dataset=synthetic",
    "--shell=mcn",
    "--num_points=8",
    "--defence_batch_points=2",
    "--shell_steps=2",
    "--base_attack_max_iterations=3",
    "--adaptive_steps=2",
    "--adaptive_square_queries=3",
    "--adaptive_sanity_points=2",
    "--adaptive_sanity_steps=2",
    "--adaptive_lift_steps=2",
    "--adaptive_base_apgd_steps=3",
    "--adaptive_targets=1",
    # Every planned point (test_two_workers_stop_where_one_process_stops: the stopping rules).
    "--adaptive_budget=none",
]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _tf_config(ports: list[int], index: int) -> str:
    return json.dumps(
        {
            "cluster": {"worker": [f"localhost:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )


def _start_workers(cmd: list[str], count: int = 2, **env) -> list[warm.Process]:
    """``count`` worker processes of one cluster on localhost (forked warm: ``tests/warm.py``)."""
    ports = _free_ports(count)
    return [
        warm.popen(cmd, env=subprocess_env(TF_CONFIG=_tf_config(ports, i), **env))
        for i in range(count)
    ]


def _finish(procs: list[warm.Process], timeout: float = 900) -> list[tuple[int, str, str]]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        outs.append((p.returncode, out, err))
    return outs


def _evaluate(out: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "evaluate.py"), f"--output_dir={out}", *args]


@pytest.fixture(scope="module")
def defence(nearest_centre_checkpoint) -> list[str]:
    """The defence evaluation's flags, on the nearest-centre checkpoint."""
    return [*DEFENCE, f"--checkpoint={nearest_centre_checkpoint}"]


def _reports(folder) -> dict:
    return {
        name: without_timings(json.load(open(os.path.join(folder, name))))
        for name in ("defence.json", "adaptive.json", "summary.json")
    }


# -- TF_CONFIG parsing and the store's worker rules (no processes) ---------------------------------


def test_tf_config_is_parsed_and_bad_ones_are_named():
    assert distributed.parse_tf_config(None) is None
    assert distributed.parse_tf_config(_tf_config([1, 2, 3], 2)) == (2, 3)
    chief = json.dumps(
        {
            "cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
            "task": {"type": "worker", "index": 1},
        }
    )
    assert distributed.parse_tf_config(chief) == (2, 3)
    for text, message in [
        ("{not json", "not JSON"),
        (json.dumps({"task": {"type": "worker", "index": 0}}), '"cluster"'),
        (json.dumps({"cluster": {"worker": ["a:1"]}}), '"task"'),
        (
            json.dumps(
                {
                    "cluster": {"worker": ["a:1"], "ps": ["b:1"]},
                    "task": {"type": "worker", "index": 0},
                }
            ),
            "ps",
        ),
        (_tf_config([1, 2], 2), "not in the cluster"),
        (
            json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}),
            "worker or the chief",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            distributed.parse_tf_config(text)


def test_one_process_owns_every_batch_and_workers_split_them():
    assert all(distributed.SINGLE.owns(b) for b in range(7))
    a, b = distributed.Workers(0, 2), distributed.Workers(1, 2)
    assert [k for k in range(7) if a.owns(k)] == [0, 2, 4, 6]
    assert [k for k in range(7) if b.owns(k)] == [1, 3, 5]
    distributed.SINGLE.barrier()  # a no-op without a cluster


def test_a_worker_with_other_settings_is_refused(tmp_path, monkeypatch):
    # Barriers are no-ops here: the chief's store binds first, then the worker's compares.
    monkeypatch.setattr(distributed.Workers, "barrier", lambda self, name="": None)
    chief = RunStore(str(tmp_path / "run"), workers=distributed.Workers(0, 2))
    chief.bind("defence", {"epsilon": 8.0, "strategy": "a"}, free=("strategy",))
    worker = RunStore(str(tmp_path / "run"), workers=distributed.Workers(1, 2))
    worker.bind("defence", {"epsilon": 8.0, "strategy": "b"}, free=("strategy",))
    with pytest.raises(ValueError, match="epsilon: saved 8.0, now 4.0"):
        worker.bind("defence", {"epsilon": 4.0}, free=("strategy",))
    with pytest.raises(FileNotFoundError, match="shared"):
        RunStore(str(tmp_path / "elsewhere"), workers=distributed.Workers(1, 2))


# -- real worker processes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, defence) -> dict:
    """The reports of the defence evaluation run by one process."""
    out = str(tmp_path_factory.mktemp("one"))
    single = warm.run(_evaluate(out, "--overwrite", *defence), env=subprocess_env(), timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    return _reports(out)


def test_two_workers_write_the_same_defence_reports_as_one_process(tmp_path, one_process, defence):
    shared = str(tmp_path / "two")
    outs = _finish(_start_workers(_evaluate(shared, *defence)))
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    assert "worker 1 of 2" in outs[1][1] and "chief" in outs[1][1]
    assert "Adaptive" in outs[0][1] or "adaptive" in outs[0][1]
    assert _reports(shared) == one_process
    # Both workers did work: batch files carry no worker tag, but each worker's log names its share.
    assert "[worker 0 of 2 (chief)]" in outs[0][2] and "[worker 1 of 2]" in outs[1][2]


def _without(flags: list[str], prefix: str) -> list[str]:
    return [f for f in flags if not f.startswith(prefix)]


@pytest.mark.parametrize(
    "rule",
    [
        ["--adaptive_until=decided", "--adaptive_margin=100"],
        pytest.param(["--adaptive_budget=1h"], marks=pytest.mark.slow),
    ],
    ids=["decided", "budget"],
)
def test_two_workers_stop_where_one_process_stops(tmp_path, defence, rule):
    # The chief asks the rule before each round of batches (one per worker) and every worker
    # stops, as one process would, after the batch that decided it: the records that count, the
    # verdict and Table 2 (on the points the verdict reached) are those of one process.
    flags = [*_without(defence, "--adaptive_budget"), *rule]
    one = str(tmp_path / "one")
    single = warm.run(_evaluate(one, *flags), env=subprocess_env(), timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    shared = str(tmp_path / "two")
    outs = _finish(_start_workers(_evaluate(shared, *flags)))
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    expected, got = _reports(one), _reports(shared)
    assert got == expected
    stopping = expected["adaptive.json"]["verdict"]["stopping"]
    if rule[0].endswith("decided"):
        assert stopping["rule"] == "decided" and stopping["n"] < 8, stopping
    # Both workers evaluated batches of the verdict.
    assert "[worker 1 of 2]" in outs[1][2] and "adaptive" in outs[1][2]


@pytest.mark.slow  # default run: the two-worker equality here; test_kill_resume's SIGKILL
def test_a_lost_worker_loses_no_finished_batch(tmp_path, one_process, defence):
    shared = str(tmp_path / "run")
    procs = _start_workers(_evaluate(shared, *defence, "--heartbeat_seconds=2"))
    first = os.path.join(shared, "defence", "batch_001.json")  # worker 1's first batch
    deadline = time.time() + 600
    while not os.path.exists(first) and time.time() < deadline and procs[1].poll() is None:
        time.sleep(0.05)
    assert os.path.exists(first), "worker 1 never finished a batch"
    os.kill(procs[1].pid, signal.SIGKILL)
    finished_before = {
        n: os.path.getmtime(os.path.join(shared, "defence", n))
        for n in os.listdir(os.path.join(shared, "defence"))
        if n.startswith("batch_")
    }
    rc, _, err = _finish(procs[:1], timeout=600)[0]
    procs[1].wait()
    assert rc == 1 and "a worker was lost" in err, err[-3000:]
    # Resume in one process: only the missing batches run, the finished ones stay as written.
    resumed = warm.run(_evaluate(shared, *defence, "--resume"), env=subprocess_env(), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, mtime in finished_before.items():
        assert os.path.getmtime(os.path.join(shared, "defence", name)) == mtime, name
    assert _reports(shared) == one_process


@pytest.mark.parametrize("model", ["stand_in", pytest.param("resnet", marks=pytest.mark.slow)])
def test_two_workers_train_one_model(tmp_path, model):
    # The all-reduce and the chief's files around a small stand-in of the ResNet by default
    # (helpers.resnet_stand_in: batch normalisation included), the narrow ResNet under slow.
    run = str(tmp_path / "m")
    patch = "models.madry_resnet = resnet_stand_in" if model == "stand_in" else ""
    script = f"""
import sys, hashlib
sys.path.insert(0, {ROOT!r})
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
from helpers import resnet_stand_in
from manifold_tf import distributed, models
{patch}
workers = distributed.from_env()
import numpy as np
from manifold_tf import data, training
arrays = data.synthetic_arrays("train", num_examples=64)
config = training.TrainConfig(width="narrow", dataset="synthetic", adversarial=True, attack="fgsm",
    batch_size=16, steps=4, lr_boundaries=(), lr_values=(0.05,), checkpoint_every=2, log_every=2,
    holdout=8, strategy="multi_worker")
model = training.train(config, {run!r}, train_arrays=arrays, workers=workers)
digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()
print("weights", digest[:16])
"""
    outs = _finish(_start_workers([sys.executable, "-c", script]))
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    digests = [out.split("weights ")[-1].strip() for _, out, _ in outs]
    assert digests[0] == digests[1]  # one model: weights all-reduced, BN statistics averaged
    names = sorted(os.listdir(run))
    assert {"final.keras", "best.keras", "holdout.json", "config.json", "checkpoints"} <= set(
        names
    ), names
    assert sorted(os.listdir(os.path.join(run, "checkpoints")))[0].startswith("checkpoint")
    import hashlib

    import keras
    import numpy as np

    import manifold_tf  # noqa: F401  (registers the custom layers)

    final = keras.saving.load_model(os.path.join(run, "final.keras"))
    assert (
        hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in final.get_weights())).hexdigest()[
            :16
        ]
        == digests[0]
    )


def test_modes_without_workers_refuse_a_cluster():
    from manifold_tf import evaluation
    from manifold_tf.evaluation.config import EvaluationConfig

    with pytest.raises(ValueError, match="runs in one process"):
        evaluation.evaluate(EvaluationConfig(mode="separation"), distributed.Workers(0, 2))
