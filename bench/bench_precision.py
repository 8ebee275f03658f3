"""float32 vs mixed bfloat16, with and without XLA: forward+input-gradient throughput and agreement.

The model is the shipped narrow CIFAR-10 base (``pretrained.path("narrow_robust")``, Madry ResNet,
pixels 0..255 in, logits out). Its bfloat16 copy is the same architecture built by
``models.madry_resnet`` under the Keras policy ``"mixed_bfloat16"`` (variables stay float32, layers
compute in bfloat16, batch norm in float32; the input and the input gradient stay float32) with the
shipped weights copied in. Variants, all in one process and taking turns within each timed repeat:

- ``f32``: float32 in a ``tf.function`` (the reference of every ratio);
- ``f32_xla``: the same with ``jit_compile=True``;
- ``bf16`` and ``bf16_xla``: the mixed bfloat16 copy, without and with XLA.

"grad" is one forward+backward pass as an attack step does it: the gradient of the summed
cross-entropy of the true labels with respect to the input images. Throughput is images per second
(median over repeats after warm-up), at batch 30 (a batch of the defence evaluation) and 300.

Agreement, on the first ``--agree_points`` CIFAR-10 test images (the sample beside the checkout, or
``$MANIFOLD_TF_CIFAR10_DIR``, or ``--data_dir``), of every variant with float32 without XLA:
identical argmax labels, the largest absolute logit difference, and the fraction of input-gradient
components with the same sign (attacks step along ``sign(grad)``); also each variant's accuracy.

    python -m bench.bench_precision                 # batches 30 and 300, 300 agreement images
    python -m bench.bench_precision --quick         # batch 30 only, fewer repeats
    python -m bench.bench_precision --smoke --output=/tmp/bench_precision.json   # batch 2, no XLA

Writes ``bench/results/bench_precision.json`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

from bench import smoke, timing

VARIANTS = ("f32", "f32_xla", "bf16", "bf16_xla")


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="narrow_robust", help="a shipped model name")
    parser.add_argument("--batches", default="30,300", help="comma list of batch sizes")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--iters", type=int, default=3, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--agree_points", type=int, default=300, help="test images for agreement")
    parser.add_argument("--data_dir", default=None, help="cifar-10-batches-py folder")
    parser.add_argument("--quick", action="store_true", help="batch 30 only, 3 repeats")
    parser.add_argument("--no_xla", action="store_true", help="skip the XLA variants")
    parser.add_argument("--smoke", action="store_true", help=smoke.HELP)
    parser.add_argument(
        "--output", default=timing.default_output("bench_precision"), help="JSON output file"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.iters = "30", 3, 2
    if args.smoke:  # the shipped model is what is measured: batch 2, 2 agreement images
        args.batches, args.agree_points, args.warmup, args.iters, args.repeats = "2", 2, 1, 1, 1
        # XLA compilation of the ResNet would be most of a smoke run: the same functions with
        # jit_compile=True.
        args.no_xla = True
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def _data_dir(arg: str | None) -> str | None:
    if arg:
        return arg
    from manifold_tf import data

    if data.default_data_dir():
        return data.default_data_dir()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sample = os.path.normpath(os.path.join(here, "..", "shared", "data", "cifar10-sample"))
    return sample if os.path.isdir(sample) else None


def _cpu_flags() -> dict:
    """The CPU's bfloat16-related flags (``/proc/cpuinfo``), e.g. ``avx512_bf16``, ``amx_bf16``."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        pass
    return dict(
        model_name=model,
        bf16_flags=sorted(f for f in flags if "bf16" in f),
        avx512f="avx512f" in flags,
        amx_tile="amx_tile" in flags,
    )


def _models(name: str):
    """``(float32 model, mixed-bfloat16 copy with the same weights)``."""
    import keras

    from manifold_tf import models, pretrained

    f32 = keras.saving.load_model(pretrained.path(name))
    width = next(
        (
            w
            for w, filt in models.FILTERS.items()
            if int(f32.get_layer("init_conv").kernel.shape[-1]) == filt[0]
            and int(f32.get_layer("logit").kernel.shape[0]) == filt[3]
        ),
        None,
    )
    if width is None:
        raise ValueError(f"{name}: not a Madry ResNet of a known width.")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        bf16 = models.madry_resnet(width, num_classes=int(f32.output_shape[-1]))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    f32_weights = {w.path: w for w in f32.weights}
    for w in bf16.weights:
        w.assign(f32_weights[w.path])  # same layer names, so the same variable paths
    if len(f32_weights) != len(bf16.weights):
        raise ValueError("the float32 and bfloat16 models have different variables.")
    return f32, bf16, width


def _functions(model, *, jit: bool):
    """``(logits(x), grad(x, y))`` compiled functions; float32 in and out."""
    import keras
    import tensorflow as tf

    @tf.function(jit_compile=jit)
    def logits(x):
        return tf.cast(model(x, training=False), tf.float32)

    @tf.function(jit_compile=jit)
    def grad(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = tf.cast(model(x, training=False), tf.float32)
            loss = tf.reduce_sum(
                keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True)
            )
        return tape.gradient(loss, x)

    return logits, grad


