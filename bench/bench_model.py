"""Throughput of the Keras Madry ResNet vs the TF1 reference graph: forward, forward + input grad.

Every variant runs in the same process on the same batch: the Keras model in a ``tf.function``
(without and with ``jit_compile=True``) and the independent TF1 graph of ``tests/tf1_reference.py``
in a ``tf.compat.v1.Session`` (without and with XLA). "grad" is the gradient of the summed
cross-entropy with respect to the input images, the step every attack and shell optimiser repeats.
Reported: images per second, the median over timed repeats after warm-up.

    python bench/bench_model.py            # narrow (batch 128) and wide (batch 32)
    python bench/bench_model.py --quick    # narrow only, fewer iterations: a smoke run of seconds

Writes ``bench/results/bench_model.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

BATCH = {"narrow": 128, "wide": 32}


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="narrow only, 1 warm-up, 2x2 runs")
    parser.add_argument("--widths", default=None, help="comma list of narrow,wide (default: both)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--iters", type=int, default=3, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--no_xla", action="store_true", help="skip the XLA variants")
    parser.add_argument(
        "--out",
        default=os.path.join(ROOT, "bench", "results", "bench_model.json"),
        help="JSON path",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.iters, args.repeats = 1, 2, 3
        args.widths = args.widths or "narrow"
    args.widths = (args.widths or "narrow,wide").split(",")
    for width in args.widths:
        if width not in BATCH:
            parser.error(f"--widths takes narrow and/or wide; got {width!r}.")
    return args


def _median_seconds(fn, warmup: int, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean wall time of ``iters`` calls of ``fn`` (seconds)."""
    import numpy as np

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - start) / iters)
    return float(np.median(times))


def _time_keras(width, images, labels, *, jit: bool, warmup, iters, repeats) -> dict:
    import keras
    import tensorflow as tf

    from manifold_tf.models import madry_resnet

    model = madry_resnet(width)
    x = tf.constant(images)
    y = tf.constant(labels)

    @tf.function(jit_compile=jit)
    def forward(x):
        return model(x, training=False)

    @tf.function(jit_compile=jit)
    def grad(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(x, training=False)
            loss = tf.reduce_sum(
                keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            )
        return tape.gradient(loss, x)

    # .numpy() waits for the result, so the wall time covers the whole computation.
    return {
        "forward_s": _median_seconds(lambda: forward(x).numpy(), warmup, iters, repeats),
        "grad_s": _median_seconds(lambda: grad(x, y).numpy(), warmup, iters, repeats),
    }


def main(argv=None) -> dict:
    args = _parse(argv)
    import numpy as np
    import tensorflow as tf
    import tf1_reference

    rng = np.random.default_rng(0)
    xla_options = [False] if args.no_xla else [False, True]
    timing = dict(warmup=args.warmup, iters=args.iters, repeats=args.repeats)
    results = {
        "settings": {
            **timing,
            "batch": {w: BATCH[w] for w in args.widths},
            "tensorflow": tf.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "grad": "d sum(cross-entropy) / d images",
        },
        "rows": [],
    }
    for width in args.widths:
        batch = BATCH[width]
        images = rng.uniform(0, 255, (batch, 32, 32, 3)).astype(np.float32)
        labels = rng.integers(0, 10, batch).astype(np.int64)
        seconds = {}
        for xla in xla_options:
            name = "tf1_xla" if xla else "tf1"
            print(f"[bench] {width}: {name} ...", file=sys.stderr, flush=True)
            seconds[name] = tf1_reference.time_reference(width, images, labels, xla=xla, **timing)
            name = "keras_jit" if xla else "keras"
            print(f"[bench] {width}: {name} ...", file=sys.stderr, flush=True)
            seconds[name] = _time_keras(width, images, labels, jit=xla, **timing)
        for name, s in seconds.items():
            baseline = seconds["tf1_xla" if name.endswith(("_xla", "_jit")) else "tf1"]
            results["rows"].append(
                {
                    "width": width,
                    "batch": batch,
                    "variant": name,
                    "forward_img_per_s": batch / s["forward_s"],
                    "grad_img_per_s": batch / s["grad_s"],
                    "forward_s": s["forward_s"],
                    "grad_s": s["grad_s"],
                    # Throughput ratio against the TF1 graph with the same compilation (>1: faster).
                    "forward_ratio_vs_tf1": baseline["forward_s"] / s["forward_s"],
                    "grad_ratio_vs_tf1": baseline["grad_s"] / s["grad_s"],
                }
            )

    header = (
        f"{'width':7}{'batch':>6}  {'variant':10}{'fwd img/s':>11}{'grad img/s':>12}"
        f"{'fwd x TF1':>11}{'grad x TF1':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results["rows"]:
        print(
            f"{r['width']:7}{r['batch']:>6}  {r['variant']:10}{r['forward_img_per_s']:>11.1f}"
            f"{r['grad_img_per_s']:>12.1f}{r['forward_ratio_vs_tf1']:>11.2f}"
            f"{r['grad_ratio_vs_tf1']:>12.2f}"
        )
    print("(x TF1: Keras throughput / TF1 throughput, each against TF1 with the same XLA setting)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
