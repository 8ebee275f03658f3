"""Evaluates a classifier: accuracy, the (p, q, delta)-separation test, or a model shell's defence.

  python evaluate.py --shell=mcn --delta=8                     # defence evaluation (Table 2)
  python evaluate.py --mode=separation --delta=8 --p=0.9       # separation test (Table 1)
  python evaluate.py --mode=accuracy --checkpoint=PATH         # clean and PGD-20 accuracy

Without --data_dir the synthetic data set and the committed model trained on it are used; with
--data_dir (a cifar-10-batches-py folder) CIFAR-10 and weights/narrow_adv.keras.
"""

import os

from absl import app, flags

FLAGS = flags.FLAGS
# Common flags.
flags.DEFINE_enum("mode", None, ["accuracy", "separation", "defence"],
                  "What to evaluate (default: defence when --shell is given, else accuracy).")
flags.DEFINE_string("checkpoint", None, "TF1 checkpoint (prefix or dir), .keras or .weights.h5.")
flags.DEFINE_enum("width", None, ["narrow", "wide"], "Model width (default: detected).")
flags.DEFINE_enum("dataset", "auto", ["auto", "cifar10", "synthetic"],
                  "Data (auto: cifar10 when --data_dir is given, else synthetic).")
flags.DEFINE_string("data_dir", None, "cifar-10-batches-py folder.")
flags.DEFINE_string("output_dir", None, "Where reports go (default: results/<mode>).")
flags.DEFINE_integer("seed", 0, "Seed for point selection and attacks.")
flags.DEFINE_bool("overwrite", False, "Replace the reports in a non-empty --output_dir.")
flags.DEFINE_bool("resume", False, "Continue the run in --output_dir, skipping finished batches.")
flags.DEFINE_integer("batch_size", 128, "Images per attack batch (accuracy mode).")
flags.DEFINE_integer("num_examples", None, "Evaluate only the first N test images (accuracy mode).")
# Shared by the separation and defence modes.
flags.DEFINE_enum("shell", None, ["mcn", "ncn"], "Model shell to evaluate (implies --mode=defence).")
flags.DEFINE_float("delta", 8.0, "Shell / separation radius delta, pixels (0..255).")
flags.DEFINE_float("p", 0.9, "Confidence level p (separation test; NCN_p shell).")
# Accuracy mode.
flags.DEFINE_float("epsilon", 8.0, "Attack budget, pixels (0..255).")
flags.DEFINE_integer("pgd_steps", 20, "PGD steps.")
flags.DEFINE_float("pgd_step_size", 2.0, "PGD step size, pixels.")
flags.DEFINE_integer("restarts", 1, "PGD random restarts.")


def _load_model():
    from manifold_tf import checkpoints, evaluation

    dataset = evaluation.resolve_dataset(FLAGS.dataset, FLAGS.data_dir)
    path = FLAGS.checkpoint or evaluation.default_checkpoint(dataset)
    return checkpoints.load_model_weights(path, width=FLAGS.width), path, dataset


def _output_dir(mode: str) -> str:
    from manifold_tf import reporting

    out = FLAGS.output_dir or os.path.join("results", mode)
    return reporting.prepare_output_dir(out, overwrite=FLAGS.overwrite, resume=FLAGS.resume)


def _run_accuracy() -> None:
    from manifold_tf import data, evaluation, reporting

    model, path, dataset = _load_model()
    x, y = data.load_arrays(dataset, "test", FLAGS.data_dir)
    if FLAGS.num_examples:
        x, y = x[: FLAGS.num_examples], y[: FLAGS.num_examples]
    out = _output_dir("accuracy")
    report = evaluation.accuracy_report(
        model, x, y, epsilon=FLAGS.epsilon, pgd_steps=FLAGS.pgd_steps,
        pgd_step_size=FLAGS.pgd_step_size, restarts=FLAGS.restarts,
        batch_size=FLAGS.batch_size, seed=FLAGS.seed,
    )
    report.update(checkpoint=path, dataset=dataset, data_dir=FLAGS.data_dir)
    table = reporting.markdown_table(
        ["checkpoint", "images", "clean accuracy", f"PGD-{FLAGS.pgd_steps} accuracy (eps {FLAGS.epsilon:g})"],
        [[path, report["num_examples"], report["clean_accuracy"], report["pgd_accuracy"]]],
    )
    reporting.write_json(os.path.join(out, "accuracy.json"), report)
    reporting.write_text(os.path.join(out, "accuracy.md"), table)
    print(table)
    print(f"reports written to {out}")


def _run_separation() -> None:
    raise NotImplementedError("separation mode is being added")


def _run_defence() -> None:
    raise NotImplementedError("defence mode is being added")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    mode = FLAGS.mode or ("defence" if FLAGS.shell else "accuracy")
    {"accuracy": _run_accuracy, "separation": _run_separation, "defence": _run_defence}[mode]()


if __name__ == "__main__":
    app.run(main)
