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
# Separation mode.
flags.DEFINE_string("compare_checkpoint", None, "Separation: a second model, run on the same points.")
flags.DEFINE_integer("num_batches", 10, "Separation: batches of random test points (paper: 10).")
flags.DEFINE_integer("batch_points", 30, "Separation: points per batch (paper: 30).")
flags.DEFINE_integer("attack_steps", 20, "Separation: ascent steps per wrong label.")
flags.DEFINE_float("attack_step_size", None, "Separation: step, pixels (default 2.5*delta/steps).")
flags.DEFINE_enum("attack_optimizer", "sign", ["sign", "adam"], "Separation: ascent optimiser.")
flags.DEFINE_bool("attack_random_start", False, "Separation: start the ascent at a random point.")
# Defence mode (Table 2). Also uses --shell, --delta, --p, --epsilon (CW budget), --seed,
# --batch_points and --num_batches (default 5 in this mode unless given).
flags.DEFINE_enum("shell_optimizer", "pgd", ["pgd", "adam", "cw"], "Defence: MCN optimiser.")
flags.DEFINE_integer("shell_steps", 10, "Defence: optimiser steps K per label (MCN; NCN per round).")
flags.DEFINE_float("shell_step_size", None, "Defence: MCN step / Adam rate, px (default 2.5*delta/K).")
flags.DEFINE_bool("shell_random_start", False, "Defence: MCN ascent from a random point of the ball.")
flags.DEFINE_enum("cw_variant", "algorithm1", ["algorithm1", "paper_code"],
                  "Defence: --shell_optimizer=cw as Algorithm 1, or as the paper's code did.")
flags.DEFINE_float("shell_cw_const", 0.1, "Defence: CW shell constant (algorithm1).")
flags.DEFINE_integer("shell_cw_max_iterations", 100, "Defence: CW shell Adam steps per constant (paper: 1000).")
flags.DEFINE_float("ncn_delta_max", 16.0, "Defence: NCN search box radius, px.")
flags.DEFINE_integer("ncn_rounds", 3, "Defence: NCN penalty rounds (alpha values).")
flags.DEFINE_float("ncn_alpha", 1.0, "Defence: NCN first penalty weight.")
flags.DEFINE_float("ncn_alpha_factor", 10.0, "Defence: NCN penalty growth per round.")
flags.DEFINE_float("ncn_learning_rate", 0.05, "Defence: NCN Adam learning rate.")
flags.DEFINE_integer("cw_max_iterations", 100, "Defence: base CW attack Adam steps per constant (paper: 1000).")
flags.DEFINE_float("cw_learning_rate", 5e-3, "Defence: base CW attack Adam learning rate (paper: 5e-3).")
flags.DEFINE_float("cw_initial_const", 1e-5, "Defence: base CW attack first constant (paper: 1e-5).")
flags.DEFINE_float("cw_largest_const", 20.0, "Defence: base CW attack largest constant (paper: 20).")
flags.DEFINE_bool("cw_stop_within_epsilon", True,
                  "Defence: stop attacking a point once it has a success within epsilon (same success "
                  "set; the paper's code shrinks tau further).")
flags.DEFINE_integer("shell_batch_size", 30, "Defence: images per shell batch (global, all devices).")
flags.DEFINE_bool("jit_compile", None, "Defence: compile the shell with XLA (default: the shell's).")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored"],
                  "Defence: spread shell batches over devices (tf.distribute.MirroredStrategy).")
flags.DEFINE_string("attack_from", None,
                    "Defence: reuse the CW adversarial examples of an earlier run's --output_dir "
                    "(same model, data, points and attack; checked) to compare shells cheaply.")
flags.DEFINE_enum("adaptive", "none", ["none", "bpda"],
                  "Defence: after Table 2, attack the shell itself (BPDA from the CW x') on the "
                  "points both G(x) and G(x') got right; reports adaptive.{json,md,png}.")
flags.DEFINE_integer("adaptive_steps", 20, "Defence: BPDA steps (each one shell prediction).")
flags.DEFINE_float("adaptive_step_size", None, "Defence: BPDA step, px (default 2.5*epsilon/steps).")
flags.DEFINE_enum("permutation", "numpy", ["numpy", "paper"],
                  "Defence: order of test points (paper: Python random.sample, seed 123, reversed).")


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


def _model_identity(path: str) -> str:
    """A file's SHA-256 (so a resumed run accepts a copied or renamed model), else its path."""
    import hashlib

    if not os.path.isfile(path):
        return os.path.abspath(path)
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]


