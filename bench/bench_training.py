"""Adversarial-training throughput vs its limit, measured in one run.

A PGD-k training step costs k attack passes (forward + input gradient, inference mode) plus one
training pass (forward + weight gradient), so its throughput limit is
``forward_backward_rate / (k + 1)``. This script measures the plain forward+backward rate of the
model and the real ``AdversarialTrainer.train_step`` rate, interleaved repeat by repeat so that
machine load hits both alike, and reports ``ours / limit`` (goal >= 0.9).

  python -m bench.bench_training [--width=narrow] [--batch_size=128] [--pgd_steps=7] [--repeats=3]
"""

import os

import numpy as np
import tensorflow as tf
from absl import app, flags

from bench import timing
from manifold_tf import training

flags.DEFINE_enum("width", "narrow", ["narrow", "wide"], "Model width.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("pgd_steps", 7, "PGD steps k.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
flags.DEFINE_integer("iters", 3, "Steps per timed repeat.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_string("output", timing.default_output("bench_training"), "JSON output file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = training.TrainConfig(
        width=FLAGS.width,
        dataset="synthetic",
        adversarial=True,
        pgd_steps=FLAGS.pgd_steps,
        batch_size=FLAGS.batch_size,
        steps=1,
        checkpoint_every=1,
        jit_compile=FLAGS.jit_compile,
    )
    trainer = training.build_trainer(config)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (FLAGS.batch_size, 32, 32, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, FLAGS.batch_size).astype(np.int32))
    base = trainer.base
    xent = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=FLAGS.jit_compile)
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            loss = xent(y, base(x, training=True))
        return tape.gradient(loss, base.trainable_variables)

    train_step = tf.function(trainer.train_step, jit_compile=FLAGS.jit_compile)

    def calls(fn, iters):
        """A thunk: ``iters`` calls of ``fn``, then waits for the last result."""

        def run():
            for _ in range(iters):
                out = fn((x, y)) if fn is train_step else fn(x, y)
            tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)

        return run

    calls(forward_backward, 1)(), calls(train_step, 1)()  # compile
    fb_iters, adv_iters = FLAGS.iters * (FLAGS.pgd_steps + 1), FLAGS.iters
    timed = timing.time_calls(
        {"fb": calls(forward_backward, fb_iters), "adv": calls(train_step, adv_iters)},
        repeats=FLAGS.repeats,
        warmup=0,
    )
    fb_rate = FLAGS.batch_size / (timed["fb"]["median_s"] / fb_iters)
    adv_rate = FLAGS.batch_size / (timed["adv"]["median_s"] / adv_iters)
    limit = fb_rate / (FLAGS.pgd_steps + 1)
    result = {
        "width": FLAGS.width,
        "batch_size": FLAGS.batch_size,
        "pgd_steps": FLAGS.pgd_steps,
        "jit_compile": FLAGS.jit_compile,
        "forward_backward_examples_per_s": fb_rate,
        "limit_examples_per_s": limit,
        "adversarial_training_examples_per_s": adv_rate,
        "ratio_to_limit": adv_rate / limit,
    }
    timing.write_results(FLAGS.output, [result], extra=dict(load_average=os.getloadavg()))


if __name__ == "__main__":
    app.run(main)
