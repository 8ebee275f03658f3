"""Evaluates a classifier: accuracy, the (p, q, delta)-separation test, or a model shell's defence.

  python evaluate.py --shell=mcn --delta=8                     # defence evaluation (Table 2)
  python evaluate.py --mode=separation --delta=8 --p=0.9       # separation test (Table 1)
  python evaluate.py --mode=accuracy --checkpoint=PATH         # clean and PGD-20 accuracy
  python evaluate.py --shell=cw --preset=paper                 # the paper's protocol (hours)
  python evaluate.py --shell=mcn --preset=full                 # AutoAttack-strength verdict
  TF_CONFIG='{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": 0}}' \
    python evaluate.py --shell=mcn --output_dir=/shared/run    # one of several workers (BUILD.md)

Flags are grouped by what they configure: the inputs, the run directory, the threat model, accuracy
mode, the separation test (--separation_*), Table 2's points (--defence_*), the base model's attack
(--base_attack_*), the shell (--shell, --shell_*) and the adaptive attack (--adaptive,
--adaptive_*). The threat model is one set of flags for every mode: --epsilon, the attacker's
budget, and --delta / --p, the shell's (and the separation test's) parameters. --preset picks a
complete set of settings (--help lists what each changes); explicit flags override it. Without
--checkpoint and --data_dir: CIFAR-10 from $MANIFOLD_TF_CIFAR10_DIR with the shipped model when
that folder exists, else synthetic data.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from manifold_tf import distributed, evaluation, interrupts
from manifold_tf.cli import flags as config_flags
from manifold_tf.cli.errors import usage_error
from manifold_tf.evaluation import config as cfg
from manifold_tf.evaluation import presets
from manifold_tf.evaluation.store import RunLocked

FLAGS = flags.FLAGS


def preset_help() -> str:
    """The --preset help text: every preset, what it is for and the flags it sets."""
    lines = ["Named settings, a complete set each; explicit flags override the preset's values."]
    for name, (description, changes) in presets.PRESETS.items():
        set_flags = config_flags.flags_of(cfg.EvaluationConfig, changes)
        lines.append(
            f"{name}: {description} "
            + (f"Sets {' '.join(set_flags)}." if set_flags else "Changes nothing.")
        )
    return "\n".join(lines)


def define_flags(flag_values=FLAGS) -> None:
    """Defines the evaluation's flags: --mode, --preset, --heartbeat_seconds and one per setting
    of :class:`~manifold_tf.evaluation.config.EvaluationConfig` (see :func:`config_flags.walk`)."""
    flags.DEFINE_enum(
        "mode",
        None,
        list(cfg.MODES),
        "What to evaluate (default: defence when --shell is given, else accuracy).",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "preset", "default", list(presets.PRESETS), preset_help(), flag_values=flag_values
    )
    flags.DEFINE_float(
        "heartbeat_seconds",
        None,
        "With TF_CONFIG (several workers): seconds "
        "between TensorFlow's checks that every worker is alive (default 30).",
        flag_values=flag_values,
    )
    config_flags.define_tree(cfg.EvaluationConfig, flag_values=flag_values)


define_flags()

# The sections only the defence evaluation reads: their flags in another mode are a mistake.
_DEFENCE_SECTIONS = ("defence", "adaptive")


def config_from_flags(flag_values=FLAGS) -> cfg.EvaluationConfig:
    """The :class:`EvaluationConfig` the parsed flags describe.

    Every setting: its flag if given explicitly, else the preset's value, else the default.
    Raises ValueError naming an unknown preset, a bad value, or defence flags in another mode.
    """
    changes = config_flags.given(cfg.EvaluationConfig, flag_values=flag_values)
    mode = flag_values.mode or ("defence" if flag_values["shell"].present else "accuracy")
    stray = [
        f"--{s.flag}"
        for s in config_flags.walk(cfg.EvaluationConfig)
        if s.path[0] in _DEFENCE_SECTIONS and flag_values[s.flag].present
    ]
    if mode != "defence" and stray:
        raise ValueError(
            f"{', '.join(sorted(stray))} belong to the defence evaluation: give "
            f"--shell=KIND (a registered shell kind, e.g. mcn) or --mode=defence."
        )
    return presets.from_preset(flag_values.preset, presets.merge(changes, dict(mode=mode)))


def main(argv):
    if len(argv) > 1:
        usage_error("evaluate", f"unexpected arguments: {argv[1:]} (flags are --name=value).")
    try:
        # TF_CONFIG first: MultiWorkerMirroredStrategy must exist before any other TensorFlow op.
        workers = distributed.from_env(heartbeat_seconds=FLAGS.heartbeat_seconds)
        config = config_from_flags()
    except ValueError as e:
        usage_error("evaluate", str(e))
    # The accuracy mode saves nothing until its report: a signal stops it at once.
    interrupts.install(safe_points=config.mode != "accuracy")
    output_dir = config.run.output_dir or os.path.join("results", config.mode)
    try:
        text = evaluation.evaluate(config, workers)
    except interrupts.Stopped as e:
        sys.stderr.write(interrupts.stopped_message(e, "evaluate", output_dir))
        sys.exit(e.exit_code)
    except distributed.WORKER_LOST as e:
        sys.stderr.write(
            f"evaluate: error: a worker was lost ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}). Every finished batch is kept in the "
            f"run directory: start the workers again with --resume to run only the "
            f"rest.\n"
        )
        sys.exit(1)
    except (ValueError, OSError, RunLocked) as e:
        # Expected failures (bad input, missing, corrupt or crafted files, a clobber refused, a
        # directory another run owns, a full disk): the message names the problem; a traceback
        # would bury it.
        sys.stderr.write(f"evaluate: error: {e}\n")
        sys.exit(1)
    print(text, flush=True)


def run():
    """Console-script entry point (``manifold-tf-evaluate``)."""
    config_flags.show_in_help(__name__)
    app.run(main)


if __name__ == "__main__":
    run()