def _agreement(functions, images, labels, chunk: int = 100) -> dict:
    """Per variant: accuracy and agreement with ``f32`` (labels, logits, input-gradient signs)."""
    import tensorflow as tf

    out = {}
    for name, (logits_fn, grad_fn) in functions.items():
        logits, grads = [], []
        for s in range(0, len(images), chunk):
            x = tf.constant(images[s : s + chunk])
            y = tf.constant(labels[s : s + chunk])
            logits.append(logits_fn(x).numpy())
            grads.append(grad_fn(x, y).numpy())
        out[name] = (np.concatenate(logits), np.concatenate(grads))
    ref_logits, ref_grads = out["f32"]
    ref_sign = np.sign(ref_grads)
    nonzero = ref_sign != 0
    rows = {}
    for name, (lg, gr) in out.items():
        sign = np.sign(gr)
        per_image = np.mean((sign == ref_sign).reshape(len(gr), -1), axis=1)
        rows[name] = dict(
            accuracy=float(np.mean(lg.argmax(-1) == labels)),
            label_agreement=float(np.mean(lg.argmax(-1) == ref_logits.argmax(-1))),
            max_logit_diff=float(np.max(np.abs(lg - ref_logits))),
            mean_logit_diff=float(np.mean(np.abs(lg - ref_logits))),
            logit_scale=float(np.mean(np.abs(ref_logits))),
            sign_agreement=float(np.mean(sign == ref_sign)),
            sign_agreement_nonzero=float(np.mean(sign[nonzero] == ref_sign[nonzero])),
            sign_agreement_worst_image=float(per_image.min()),
            zero_grad_fraction=float(np.mean(gr == 0)),
        )
    return rows


def main(argv=None) -> dict:
    args = _parse(argv)
    import tensorflow as tf

    from manifold_tf import data

    f32, bf16, width = _models(args.model)
    variants = [v for v in VARIANTS if not (args.no_xla and v.endswith("_xla"))]
    functions = {
        name: _functions(f32 if name.startswith("f32") else bf16, jit=name.endswith("_xla"))
        for name in variants
    }
    data_dir = _data_dir(args.data_dir)
    settings = dict(
        model=args.model,
        width=width,
        warmup=args.warmup,
        iters=args.iters,
        repeats=args.repeats,
        batches=args.batches,
        variants=variants,
        smoke=args.smoke,
        tensorflow=tf.__version__,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        cpu=_cpu_flags(),
        load_average_at_start=_load(),
        onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(default)"),
        grad="d sum(cross-entropy of the true labels) / d images",
        bf16="keras mixed_bfloat16 policy: bf16 compute, f32 variables, f32 input and input grad",
        data_dir=data_dir,
    )
    rows = []
    if data_dir:
        images, labels = data.load_cifar10_arrays("test", data_dir)
    else:  # no CIFAR-10 folder: synthetic pixels, agreement only (accuracy is meaningless)
        rng = np.random.default_rng(0)
        images = rng.uniform(0, 255, (args.agree_points, 32, 32, 3)).astype(np.float32)
        labels = rng.integers(0, 10, args.agree_points).astype(np.int32)
    images = images[: args.agree_points].astype(np.float32)
    labels = labels[: args.agree_points].astype(np.int32)
    print(f"[bench] agreement on {len(labels)} images", file=sys.stderr, flush=True)
    agreement = _agreement(functions, images, labels)
    settings["agree_points"] = int(len(labels))

    for batch in args.batches:
        reps = -(-batch // len(images))
        x = tf.constant(np.concatenate([images] * reps)[:batch])
        y = tf.constant(np.concatenate([labels] * reps)[:batch])
        thunks = {
            name: (lambda g=g, x=x, y=y: g(x, y).numpy()) for name, (_, g) in functions.items()
        }
        print(f"[bench] batch {batch}: {list(thunks)}", file=sys.stderr, flush=True)
        timed = timing.time_calls(
            thunks, repeats=args.repeats, warmup=args.warmup, iters=args.iters
        )
        ref = timed["f32"]["median_s"]
        for name in variants:
            t = timed[name]
            rows.append(
                dict(
                    batch=batch,
                    variant=name,
                    grad_img_per_s=batch / t["median_s"],
                    ratio_vs_f32=ref / t["median_s"],
                    grad_s=t["median_s"],
                    grad_min_s=t["min_s"],
                    times_s=t["times_s"],
                    **{
                        k: agreement[name][k]
                        for k in ("label_agreement", "max_logit_diff", "sign_agreement", "accuracy")
                    },
                )
            )
    settings["load_average_at_end"] = _load()
    columns = [
        "batch",
        "variant",
        "grad_img_per_s",
        "ratio_vs_f32",
        "label_agreement",
        "max_logit_diff",
        "sign_agreement",
        "accuracy",
    ]
    table = timing.write_results(
        args.output, rows, columns=columns, extra=dict(settings=settings, agreement=agreement)
    )
    print(
        "(ratio_vs_f32: throughput / float32-without-XLA throughput at the same batch; "
        "agreement with float32 without XLA on the test images)"
    )
    print(
        f"bf16 CPU flags: {settings['cpu']['bf16_flags']}; load average at start/end: "
        f"{settings['load_average_at_start']} / {settings['load_average_at_end']} "
        f"on {os.cpu_count()} cores"
    )
    return dict(settings=settings, agreement=agreement, rows=rows, table=table)


def _load():
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


if __name__ == "__main__":
    main()
