"""The same command twice gives the same reports, byte for byte once timings are stripped.

Every mode (accuracy, separation, defence with the adaptive verdict) on both defaults: the synthetic
set, and the CIFAR-10 sample when ``../shared/data/cifar10-sample`` exists (skipped otherwise).
Tiny flags keep each run under a minute.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

import warm
from helpers import ROOT, subprocess_env, without_timings

MODES = {
    "accuracy": ["--mode=accuracy", "--num_examples=8", "--pgd_steps=2"],
    "separation": [
        "--mode=separation",
        "--separation_batches=2",
        "--separation_batch_points=2",
        "--separation_steps=2",
        "--separation_convergence_batches=0",
    ],
    "defence": [
        "--shell=mcn",
        "--num_points=4",
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
        # A wall-time budget stops where the machine's speed says: the same work is compared.
        "--adaptive_budget=none",
    ],
}


def canonical(path: str) -> str:
    """A report's JSON text without its timing keys (``helpers.TIMING_KEYS``), order kept."""
    with open(path, encoding="utf-8") as f:
        return json.dumps(without_timings(json.load(f)), indent=2)


def _reports(out: str) -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(out):
        for name in files:
            if name.endswith(".json") and not name.startswith("."):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, out)] = canonical(path)
    return found


def _start(out: str, dataset_args: list[str], mode: str) -> warm.Process:
    """The command as a real process (forked warm: ``tests/warm.py``)."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "evaluate.py"),
        *dataset_args,
        *MODES[mode],
        f"--output_dir={out}",
    ]
    return warm.popen(cmd, env=subprocess_env())


def _finish(proc: warm.Process, out: str) -> dict[str, str]:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return _reports(out)


# By default the pairs run on the session's nearest-centre checkpoint (a linear model): the
# protocols, loaders, seeds and report writers are what is compared, and tracing the ResNet for
# every attack would take minutes. The separation pair on the CIFAR sample keeps the shipped ResNet
# (its pipeline is the cheapest); every pair on the shipped models runs under ``slow``.
CASES = [
    pytest.param(dataset, mode, model, marks=marks, id=f"{dataset}-{mode}-{model}")
    for dataset in ("synthetic", "cifar10")
    for mode in MODES
    for model, marks in (
        ("linear", []),
        (
            "shipped",
            [] if (dataset, mode) == ("cifar10", "separation") else [pytest.mark.slow],
        ),
    )
    if not (model == "linear" and (dataset, mode) == ("cifar10", "separation"))
]


@pytest.mark.parametrize("dataset, mode, model", CASES)
def test_same_command_same_reports(tmp_path, request, mode, dataset, model):
    if dataset == "cifar10":
        args = [f"--data_dir={request.getfixturevalue('cifar_sample_dir')}", "--dataset=cifar10"]
    else:
        args = ["--dataset=synthetic"]
    if model == "linear":
        args.append(f"--checkpoint={request.getfixturevalue('nearest_centre_checkpoint')}")
    # The two runs side by side (one core each): independent processes, nothing shared.
    run_a = _start(str(tmp_path / "a"), args, mode)
    run_b = _start(str(tmp_path / "b"), args, mode)
    a, b = _finish(run_a, str(tmp_path / "a")), _finish(run_b, str(tmp_path / "b"))
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    for name in a:
        assert a[name] == b[name], f"{name} differs between two runs of the same command"
