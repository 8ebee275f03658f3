"""Trains Madry et al.'s CIFAR-10 ResNet, naturally or on PGD adversarial examples.

Quick start (synthetic data, no download, about a minute on 2 CPU cores):
  python train.py --model_dir=runs/quick --dataset=synthetic --steps=60 --checkpoint_every=20

Madry's adversarial training on CIFAR-10 (the paper's settings; days on a CPU):
  python train.py --model_dir=runs/adv --adversarial --epsilon=8 --pgd_steps=7 --pgd_step_size=2
"""

from absl import app, flags

from manifold_tf import training

_D = training.TrainConfig()
FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Output directory (checkpoints, logs, final.keras).", required=True)
flags.DEFINE_enum("width", _D.width, ["narrow", "wide"], "Model width.")
flags.DEFINE_enum("dataset", _D.dataset, ["cifar10", "synthetic"], "Training data.")
flags.DEFINE_string("data_dir", None, "cifar-10-batches-py folder (default: TensorFlow Datasets).")
flags.DEFINE_bool("adversarial", _D.adversarial, "Train on PGD adversarial examples.")
flags.DEFINE_enum("attack", _D.attack, ["pgd", "fgsm"], "Training attack: Madry's PGD-k, or FGSM from a random start (Wong et al.).")
flags.DEFINE_float("fgsm_step_factor", _D.fgsm_step_factor, "FGSM step as a multiple of epsilon.")
flags.DEFINE_enum("lr_schedule", _D.lr_schedule, ["piecewise", "cyclic"], "Learning-rate schedule.")
flags.DEFINE_float("lr_max", _D.lr_max, "Peak learning rate of the cyclic schedule.")
flags.DEFINE_float("lr_peak", _D.lr_peak, "Where the cyclic schedule peaks, as a fraction of the steps.")
flags.DEFINE_integer("holdout", _D.holdout, "Training images held out for PGD early stopping (0: none).")
flags.DEFINE_integer("holdout_pgd_steps", _D.holdout_pgd_steps, "PGD steps of the held-out check.")
flags.DEFINE_float("overfit_drop", _D.overfit_drop, "Stop when held-out PGD accuracy falls this far below its best.")
flags.DEFINE_float("epsilon", _D.epsilon, "PGD L-inf budget, pixels (0..255).")
flags.DEFINE_integer("pgd_steps", _D.pgd_steps, "PGD steps per batch.")
flags.DEFINE_float("pgd_step_size", _D.pgd_step_size, "PGD step size, pixels.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.")
flags.DEFINE_integer("steps", _D.steps, "Total training steps.")
flags.DEFINE_list("lr_boundaries", [str(b) for b in _D.lr_boundaries], "Steps where the learning rate drops.")
flags.DEFINE_list("lr_values", [str(v) for v in _D.lr_values], "Learning rates (one more than boundaries).")
flags.DEFINE_float("momentum", _D.momentum, "SGD momentum.")
flags.DEFINE_integer("seed", _D.seed, "Seed: initialisation, data order, augmentation, PGD starts.")
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every, "Steps between checkpoints.")
flags.DEFINE_integer("log_every", _D.log_every, "Steps between progress lines.")
flags.DEFINE_enum("strategy", _D.strategy, ["default", "mirrored"], "tf.distribute strategy.")
flags.DEFINE_bool("jit_compile", _D.jit_compile, "Compile the train step with XLA.")
flags.DEFINE_bool("resume", False, "Continue the run in --model_dir from its last checkpoint.")
flags.DEFINE_bool("overwrite", False, "Replace the run in a non-empty --model_dir.")


def main(argv):
    del argv
    import keras

    keras.utils.set_random_seed(FLAGS.seed)
    config = training.TrainConfig(
        width=FLAGS.width,
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        adversarial=FLAGS.adversarial,
        attack=FLAGS.attack,
        fgsm_step_factor=FLAGS.fgsm_step_factor,
        lr_schedule=FLAGS.lr_schedule,
        lr_max=FLAGS.lr_max,
        lr_peak=FLAGS.lr_peak,
        holdout=FLAGS.holdout,
        holdout_pgd_steps=FLAGS.holdout_pgd_steps,
        overfit_drop=FLAGS.overfit_drop,
        epsilon=FLAGS.epsilon,
        pgd_steps=FLAGS.pgd_steps,
        pgd_step_size=FLAGS.pgd_step_size,
        batch_size=FLAGS.batch_size,
        steps=FLAGS.steps,
        lr_boundaries=tuple(int(b) for b in FLAGS.lr_boundaries),
        lr_values=tuple(float(v) for v in FLAGS.lr_values),
        momentum=FLAGS.momentum,
        seed=FLAGS.seed,
        checkpoint_every=FLAGS.checkpoint_every,
        log_every=FLAGS.log_every,
        strategy=FLAGS.strategy,
        jit_compile=FLAGS.jit_compile,
    )
    training.train(config, FLAGS.model_dir, resume=FLAGS.resume, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
    app.run(main)
