"""Trains Madry et al.'s CIFAR-10 ResNet: naturally, on PGD adversarial examples, or fast (FGSM).

Quick start (synthetic data, no download, about a minute on 2 CPU cores):
  python train.py --model_dir=runs/quick --dataset=synthetic --steps=60 --checkpoint_every=20

Madry's adversarial training on CIFAR-10 (the paper's settings; days on a CPU):
  python train.py --model_dir=runs/adv --adversarial --epsilon=8 --pgd_steps=7 --pgd_step_size=2

Fast adversarial training (Wong et al. 2020) with held-out PGD early stopping:
  python train.py --model_dir=runs/fast --adversarial --attack=fgsm --lr_schedule=cyclic \
    --holdout=500 --steps=2160 --checkpoint_every=72

Several workers (one process per host or GPU; TF_CONFIG names them, worker 0 is the chief):
  TF_CONFIG='{"cluster": {"worker": ["h0:2222", "h1:2222"]},
             "task": {"type": "worker", "index": 0}}' \
    python train.py --model_dir=/shared/runs/adv --strategy=multi_worker --adversarial ...
"""

from __future__ import annotations

import sys

import keras
from absl import app, flags

from manifold_tf import distributed, interrupts, training
from manifold_tf.cli import flags as config_flags
from manifold_tf.cli.errors import usage_error
from manifold_tf.evaluation.store import RunLocked
from manifold_tf.training import TrainConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Output directory (checkpoints, logs, final.keras).")
flags.DEFINE_bool("resume", False, "Continue the run in --model_dir from its last checkpoint.")
flags.DEFINE_bool("overwrite", False, "Replace the run in a non-empty --model_dir.")
flags.DEFINE_float(
    "heartbeat_seconds",
    None,
    "With TF_CONFIG (several workers): seconds between "
    "TensorFlow's checks that every worker is alive (default 30).",
)
config_flags.define(TrainConfig)


def main(argv):
    if len(argv) > 1:
        usage_error("train", f"unexpected arguments: {argv[1:]} (flags are --name=value).")
    if not FLAGS.model_dir:
        usage_error("train", "--model_dir is required (the run's output directory).")
    try:
        # TF_CONFIG first: MultiWorkerMirroredStrategy must exist before any other TensorFlow op.
        workers = distributed.from_env(heartbeat_seconds=FLAGS.heartbeat_seconds)
        config = config_flags.build(TrainConfig)
        config.validate()
    except ValueError as e:
        usage_error("train", str(e))
    keras.utils.set_random_seed(config.seed)
    interrupts.install()  # safe points: after each checkpoint
    try:
        training.train(
            config, FLAGS.model_dir, resume=FLAGS.resume, overwrite=FLAGS.overwrite, workers=workers
        )
    except interrupts.Stopped as e:
        sys.stderr.write(interrupts.stopped_message(e, "train", FLAGS.model_dir))
        sys.exit(e.exit_code)
    except distributed.WORKER_LOST as e:
        sys.stderr.write(
            f"train: error: a worker was lost ({type(e).__name__}). The chief's "
            f"last checkpoint is in {FLAGS.model_dir}: start the workers again with "
            f"--resume.\n"
        )
        sys.exit(1)
    except (ValueError, OSError, RunLocked) as e:
        sys.stderr.write(f"train: error: {e}\n")
        sys.exit(1)


def run():
    """Console-script entry point (``manifold-tf-train``)."""
    config_flags.show_in_help(__name__)
    app.run(main)


if __name__ == "__main__":
    run()
