"""Throughput of the Keras Madry ResNet vs the TF1 reference graph: forward, forward + input grad.

Every variant runs in the same process on the same batch: the Keras model in a ``tf.function``
(without and with ``jit_compile=True``) and the independent TF1 graph of ``tests/tf1_reference.py``
in a ``tf.compat.v1.Session`` (without and with XLA). "grad" is the gradient of the summed
cross-entropy with respect to the input images, the step every attack and shell optimiser repeats.
Reported: images per second, the median over timed repeats after warm-up; the variants take turns
within each repeat. The TF1 graph standardises images one by one with ``map_fn`` as Madry's
``model.py`` does; the Keras model standardises the batch at once.

    python -m bench.bench_model            # narrow (batch 128) and wide (batch 32)
    python -m bench.bench_model --quick    # narrow only, one call per repeat (~1 min idle)
    python -m bench.bench_model --smoke --output=/tmp/bench_model.json   # narrow, batch 2, no XLA

Run from the repository root (the TF1 graph is imported from ``tests/``). Writes
``bench/results/bench_model.json`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable

import numpy as np

from bench import smoke, timing

BATCH = {"narrow": 128, "wide": 32}


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="narrow only, 1 call per repeat")
    parser.add_argument("--widths", default=None, help="comma list of narrow,wide (default: both)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant")
    parser.add_argument("--iters", type=int, default=2, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--no_xla", action="store_true", help="skip the XLA variants")
    parser.add_argument("--batch", type=int, default=None, help="batch of every width")
    parser.add_argument("--smoke", action="store_true", help=smoke.HELP)
    parser.add_argument(
        "--output", default=timing.default_output("bench_model"), help="JSON output file"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.iters, args.repeats = 1, 1, 3
        args.widths = args.widths or "narrow"
    if args.smoke:  # the models are what is measured: narrow, batch 2, one call
        args.warmup, args.iters, args.repeats, args.widths, args.batch = 1, 1, 1, "narrow", 2
        # XLA compilation of the two ResNets would be most of a smoke run: the same runners with
        # xla=True.
        args.no_xla = True
    args.widths = (args.widths or "narrow,wide").split(",")
    for width in args.widths:
        if width not in BATCH:
            parser.error(f"--widths takes narrow and/or wide; got {width!r}.")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1; got {args.batch}.")
    return args


def _keras_runner(width, images, labels, *, jit: bool) -> tuple[Callable, Callable]:
    """``(forward, grad)`` thunks of the Keras model in ``tf.function`` on one fixed batch."""
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
            xent = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            loss = tf.reduce_sum(xent)
        return tape.gradient(loss, x)

    # .numpy() waits for the result, so the wall time covers the whole computation.
    return (lambda: forward(x).numpy()), (lambda: grad(x, y).numpy())


def main(argv=None) -> dict:
    args = _parse(argv)
    import tensorflow as tf

    from tests import tf1_reference

    rng = np.random.default_rng(0)
    xla_options = [False] if args.no_xla else [False, True]
    settings = dict(warmup=args.warmup, iters=args.iters, repeats=args.repeats)
    results = {
        "settings": {
            **settings,
            "batch": {w: args.batch or BATCH[w] for w in args.widths},
            "smoke": args.smoke,
            "tensorflow": tf.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_at_start": _load(),
            "grad": "d sum(cross-entropy) / d images",
            "tf1_standardization": "map_fn(per_image_standardization), as Madry's model.py",
            "keras_standardization": "batched tf.image.per_image_standardization",
        },
        "rows": [],
    }
    for width in args.widths:
        batch = args.batch or BATCH[width]
        images = rng.uniform(0, 255, (batch, 32, 32, 3)).astype(np.float32)
        labels = rng.integers(0, 10, batch).astype(np.int64)
        thunks, closers = {}, []
        for xla in xla_options:
            runner = tf1_reference.make_reference_runner(width, images, labels, xla=xla)
            closers.append(runner.close)
            name = "tf1_xla" if xla else "tf1"
            thunks[f"{name}/forward"], thunks[f"{name}/grad"] = runner.forward, runner.grad
            name = "keras_jit" if xla else "keras"
            thunks[f"{name}/forward"], thunks[f"{name}/grad"] = _keras_runner(
                width, images, labels, jit=xla
            )
        print(f"[bench] {width}, batch {batch}: {sorted(thunks)}", file=sys.stderr, flush=True)
        timed = timing.time_calls(thunks, **settings)
        seconds = {name: t["median_s"] for name, t in timed.items()}
        for close in closers:
            close()
        for name in dict.fromkeys(k.split("/")[0] for k in thunks):
            base = "tf1_xla" if name in ("tf1_xla", "keras_jit") else "tf1"
            fwd, grad = seconds[f"{name}/forward"], seconds[f"{name}/grad"]
            results["rows"].append(
                {
                    "width": width,
                    "batch": batch,
                    "variant": name,
                    "forward_img_per_s": batch / fwd,
                    "grad_img_per_s": batch / grad,
                    "forward_s": fwd,
                    "grad_s": grad,
                    # Throughput ratio against the TF1 graph with the same compilation (>1: faster).
                    "forward_ratio_vs_tf1": seconds[f"{base}/forward"] / fwd,
                    "grad_ratio_vs_tf1": seconds[f"{base}/grad"] / grad,
                }
            )
    results["settings"]["load_average_at_end"] = _load()

    columns = [
        "width",
        "batch",
        "variant",
        "forward_img_per_s",
        "grad_img_per_s",
        "forward_ratio_vs_tf1",
        "grad_ratio_vs_tf1",
    ]
    results["table"] = timing.write_results(
        args.output, results["rows"], columns=columns, extra=dict(settings=results["settings"])
    )
    print(
        "(ratio_vs_tf1: Keras throughput / TF1 throughput, each against TF1 with the same XLA "
        "setting)"
    )
    print(
        f"load average at start/end: {results['settings']['load_average_at_start']} / "
        f"{results['settings']['load_average_at_end']} on {os.cpu_count()} cores"
    )
    return results


def _load():
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


if __name__ == "__main__":
    main()
