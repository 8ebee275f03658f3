"""Evaluates a classifier: accuracy, the (p, q, delta)-separation test, or a model shell's defence.

  python evaluate.py --shell=mcn --delta=8                     # defence evaluation (Table 2)
  python evaluate.py --mode=separation --delta=8 --p=0.9       # separation test (Table 1)
  python evaluate.py --mode=accuracy --checkpoint=PATH         # clean and PGD-20 accuracy
  python evaluate.py --shell=cw --preset=paper                 # the paper's protocol (hours)
  TF_CONFIG='{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": 0}}' \
    python evaluate.py --shell=mcn --output_dir=/shared/run    # one of several workers (BUILD.md)

Flags are grouped by what they configure: the inputs, the run directory, accuracy mode, the
separation test (--separation_*), Table 2's points (--defence_*), the base model's attack
(--base_attack_*), the shell (--shell, --shell_*) and the adaptive attack (--adaptive, --adaptive_*).
--epsilon is the attacker's budget and --delta / --p the shell's (and the separation test's)
parameters in every mode. Without --checkpoint and --data_dir: CIFAR-10 from
$MANIFOLD_TF_CIFAR10_DIR with the shipped model when that folder exists, else synthetic data.
"""

from __future__ import annotations

import sys

from absl import app, flags

from manifold_tf.cli import flags as config_flags
from manifold_tf.evaluation import config as cfg

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", None, list(cfg.MODES),
                  "What to evaluate (default: defence when --shell is given, else accuracy).")
flags.DEFINE_enum("preset", "default", sorted(cfg.PRESETS),
                  "Named settings: default (CPU-sized) or paper (the paper's protocol; hours on a CPU). "
                  "Explicit flags override the preset.")
flags.DEFINE_float("epsilon", 8.0, "Attacker's L-inf budget, pixels (0..255; 8 = 8/255), every mode.")
flags.DEFINE_float("delta", 8.0, "Radius delta of the separation test and of the MCN shell, pixels.")
flags.DEFINE_float("p", 0.9, "Confidence level p of the separation test and of the NCN shell.")
flags.DEFINE_float("heartbeat_seconds", None, "With TF_CONFIG (several workers): seconds between "
                   "TensorFlow's checks that every worker is alive (default 30).")
config_flags.define(cfg.InputConfig)
config_flags.define(cfg.RunConfig)
config_flags.define(cfg.AccuracyConfig, skip=("epsilon",))
config_flags.define(cfg.SeparationConfig, "separation_", skip=("delta", "p"))
config_flags.define(cfg.DefenceConfig, "defence_", skip=("epsilon",))
config_flags.define(cfg.BaseAttackConfig, "base_attack_")
config_flags.define(cfg.ShellConfig, "shell_", skip=("delta", "p"))
config_flags.define(cfg.AdaptiveConfig, "adaptive_")


def _shared(name: str, base_value):
    return FLAGS[name].value if FLAGS[name].present else base_value


def config_from_flags() -> cfg.EvaluationConfig:
    """The :class:`EvaluationConfig` the parsed flags describe (preset first, explicit flags win)."""
    preset = cfg.PRESETS[FLAGS.preset]
    sep0 = preset.get("separation", cfg.SeparationConfig())
    def0 = preset.get("defence", cfg.DefenceConfig())
    shell = config_flags.build(cfg.ShellConfig, "shell_", base=def0.shell, skip=("delta", "p"),
                               delta=_shared("delta", def0.shell.delta), p=_shared("p", def0.shell.p))
    attack = config_flags.build(cfg.BaseAttackConfig, "base_attack_", base=def0.attack)
    epsilon = FLAGS.epsilon
    mode = FLAGS.mode or ("defence" if FLAGS["shell"].present else "accuracy")
    given = [f"--{name}" for name in FLAGS if (name.startswith(("adaptive", "shell", "defence_", "base_attack_"))
                                                or name == "num_points") and FLAGS[name].present]
    if mode != "defence" and given:
        raise ValueError(f"{', '.join(sorted(given))} belong to the defence evaluation: give "
                         f"--shell=mcn|ncn|cw (or --mode=defence).")
    return cfg.EvaluationConfig(
        mode=mode,
        inputs=config_flags.build(cfg.InputConfig),
        run=config_flags.build(cfg.RunConfig),
        accuracy=config_flags.build(cfg.AccuracyConfig, skip=("epsilon",), epsilon=epsilon),
        separation=config_flags.build(cfg.SeparationConfig, "separation_", base=sep0, skip=("delta", "p"),
                                      delta=_shared("delta", sep0.delta), p=_shared("p", sep0.p)),
        defence=config_flags.build(cfg.DefenceConfig, "defence_", base=def0, skip=("epsilon",),
                                   epsilon=epsilon, shell=shell, attack=attack),
        adaptive=config_flags.build(cfg.AdaptiveConfig, "adaptive_"),
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from manifold_tf import distributed, evaluation

    try:
        # TF_CONFIG first: MultiWorkerMirroredStrategy must exist before any other TensorFlow op.
        workers = distributed.from_env(heartbeat_seconds=FLAGS.heartbeat_seconds)
        config = config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        text = evaluation.evaluate(config, workers)
    except distributed.WORKER_LOST as e:
        sys.stderr.write(f"evaluate: error: a worker was lost ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}). Every finished batch is kept in the run "
                         f"directory: start the workers again with --resume to run only the rest.\n")
        sys.exit(1)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Expected failures (bad input, missing or corrupt files, a clobber refused): the message
        # names the problem; a traceback would bury it.
        sys.stderr.write(f"evaluate: error: {e}\n")
        sys.exit(1)
    print(text, flush=True)


def run():
    """Console-script entry point (``manifold-tf-evaluate``)."""
    config_flags.show_in_help(__name__)
    app.run(main)


if __name__ == "__main__":
    run()
