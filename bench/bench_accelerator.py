"""The verdict on an accelerator: the default suite on 100 CIFAR-sample points and the strongest
suite (``--preset=full``) on 20, with the settings chosen for the device, in one script.

    python -m bench.bench_accelerator                      # a machine with one GPU: ~8 minutes
    python -m bench.bench_accelerator --data_dir=DIR       # a cifar-10-batches-py folder
    python -m bench.bench_accelerator --smoke              # CPU, synthetic data, seconds

Each suite is ``python evaluate.py --shell=mcn --delta=8`` run in this process
(:func:`manifold_tf.evaluation.runner.evaluate`) into its own folder under ``--output_dir``,
with a wall-time budget for its verdict (``--default_budget``, ``--full_budget``: the verdict stops
within one attack step and keeps whole batches, so the points reported are a prefix of the order;
a machine too slow for the budget reports fewer points, never a cut batch). Per suite it prints
and writes: the points evaluated (n), forward+backward passes per second and per point (the
verdict's ledger: the suites' passes with the shell's search, CW's own beside it), points per
minute, and the verdict (shell minus base, robust and clean, with the paired 95% interval).

Device choices (``device_settings``): on a GPU the shell's search is compiled with XLA
(``jit_compile=True``: its K steps unrolled, buckets of batch sizes), float32 throughout (a
precision change is adopted only where the per-point outcomes on the same points were measured
not to change, BUILD.md); on a CPU neither (XLA measured slower here, BUILD.md).

Writes ``bench/results/bench_accelerator.json`` (``--output``) and the two run folders.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from bench import smoke, timing

SUITES = ("default", "full")
# evaluate.py settings of a smoke run (each suite): every phase of the verdict, 2 steps each.
SMOKE_ADAPTIVE = dict(
    steps=2,
    lift_steps=2,
    square_queries=2,
    sanity_points=2,
    sanity_steps=2,
    base_apgd_steps=2,
    base_targets=1,
    base_square_queries=2,
    targets=1,
    restarts=0,
    eot_samples=1,
)


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="cifar-10-batches-py folder")
    parser.add_argument("--default_points", type=int, default=100)
    parser.add_argument("--full_points", type=int, default=20)
    parser.add_argument("--default_budget", default="3m", help="the default verdict's budget")
    parser.add_argument("--full_budget", default="4m", help="the full verdict's budget")
    parser.add_argument("--output_dir", default=None, help="run folders (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help=smoke.HELP)
    parser.add_argument("--output", default=None, help="JSON output file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.default_points, args.full_points = 2, 2
        args.default_budget = args.full_budget = "none"
    for name in ("default_points", "full_points"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}.")
    args.output = args.output or timing.default_output(
        "bench_accelerator_smoke" if args.smoke else "bench_accelerator"
    )
    return args


def device_settings() -> dict:
    """``{"device": "GPU"|"CPU", "shell_jit_compile": bool, "precision": "float32"}``."""
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    return dict(device="GPU" if gpu else "CPU", shell_jit_compile=gpu, precision="float32")


def _config(suite: str, args, out: str, device: dict, checkpoint: str | None):
    from manifold_tf.evaluation import presets

    points = args.default_points if suite == "default" else args.full_points
    budget = args.default_budget if suite == "default" else args.full_budget
    adaptive = dict(num_points=points, budget=budget)
    inputs = dict(dataset="cifar10", data_dir=args.data_dir)
    if args.smoke:
        adaptive.update(SMOKE_ADAPTIVE)
        inputs = dict(dataset="synthetic", checkpoint=checkpoint)
    return presets.from_preset(
        suite,
        dict(
            mode="defence",
            inputs=inputs,
            run=dict(output_dir=out, overwrite=True),
            threat=dict(epsilon=8.0, delta=8.0),
            defence=dict(
                batch_points=10 if not args.smoke else 2,
                shell=dict(kind="mcn", jit_compile=device["shell_jit_compile"]),
                attack=dict(max_iterations=2) if args.smoke else {},
            ),
            adaptive=adaptive,
        ),
    )


def _row(suite: str, summary: dict, seconds: float) -> dict:
    n = int(summary["n"])
    ledger = summary.get("ledger") or {}
    total = ledger.get("total_passes")
    cw = (ledger.get("cw") or {}).get("passes") or 0
    diff = summary["difference"]
    passes = (total or 0) + cw
    return dict(
        suite=suite,
        n=n,
        seconds=seconds,
        passes_per_s=passes / seconds if seconds > 0 else None,
        passes_per_point=(total / n) if (total is not None and n) else None,
        points_per_minute=60.0 * n / seconds if seconds > 0 else None,
        shell_robust=summary["shell"]["robust_accuracy"],
        base_robust=summary["base"]["robust_accuracy"],
        robust_difference=diff["robust_accuracy"]["estimate"],
        robust_ci_low=diff["robust_accuracy"]["ci_low"],
        robust_ci_high=diff["robust_accuracy"]["ci_high"],
        clean_difference=diff["clean_accuracy"]["estimate"],
        clean_ci_low=diff["clean_accuracy"]["ci_low"],
        clean_ci_high=diff["clean_accuracy"]["ci_high"],
    )


def main(argv=None) -> dict:
    args = _parse(argv)
    from manifold_tf.evaluation import runner

    device = device_settings()
    root = args.output_dir or tempfile.mkdtemp(prefix="bench_accelerator_")
    checkpoint = None
    if args.smoke:
        checkpoint = os.path.join(root, "nearest_centre.keras")
        smoke.nearest_centre_model().save(checkpoint)
    rows = []
    for suite in SUITES:
        out = os.path.join(root, suite)
        config = _config(suite, args, out, device, checkpoint)
        start = time.perf_counter()
        runner.evaluate(config)
        seconds = time.perf_counter() - start
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            rows.append(_row(suite, json.load(f), seconds))
    print(
        f"device: {device['device']} (shell XLA: {device['shell_jit_compile']}, "
        f"{device['precision']})\n"
    )
    extra = dict(
        bench="bench_accelerator",
        smoke=bool(args.smoke),
        device=device,
        settings=dict(
            default_points=args.default_points,
            full_points=args.full_points,
            default_budget=args.default_budget,
            full_budget=args.full_budget,
            run_dir=root,
        ),
        machine=dict(platform=platform.platform(), processor=platform.processor()),
    )
    table = timing.write_results(args.output, rows, extra=extra)
    result = dict(extra, rows=rows, table=table)
    return result


if __name__ == "__main__":
    main()
