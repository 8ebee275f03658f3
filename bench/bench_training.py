"""Adversarial-training throughput vs its limit, measured in one run.

A PGD-k training step costs k attack passes (forward + input gradient, inference mode) plus one
training pass (forward + weight gradient), so its throughput limit is
``forward_backward_rate / (k + 1)``. This script measures the plain forward+backward rate of the
model and the real ``AdversarialTrainer.train_step`` rate, interleaved repeat by repeat so that
machine load hits both alike, and reports ``ours / limit`` (goal >= 0.9).

  python -m bench.bench_training [--width=narrow] [--batch_size=128] [--pgd_steps=7] [--repeats=3]
  python -m bench.bench_training --smoke --output=/tmp/bench_training.json   # batch 2, PGD-1
"""

import argparse
import os

import numpy as np
import tensorflow as tf

from bench import smoke, timing
from manifold_tf import training


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", default="narrow", choices=["narrow", "wide"])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--pgd_steps", type=int, default=7, help="PGD steps k")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--iters", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--jit_compile", action="store_true", help="the train step with XLA")
    parser.add_argument("--smoke", action="store_true", help=smoke.HELP)
    parser.add_argument(
        "--output", default=timing.default_output("bench_training"), help="JSON output file"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # the model is what is measured: the narrow ResNet on a batch of 2, PGD-1
        args.width, args.batch_size, args.pgd_steps, args.repeats, args.iters = "narrow", 2, 1, 1, 1
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    config = training.TrainConfig(
        width=args.width,
        dataset="synthetic",
        adversarial=True,
        pgd_steps=args.pgd_steps,
        batch_size=args.batch_size,
        steps=1,
        checkpoint_every=1,
        jit_compile=args.jit_compile,
    )
    trainer = training.build_trainer(config)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (args.batch_size, 32, 32, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, args.batch_size).astype(np.int32))
    base = trainer.base
    xent = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=args.jit_compile)
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            loss = xent(y, base(x, training=True))
        return tape.gradient(loss, base.trainable_variables)

    train_step = tf.function(trainer.train_step, jit_compile=args.jit_compile)

    def calls(fn, iters):
        """A thunk: ``iters`` calls of ``fn``, then waits for the last result."""

        def run():
            for _ in range(iters):
                out = fn((x, y)) if fn is train_step else fn(x, y)
            tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)

        return run

    calls(forward_backward, 1)(), calls(train_step, 1)()  # compile
    fb_iters, adv_iters = args.iters * (args.pgd_steps + 1), args.iters
    timed = timing.time_calls(
        {"fb": calls(forward_backward, fb_iters), "adv": calls(train_step, adv_iters)},
        repeats=args.repeats,
        warmup=0,
    )
    fb_rate = args.batch_size / (timed["fb"]["median_s"] / fb_iters)
    adv_rate = args.batch_size / (timed["adv"]["median_s"] / adv_iters)
    limit = fb_rate / (args.pgd_steps + 1)
    result = {
        "width": args.width,
        "batch_size": args.batch_size,
        "pgd_steps": args.pgd_steps,
        "jit_compile": args.jit_compile,
        "forward_backward_examples_per_s": fb_rate,
        "limit_examples_per_s": limit,
        "adversarial_training_examples_per_s": adv_rate,
        "ratio_to_limit": adv_rate / limit,
    }
    table = timing.write_results(
        args.output, [result], extra=dict(smoke=args.smoke, load_average=os.getloadavg())
    )
    return dict(result, table=table)


if __name__ == "__main__":
    main()
