"""Every benchmark still runs: ``bench/bench_*.py --smoke``, in this process, at tiny sizes.

A benchmark nothing runs rots unseen (``bench_attacks`` called a function the attack contract had
removed). The benchmarks are found by a glob, so a new one without ``--smoke`` or without an entry
in ``EXPECTED`` fails here. What each wrote is checked for its shape (row count, keys, positive and
finite timings, the ART part present exactly when ART is installed), never for its numbers: speed
is measured by the benchmarks themselves, and a smoke run measures nothing.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the benchmarks are the package ``bench`` of the repository root
    sys.path.insert(0, ROOT)

from bench import smoke  # noqa: E402

BENCHES = sorted(
    os.path.basename(p)[: -len(".py")] for p in glob.glob(os.path.join(ROOT, "bench", "bench_*.py"))
)
ART = smoke.art_installed()


def _rows_seconds(*keys):
    return lambda out: [row[k] for row in out["rows"] for k in keys if row.get(k) is not None]


def _suite_checks(out):
    """The before side ran this checkout, the after side read its run (``--smoke``): the same
    seeded points, and the comparison must say so."""
    assert [r["returncode"] for r in out["runs"]["before"]] == [0], out["runs"]
    assert [r.get("reused") for r in out["runs"]["after"]] == [True], out["runs"]
    assert out["comparison"]["same_points"] is True
    assert {r["side"] for r in out["attack_rows"]} == {"before", "after"}
    assert (
        out["settings"]["checkouts"]["before"]["path"]
        == out["settings"]["checkouts"]["after"]["path"]
    )


def _attacks_checks(out):
    """CW's knobs are the attack's own (``attacks.CWSettings``) and its passes add up."""
    from manifold_tf import attacks

    for name in ("cw_linf_all", "cw_linf_subset"):
        cw = out[name]
        assert set(cw["settings"]) == {f.name for f in dataclasses.fields(attacks.CWSettings)}
        assert cw["settings"]["max_iterations"] == 2
        assert 0 < cw["useful_passes"] <= cw["batched_passes"]


def _accelerator_checks(out):
    """Both suites ran on the CPU without XLA, and the full suite spent more per point."""
    assert out["device"] == dict(device="CPU", shell_jit_compile=False, precision="float32")
    default, full = out["rows"]
    assert (default["suite"], full["suite"]) == ("default", "full")
    assert default["n"] == full["n"] == 2
    assert full["passes_per_point"] > default["passes_per_point"] > 0


# name -> (rows without ART, more rows with ART, keys of every row, the timings to check[, more
# checks]).
EXPECTED = {
    # the default and the full suite, one row each.
    "bench_accelerator": (
        2,
        0,
        {"suite", "n", "passes_per_s", "passes_per_point", "points_per_minute"},
        _rows_seconds("seconds", "passes_per_s", "points_per_minute"),
        lambda out: _accelerator_checks(out),
    ),
    # limit, ours APGD-CE / APGD-T / APGD-DLR, worst case; ART: its CE and DLR runs.
    "bench_apgd": (
        5,
        2,
        {"attack", "points"},
        lambda out: (
            [out["limit_seconds"], out["limit_seconds_all_points"]]
            + [r["seconds"] for r in out["rows"] if "seconds" in r]
        ),
    ),
    # raw, PGD, PGD XLA, CW on all points, CW on ART's subset; ART: PGD and CW.
    "bench_attacks": (
        5,
        2,
        {"attack", "points", "fwd+bwd/s", "seconds"},
        lambda out: (
            [r["seconds"] for r in out["rows"]]
            + [out[k]["passes_per_second"] for k in ("raw", "pgd", "pgd_xla", "cw_linf_all")]
        ),
        _attacks_checks,
    ),
    # narrow: TF1 and Keras (no XLA under --smoke).
    "bench_model": (
        2,
        0,
        {"variant", "forward_img_per_s", "grad_img_per_s"},
        _rows_seconds("forward_s", "grad_s", "forward_img_per_s", "grad_img_per_s"),
    ),
    # not a speed: the default interval and Newcombe's at n = 20; coverage and width are positive.
    "bench_paired_coverage": (
        2,
        0,
        {"method", "cases", "worst", "mean", "mean_width_points"},
        lambda out: [r[k] for r in out["rows"] for k in ("worst", "mean", "mean_width_points")],
    ),
    # APGD-CE and APGD-T: float32 without and with early exit; bf16 APGD-CE (no XLA under --smoke).
    "bench_base_attacks": (
        5,
        0,
        {"attack", "variant", "early_exit", "passes_per_point", "broken", "n"},
        _rows_seconds("seconds", "passes_per_point", "passes_per_s"),
    ),
    # full shell and the 5x3 copy: BPDA, targeted BPDA, Square and the chained suite each.
    "bench_surrogate": (
        8,
        0,
        {"variant", "attack", "points", "broken", "passes_per_point", "seconds"},
        _rows_seconds("seconds", "passes_per_point"),
    ),
    # batch 2: f32 and bf16 (no XLA under --smoke).
    "bench_precision": (
        2,
        0,
        {"batch", "variant", "grad_img_per_s", "label_agreement", "sign_agreement"},
        _rows_seconds("grad_s", "grad_min_s", "grad_img_per_s"),
    ),
    # shell without / with XLA, shell_xla_while_loop, loop_step, loop_eager.
    "bench_shells": (
        5,
        0,
        {"variant", "images/s"},
        lambda out: (
            list(out["seconds_per_call"].values()) + list(out["images_per_second"].values())
        ),
    ),
    # before and after (this checkout once, the after side reading the before side's run).
    "bench_suite": (
        2,
        0,
        {"side", "n", "points_per_minute", "adaptive_s_per_point"},
        lambda out: (
            [r["wall_s"] for r in out["runs"]["before"]]
            + [r["adaptive_s"] for side in out["runs"].values() for r in side]
            + _rows_seconds("points_per_minute", "adaptive_s_per_point", "wall_s_per_point")(out)
        ),
        _suite_checks,
    ),
    "bench_training": (
        1,
        0,
        {"forward_backward_examples_per_s", "adversarial_training_examples_per_s"},
        _rows_seconds(
            "forward_backward_examples_per_s",
            "limit_examples_per_s",
            "adversarial_training_examples_per_s",
        ),
    ),
}


def test_every_benchmark_has_expectations():
    assert BENCHES, f"no bench/bench_*.py under {ROOT}"
    missing = sorted(set(BENCHES) - set(EXPECTED))
    assert not missing, f"add the smoke expectations of {missing} to EXPECTED"
    assert not set(EXPECTED) - set(BENCHES), "EXPECTED names a benchmark that is gone"


@pytest.mark.parametrize("name", BENCHES)
def test_smoke_run_prints_its_table_and_writes_its_json(name, tmp_path, capsys):
    if name not in EXPECTED:
        pytest.fail(f"{name}: no smoke expectations (see test_every_benchmark_has_expectations)")
    rows, art_rows, keys, timings, *checks = EXPECTED[name]
    output = str(tmp_path / f"{name}.json")
    module = importlib.import_module(f"bench.{name}")
    try:
        module.main(["--smoke", f"--output={output}"])
    except SystemExit as e:  # argparse: e.g. no --smoke flag
        pytest.fail(f"{name} --smoke exited ({e.code}): {capsys.readouterr().err[-2000:]}")
    printed = capsys.readouterr().out
    with open(output) as f:
        out = json.load(f)
    expected_rows = rows + (art_rows if ART else 0)
    assert len(out["rows"]) == expected_rows, out["rows"]
    for row in out["rows"]:
        assert keys <= set(row), (keys - set(row), row)
    values = timings(out)
    assert values and all(
        isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values
    ), values
    # The table printed is the table written, one line per row under its header.
    assert out["table"] in printed and f"wrote {output}" in printed
    assert len(out["table"].strip().splitlines()) == expected_rows + 2
    if art_rows:
        assert any(str(r.get("attack")).startswith("ART ") for r in out["rows"]) == ART
        assert out["art"] == ART
        assert ("skips the ART comparison" in printed) == (not ART)
    for check in checks:
        check(out)


@pytest.mark.skipif(ART, reason="ART is installed")
@pytest.mark.parametrize("name", ["bench_attacks", "bench_apgd"])
def test_a_real_run_without_art_stops_at_once_naming_the_fix(name, tmp_path):
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit, match="requirements-bench.txt"):
        module.main([f"--output={tmp_path / 'out.json'}"])
    assert not os.path.exists(tmp_path / "out.json")


def test_suite_needs_a_before_checkout_unless_smoke(capsys):
    module = importlib.import_module("bench.bench_suite")
    with pytest.raises(SystemExit):
        module.main([])
    assert "--checkout_before is required" in capsys.readouterr().err
