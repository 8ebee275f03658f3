"""Benchmark: the base attacks' cost per point, early exit on and off; precision and XLA.

One run, the shipped base (``--model``, default ``narrow_robust``), the first ``--num_points``
points of the CIFAR-10 sample, APGD-CE (``--steps``) and APGD-T (``--steps`` x ``--num_targets``)
at ``--epsilon``, each on all points (as run alone, not chained as in the suite):

1. **Early exit.** float32 without XLA, ``early_exit=False`` (every run takes all its steps on each
   point it starts on: the code before early exit, bit for bit) and ``early_exit=True`` (a point
   leaves a run at the first of APGD's checkpoints where it is misclassified). Per row: seconds,
   forward+backward passes per point (``base_passes``, mean over the ``N`` points) and in all,
   points broken, robust accuracy with its exact 95% interval, and the per-point comparison with
   the reference (float32, early exit off): points it breaks that the row does not (``lost``) and
   the other way round (``gained``).
2. **Precision and compilation.** The same attacks, early exit on, with the base's gradients in
   ``mixed_bfloat16`` (the shipped weights in a copy built under that Keras policy, logits cast to
   float32: ``bench.bench_precision``'s copy) and/or XLA (``jit_compile=True``, which compiles once
   per batch size the shrinking batch meets; that time is part of the row). Success is verified by
   a fresh float32 prediction at each ``x_adv`` (what the evaluation counts). Also the
   forward+input-gradient throughput of each variant at a fixed batch of ``N`` (median of timed
   repeats, variants taking turns), as a ratio to float32 without XLA.

A variant may become a default only if no point's outcome changes (``lost = gained = 0``) and it
is faster; BUILD.md keeps the table.

    python -m bench.bench_base_attacks                # about 25 minutes on 2 loaded cores
    python -m bench.bench_base_attacks --smoke        # 2 points, 3 steps, 1 target, seconds
    python -m bench.bench_base_attacks --variants=    # early exit only
    python -m bench.bench_base_attacks --xla_attacks=apgd_ce   # XLA: APGD-CE only

Writes ``bench/results/bench_base_attacks.json`` (``--smoke``: ``..._smoke.json``; ``--output``).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench import timing  # noqa: E402

VARIANTS = ("f32_xla", "bf16", "bf16_xla")


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="narrow_robust", help="a shipped model name")
    parser.add_argument("--data_dir", default=None, help="cifar-10-batches-py folder")
    parser.add_argument("--num_points", type=int, default=30)
    parser.add_argument("--epsilon", type=float, default=8.0, help="L-inf budget, pixels")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num_targets", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list from {VARIANTS} (float32 without XLA always runs); empty: none",
    )
    parser.add_argument(
        "--xla_attacks",
        default="apgd_ce,apgd_t",
        help="the attacks the XLA variants run (XLA compiles per batch size: APGD-T takes long)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed gradient repeats")
    parser.add_argument("--smoke", action="store_true", help="2 points, 3 steps, 1 target")
    parser.add_argument("--output", default=None, help="JSON output file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_points, args.steps, args.num_targets, args.repeats = 2, 3, 1, 1
    name = "bench_base_attacks_smoke" if args.smoke else "bench_base_attacks"
    args.output = args.output or timing.default_output(name)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.smoke:  # XLA compiles once per batch size of the shrinking batch: minutes, not seconds
        args.variants = [v for v in args.variants if "xla" not in v]
    args.xla_attacks = [a for a in args.xla_attacks.split(",") if a]
    for v in args.variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown variant {v!r}; choose from {VARIANTS}.")
    return args


def _float32_logits(model):
    """``model`` with its logits cast to float32 (a mixed-precision net returns bfloat16)."""
    import keras

    class Float32Logits(keras.Model):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, x, training=False):
            return keras.ops.cast(self.inner(x, training=training), "float32")

    return Float32Logits(model)


def _gradient_rates(models: dict, x, y, repeats: int) -> dict:
    """Images per second of one forward+input-gradient pass (APGD-CE's loss) per variant."""
    import tensorflow as tf

    from manifold_tf.attacks.apgd import cross_entropy

    thunks = {}
    for name, (model, jit) in models.items():

        @tf.function(jit_compile=jit)
        def grad(x, y, model=model):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(cross_entropy(model(x, training=False), y))
            return tape.gradient(loss, x)

        xt, yt = tf.constant(x), tf.constant(y)
        thunks[name] = lambda grad=grad, xt=xt, yt=yt: grad(xt, yt).numpy()
    times = timing.time_calls(thunks, repeats=repeats, warmup=2, iters=2)
    return {name: len(x) / t["median_s"] for name, t in times.items()}


def main(argv=None) -> dict:
    args = _parse(argv)
    from bench.bench_precision import _data_dir, _models
    from manifold_tf import attacks, compiled
    from manifold_tf.attacks.common import predicted_wrong
    from manifold_tf.data import load_cifar10_arrays
    from manifold_tf.evaluation.stats import clopper_pearson

    x, y = load_cifar10_arrays("test", _data_dir(args.data_dir))
    x, y = x[: args.num_points].astype(np.float32), y[: args.num_points].astype(np.int32)
    n = len(x)
    f32, bf16, _ = _models(args.model)
    bf16 = _float32_logits(bf16)
    models = {"f32": (f32, False), "f32_xla": (f32, True), "bf16": (bf16, False)}
    models["bf16_xla"] = (bf16, True)

    def settings(jit_compile: bool, early_exit: bool):
        return attacks.APGDSettings(
            steps=args.steps,
            num_targets=args.num_targets,
            early_exit=early_exit,
            jit_compile=jit_compile,
        )

    common = dict(epsilon=args.epsilon, seed=args.seed)
    kinds = {
        "apgd_ce": lambda m, xs, ys, **kw: attacks.apgd_ce(
            m, xs, ys, settings=settings(**kw), **common
        ),
        "apgd_t": lambda m, xs, ys, **kw: attacks.apgd_t(
            m, xs, ys, settings=settings(**kw), **common
        ),
    }
    plan = [("f32", False), ("f32", True)] + [(v, True) for v in args.variants]
    rows, per_point, reference = [], {}, {}
    for variant, early_exit in plan:
        model, jit = models[variant]
        # Warm-up on two points (tracing; XLA compiles those batch sizes only).
        todo = {k: r for k, r in kinds.items() if not jit or k in args.xla_attacks}
        if args.smoke and variant != "f32":  # each (model, attack) traces the net: ~8 s apiece
            todo = {k: r for k, r in todo.items() if k == "apgd_ce"}
        for run in todo.values():
            run(model, x[:2], y[:2], jit_compile=jit, early_exit=early_exit)
        for kind, run in todo.items():
            start = time.perf_counter()
            res = run(model, x, y, jit_compile=jit, early_exit=early_exit)
            seconds = time.perf_counter() - start
            broken = predicted_wrong(f32, res.x_adv, y)  # what the evaluation counts
            ref = reference.setdefault(kind, broken)
            lo, hi = clopper_pearson(int((~broken).sum()), n)
            passes = int(res.base_passes.sum())
            rows.append(
                dict(
                    attack=kind,
                    variant=variant,
                    early_exit=early_exit,
                    seconds=seconds,
                    passes_per_point=passes / n,
                    passes=passes,
                    passes_per_s=passes / seconds,
                    broken=int(broken.sum()),
                    n=n,
                    robust_accuracy=float((~broken).mean()),
                    robust_ci95=f"[{lo:.3f}, {hi:.3f}]",
                    lost=int((ref & ~broken).sum()),
                    gained=int((broken & ~ref).sum()),
                    claimed_equals_f32=bool(np.array_equal(res.success, broken)),
                )
            )
            per_point[f"{kind}/{variant}/early_exit={early_exit}"] = dict(
                broken=broken.tolist(), base_passes=res.base_passes.tolist()
            )
            print(rows[-1], flush=True)
    rates = _gradient_rates(
        {v: models[v] for v in ["f32"] + args.variants}, x, y, repeats=args.repeats
    )
    for row in rows:
        row["grad_speed_vs_f32"] = rates[row["variant"]] / rates["f32"]
    columns = [
        "attack",
        "variant",
        "early_exit",
        "seconds",
        "passes_per_point",
        "passes_per_s",
        "broken",
        "n",
        "robust_ci95",
        "lost",
        "gained",
        "grad_speed_vs_f32",
    ]
    traces = {
        v: {str(k): c for k, c in compiled.tracing_counts(models[v][0]).items()}
        for v in ["f32"] + args.variants
    }
    extra = dict(
        settings=vars(args),
        tracing_counts=traces,
        gradient_images_per_s=rates,
        per_point=per_point,
        load_average=os.getloadavg(),
    )
    timing.write_results(args.output, rows, columns=columns, extra=extra)
    return dict(rows=rows, rates=rates)


if __name__ == "__main__":
    main()
