"""Throughput of the MCN shell vs its limit and vs a per-image, per-label loop (narrow ResNet).

Variants, all in one process on the same images, taking turns within each timed repeat:

- ``shell``: ``MCNShell(base, delta, steps=K).embed`` on ``N`` images: the ``N * C`` ascents run
  as one batch in one compiled ``tf.function``.
- ``limit``: one forward+backward pass of the base on the same ``N * C`` rows (the gradient of the
  target labels' log-odds with respect to the input, the shell's step), timed alone; the shell
  cannot beat ``K`` of them, so the limit is ``N / (K * t_pass)`` images/s.
- ``loop_step``: the paper's own code's structure: for every image and every label, ``K`` steps,
  each a separate call of a compiled one-image step (as TF1's ``session.run`` per iteration).
- ``loop_eager``: the same loop written eagerly (a ``GradientTape`` per step, no ``tf.function``).
- ``shell_xla_while_loop`` (bench only): the shell's ``"pgd"`` computation with its ``K`` steps in a
  ``tf.while_loop`` under XLA (the shell itself unrolls them under XLA), to show what XLA costs
  inside ``tf.while_loop`` on a CPU.

Both loops are timed on one image (``C * K`` steps) and reported per image. Each batched variant
is run without and with XLA. Reported: images per second (median over repeats after warm-up),
the shell's fraction of the limit (goal >= 0.85) and its speed-up over the loops (goal >= 50).

    python -m bench.bench_shells                 # N=4 images, K=10 steps (MCNShell default),
                                                 # 3 repeats
    python -m bench.bench_shells --images 8 --steps 10
    python -m bench.bench_shells --smoke --output=/tmp/bench_shells.json  # 1 image, 2 steps

Writes ``bench/results/bench_shells.json`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np

from bench import smoke, timing


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="N images per shell call")
    parser.add_argument(
        "--steps", type=int, default=10, help="K optimiser steps per label (the shell default)"
    )
    parser.add_argument("--delta", type=float, default=8.0, help="ball radius, pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--smoke", action="store_true", help=smoke.HELP)
    parser.add_argument("--width", default="narrow", choices=["narrow", "wide"])
    parser.add_argument(
        "--weights", default=None, help="optional .keras base (default: random init)"
    )
    parser.add_argument(
        "--output", default=timing.default_output("bench_shells"), help="JSON output file"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # the synthetic set's nearest-centre model as the base, 1 image, 2 steps
        args.images, args.steps, args.repeats, args.weights = 1, 2, 1, None
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    import keras
    import tensorflow as tf

    from manifold_tf import models, projected
    from manifold_tf.shells import MCNShell, log_odds

    if args.smoke:
        base, base_name = smoke.nearest_centre_model(), "nearest-centre (smoke)"
    elif args.weights:
        base, base_name = keras.saving.load_model(args.weights), f"{args.width} ResNet"
    else:
        base, base_name = models.madry_resnet(args.width), f"{args.width} ResNet"
    num_classes = int(base.outputs[0].shape[-1])
    n, k, delta = args.images, args.steps, args.delta
    step = 2.5 * delta / k
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, size=(n, 32, 32, 3)).astype(np.float32))
    rows = tf.repeat(x, num_classes, axis=0)
    labels = tf.tile(tf.range(num_classes), [n])

    def make_pass(jit: bool):
        @tf.function(jit_compile=jit)
        def one_pass(z, t):
            with tf.GradientTape() as tape:
                tape.watch(z)
                f = tf.reduce_sum(log_odds(base(z, training=False), t))
            return tape.gradient(f, z)

        return one_pass

    passes = {jit: make_pass(jit) for jit in (False, True)}
    shells = {
        jit: MCNShell(base, delta, steps=k, step_size=step, jit_compile=jit)
        for jit in (False, True)
    }
    step_fn = make_pass(False)  # compiled one-image step, called C * K times per image

    def loop_step():
        xi = x[:1]
        for t in range(num_classes):
            z, lab = xi, tf.constant([t])
            for _ in range(k):
                z = projected.project(z + step * tf.sign(step_fn(z, lab)), xi, delta)
        return z.numpy()

    def loop_eager():
        xi = x[:1]
        for t in range(num_classes):
            z, lab = xi, tf.constant([t])
            for _ in range(k):
                with tf.GradientTape() as tape:
                    tape.watch(z)
                    f = tf.reduce_sum(log_odds(base(z, training=False), lab))
                z = projected.project(z + step * tf.sign(tape.gradient(f, z)), xi, delta)
        return z.numpy()

    @tf.function(jit_compile=True)
    def xla_while_loop(x):
        """The shell's "pgd" computation with its K steps in a tf.while_loop, under XLA."""
        xt = tf.repeat(x, num_classes, axis=0)
        z, f = projected.projected_ascent(
            lambda z: log_odds(base(z, training=False), labels),
            xt,
            xt,
            radius=delta,
            steps=k,
            step_size=step,
            unroll=False,
        )
        label = tf.argmax(tf.reshape(f, [n, num_classes]), axis=1, output_type=tf.int32)
        chosen = tf.gather(tf.reshape(z, [n, num_classes, 32, 32, 3]), label, batch_dims=1)
        return label, tf.nn.softmax(base(chosen, training=False))

    thunks = {}
    for jit in (False, True):
        tag = "xla" if jit else "no_xla"
        thunks[f"limit_pass_{tag}"] = lambda jit=jit: passes[jit](rows, labels).numpy()
        thunks[f"shell_{tag}"] = lambda jit=jit: shells[jit].embed_function(x)["label"].numpy()
    thunks["shell_xla_while_loop"] = lambda: xla_while_loop(x)[0].numpy()
    thunks["loop_step"] = loop_step
    thunks["loop_eager"] = loop_eager
    # One warm-up call each (tracing, XLA compilation); interleaved: a passing load slows every
    # variant alike.
    timed = timing.time_calls(thunks, repeats=args.repeats, warmup=1)
    seconds = {name: t["median_s"] for name, t in timed.items()}

    rate = {}
    for tag in ("no_xla", "xla"):
        rate[f"limit_{tag}"] = n / (k * seconds[f"limit_pass_{tag}"])
        rate[f"shell_{tag}"] = n / seconds[f"shell_{tag}"]
    rate["shell_xla_while_loop"] = n / seconds["shell_xla_while_loop"]
    rate["loop_step"] = 1.0 / seconds["loop_step"]
    rate["loop_eager"] = 1.0 / seconds["loop_eager"]
    best_limit = max(rate["limit_no_xla"], rate["limit_xla"])

    def row(variant, images_per_s, limit=None):
        out = {"variant": variant, "images/s": images_per_s, "limit images/s (same XLA)": limit}
        if limit is not None:
            out.update(
                {
                    "x limit": images_per_s / limit,
                    "x best limit": images_per_s / best_limit,
                    "x loop_step": images_per_s / rate["loop_step"],
                    "x loop_eager": images_per_s / rate["loop_eager"],
                }
            )
        return out

    rows_out = [
        row(f"shell ({tag})", rate[f"shell_{tag}"], rate[f"limit_{tag}"])
        for tag in ("no_xla", "xla")
    ]
    rows_out.append(
        row("shell_xla_while_loop (bench only)", rate["shell_xla_while_loop"], rate["limit_xla"])
    )
    rows_out += [row(name, rate[name]) for name in ("loop_step", "loop_eager")]
    results = dict(
        settings=dict(
            images=n,
            steps=k,
            delta=delta,
            num_classes=num_classes,
            rows=n * num_classes,
            repeats=args.repeats,
            smoke=args.smoke,
            width=args.width,
            base=base_name,
            weights=args.weights,
            tensorflow=tf.__version__,
            cpu_count=os.cpu_count(),
            machine=platform.machine(),
            load_average=os.getloadavg(),
        ),
        seconds_per_call=seconds,
        images_per_second=rate,
        goals=dict(shell_vs_limit=0.85, shell_vs_loop=50.0),
    )
    print(
        f"MCN shell, {base_name}, N={n} images x C={num_classes} labels, K={k} steps "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)\n"
    )
    results["table"] = timing.write_results(args.output, rows_out, extra=results)
    return results


if __name__ == "__main__":
    main()