def _run_separation() -> None:
    """Table 1: counts at --p per batch, the s_p curve, Chebyshev and Clopper-Pearson bounds."""
    from manifold_tf import checkpoints, data, reporting, separation

    model, path, dataset = _load_model()
    models = [(path, model)]
    if FLAGS.compare_checkpoint:
        models.append((FLAGS.compare_checkpoint,
                       checkpoints.load_model_weights(FLAGS.compare_checkpoint, width=FLAGS.width)))
    x, y = data.load_arrays(dataset, "test", FLAGS.data_dir)
    out = _output_dir("separation")
    attack = dict(steps=FLAGS.attack_steps, optimizer=FLAGS.attack_optimizer,
                  random_start=FLAGS.attack_random_start)
    if FLAGS.attack_step_size is not None:
        attack["step_size"] = FLAGS.attack_step_size
    report = dict(dataset=dataset, data_dir=FLAGS.data_dir, models={},
                  paper_table1=separation.PAPER_TABLE1)
    names = []
    for i, (ckpt, m) in enumerate(models):
        name = os.path.basename(os.path.normpath(ckpt)).replace(".keras", "").replace(".weights.h5", "")
        name = name if name not in names else f"{name}_{i}"
        names.append(name)
        run = separation.run_separation(
            m, x, y, delta=FLAGS.delta, num_batches=FLAGS.num_batches,
            batch_points=FLAGS.batch_points, seed=FLAGS.seed, attack=attack, p=FLAGS.p,
            batch_dir=os.path.join(out, "batches", name), desc=f"separation {name}",
            model_name=_model_identity(ckpt))
        summary = separation.summarize(run["confidence"], p=FLAGS.p)
        report["settings"] = run["settings"]
        report["models"][name] = dict(
            checkpoint=ckpt, summary=summary, seconds=float(sum(run["seconds"])),
            clean_accuracy=float(sum(map(sum, run["clean_correct"]))) / summary["points"],
            confidence=run["confidence"], wrong_label=run["wrong_label"], indices=run["indices"])
    s0 = next(iter(report["models"].values()))["summary"]
    cheb = s0["chebyshev"]
    report["bound_note"] = (
        f"Chebyshev (paper, Appendix A): Pr[|mu_hat - mu| >= e] <= 1/(4 e^2 t); with t = "
        f"{s0['points']} and alpha = {cheb['alpha']:g}, e = sqrt(1/(4 (1 - alpha) t)) = "
        f"{cheb['epsilon']:.4f}, so q <= mu_hat + e (and q >= mu_hat - e) each with probability "
        f">= {cheb['alpha']:g}. "
        f"Clopper-Pearson: exact two-sided {s0['clopper_pearson']['level']:.0%} binomial interval.")
    reporting.write_json(os.path.join(out, "separation.json"), report)
    batch_rows = [[f"Batch #{b + 1}"] + [r["summary"]["per_batch"][b] for r in report["models"].values()]
                  for b in range(FLAGS.num_batches)]
    batch_rows.append(["Total"] + [f"{r['summary']['total']}/{r['summary']['points']}"
                                   for r in report["models"].values()])
    stats_rows = [[n, f"{r['summary']['total']}/{r['summary']['points']}",
                   r["summary"]["fraction"], r["summary"]["chebyshev"]["q_lower"],
                   r["summary"]["chebyshev"]["q_upper"],
                   "[{:.4f}, {:.4f}]".format(*r["summary"]["clopper_pearson"]["interval"]),
                   r["clean_accuracy"], f"{r['seconds']:.0f}"]
                  for n, r in report["models"].items()]
    text = (f"# Separation test: delta = {FLAGS.delta:g} px, p = {FLAGS.p:g}\n\n"
            f"Attack: {report['settings']['attack']}; seed {FLAGS.seed}; dataset {dataset}.\n\n"
            + reporting.markdown_table(["", *names], batch_rows) + "\n"
            + reporting.markdown_table(
                ["model", f"count at p={FLAGS.p:g}", "fraction", "q >= (Chebyshev)",
                 f"q <= (Chebyshev, alpha={cheb['alpha']:g})",
                 "Clopper-Pearson 95%", "clean accuracy (points)", "seconds"], stats_rows)
            + f"\n{report['bound_note']}\n\nPaper's Table 1 (wide models, delta 8, p 0.9): robust "
            f"26/300, natural 277/300.\n")
    reporting.write_text(os.path.join(out, "separation.md"), text)
    reporting.plot_separation_curve(
        {n: r["summary"]["curve"] for n, r in report["models"].items()},
        os.path.join(out, "separation.png"), p=FLAGS.p,
        reference=({"paper robust (wide)": 26 / 300, "paper natural (wide)": 277 / 300}
                   if (FLAGS.delta, FLAGS.p) == (8.0, 0.9) else None),
        title=f"s_p at delta={FLAGS.delta:g} px, {s0['points']} points (95% Clopper-Pearson bands)")
    print(text)
    print(f"reports written to {out}")


def _run_defence() -> None:
    """Table 2: CW L-inf on the base model, the shell on x and x', four categories, per batch.

    Without --checkpoint/--data_dir: the CIFAR-10 sample next to the repository with
    weights/narrow_adv.keras if both exist, else synthetic data (see evaluation.defence_inputs).
    """
    import tensorflow as tf

    from manifold_tf import checkpoints, data, evaluation, shells

    out = _output_dir("defence")
    inputs = evaluation.defence_inputs(FLAGS.dataset, FLAGS.data_dir, FLAGS.checkpoint, out)
    if FLAGS.overwrite and inputs["train_quick_model"] and os.path.exists(inputs["checkpoint"]):
        os.remove(inputs["checkpoint"])
    print(f"defence evaluation on {inputs['dataset']} ({inputs['note']}): {inputs['checkpoint']}",
          flush=True)
    strategy = tf.distribute.MirroredStrategy() if FLAGS.strategy == "mirrored" \
        else tf.distribute.get_strategy()
    with strategy.scope():
        if inputs["train_quick_model"]:
            base = evaluation.quick_synthetic_model(inputs["checkpoint"], seed=FLAGS.seed)
        else:
            base = checkpoints.load_model_weights(inputs["checkpoint"], width=FLAGS.width)
        common = {} if FLAGS.jit_compile is None else dict(jit_compile=FLAGS.jit_compile)
        if FLAGS.shell == "ncn":
            shell = shells.NCNShell(
                base, FLAGS.p, delta_max=FLAGS.ncn_delta_max, steps=FLAGS.shell_steps,
                rounds=FLAGS.ncn_rounds, alpha=FLAGS.ncn_alpha, alpha_factor=FLAGS.ncn_alpha_factor,
                learning_rate=FLAGS.ncn_learning_rate, **common)
        else:
            shell = shells.MCNShell(
                base, FLAGS.delta, optimizer=FLAGS.shell_optimizer, steps=FLAGS.shell_steps,
                step_size=FLAGS.shell_step_size, random_start=FLAGS.shell_random_start,
                seed=FLAGS.seed, cw_variant=FLAGS.cw_variant, cw_const=FLAGS.shell_cw_const,
                cw_max_iterations=FLAGS.shell_cw_max_iterations, **common)
    x, y = data.load_arrays(inputs["dataset"], "test", inputs["data_dir"])
    attack = dict(max_iterations=FLAGS.cw_max_iterations, learning_rate=FLAGS.cw_learning_rate,
                  initial_const=FLAGS.cw_initial_const, largest_const=FLAGS.cw_largest_const,
                  stop_within_epsilon=FLAGS.cw_stop_within_epsilon)
    num_batches = FLAGS.num_batches if FLAGS["num_batches"].present else 5
    metadata = dict(checkpoint=os.path.abspath(inputs["checkpoint"]), dataset=inputs["dataset"],
                    data_dir=inputs["data_dir"] and os.path.abspath(inputs["data_dir"]),
                    strategy=f"{FLAGS.strategy} ({strategy.num_replicas_in_sync} replicas)")
    report = evaluation.run_defence(
        base, shell, x, y, output_dir=out, epsilon=FLAGS.epsilon, num_batches=num_batches,
        batch_points=FLAGS.batch_points, seed=FLAGS.seed, permutation=FLAGS.permutation,
        attack=attack, shell_batch_size=FLAGS.shell_batch_size, resume=FLAGS.resume,
        metadata=metadata, attack_from=FLAGS.attack_from,
        class_names=data.CIFAR10_LABELS if inputs["dataset"] == "cifar10" else None)
    print(evaluation.defence_markdown(report))
    if FLAGS.adaptive == "bpda":
        adaptive = evaluation.run_adaptive(
            base, shell, x, output_dir=out, epsilon=FLAGS.epsilon, steps=FLAGS.adaptive_steps,
            step_size=FLAGS.adaptive_step_size, resume=FLAGS.resume,
            class_names=data.CIFAR10_LABELS if inputs["dataset"] == "cifar10" else None)
        print(evaluation.adaptive_markdown(adaptive))
    print(f"reports written to {out}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    mode = FLAGS.mode or ("defence" if FLAGS.shell else "accuracy")
    if mode != "defence" and (FLAGS.adaptive != "none" or FLAGS.attack_from):
        raise app.UsageError("--adaptive and --attack_from belong to the defence evaluation: "
                             "give --shell=mcn|ncn (or --mode=defence).")
    {"accuracy": _run_accuracy, "separation": _run_separation, "defence": _run_defence}[mode]()


if __name__ == "__main__":
    app.run(main)
