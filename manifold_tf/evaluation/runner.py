"""One call per mode: resolve the inputs, open the run store, run the protocol, return the report
text."""

from __future__ import annotations

import dataclasses
import functools
import os

import tensorflow as tf
from absl import logging

from manifold_tf import checkpoints
from manifold_tf.distributed import SINGLE, Workers
from manifold_tf.evaluation import (
    adaptive,
    adaptive_report,
    compare,
    compare_report,
    defence,
    defence_report,
    estimate,
    separation,
    walk,
)
from manifold_tf.evaluation import inputs as inputs_lib
from manifold_tf.evaluation.accuracy import run_accuracy
from manifold_tf.evaluation.config import P_AUTO, EvaluationConfig
from manifold_tf.evaluation.context import RunContext, defence_metadata
from manifold_tf.evaluation.store import RunStore
from manifold_tf.shells import calibrate


def _store(config: EvaluationConfig, mode: str, workers: Workers = SINGLE) -> RunStore:
    out = config.run.output_dir or os.path.join("results", mode)
    return RunStore(out, resume=config.run.resume, overwrite=config.run.overwrite, workers=workers)


def evaluate(config: EvaluationConfig, workers: Workers = SINGLE) -> str:
    """Runs ``config.mode`` and returns the Markdown the command prints (reports are on disk).

    ``workers`` (:func:`manifold_tf.distributed.from_env`) spreads the defence evaluation's batches
    over several processes; the other modes run on one.
    """
    if workers.distributed and config.mode != "defence":
        raise ValueError(
            f"mode {config.mode!r} runs in one process; TF_CONFIG describes "
            f"{workers.count} workers (only --mode=defence and train.py use them)."
        )
    if config.mode == "defence":
        return _defence(config, workers)
    return {"accuracy": _accuracy, "separation": _separation}[config.mode](config)


def _accuracy(config: EvaluationConfig) -> str:
    store = _store(config, "accuracy")
    inputs = inputs_lib.resolve(config.inputs, run_dir=store.directory)
    model = inputs_lib.load_model(inputs, width=config.inputs.width, seed=config.run.seed)
    x, y = inputs.load_test()
    _, text = run_accuracy(
        model,
        x,
        y,
        config.accuracy,
        store,
        epsilon=config.threat.epsilon,
        seed=config.run.seed,
        metadata=dict(
            checkpoint=inputs.checkpoint, dataset=inputs.dataset, data_dir=inputs.data_dir
        ),
    )
    return f"{text}\nreports written to {store.directory}"


def _separation(config: EvaluationConfig) -> str:
    """Table 1: counts at p per batch, the s_p curve, Chebyshev and Clopper-Pearson bounds."""
    cfg, threat = config.separation, config.threat
    if threat.p == P_AUTO:
        raise ValueError(
            "--p=auto chooses NCN's p from held-out confidences (--shell=ncn); the "
            "separation test needs a number: give --p=0.9 (or another level)."
        )
    store = _store(config, "separation")
    inputs = inputs_lib.resolve(config.inputs, run_dir=store.directory)
    models = [(inputs.checkpoint, inputs_lib.load_model(inputs, width=config.inputs.width))]
    if cfg.compare_checkpoint:
        models.append(
            (
                cfg.compare_checkpoint,
                checkpoints.load_model_weights(cfg.compare_checkpoint, width=config.inputs.width),
            )
        )
    x, y = inputs.load_test()
    runs, names, convergence = {}, [], {}
    for i, (ckpt, model) in enumerate(models):
        name = os.path.basename(os.path.normpath(ckpt))
        name = name.replace(".keras", "").replace(".weights.h5", "")
        name = name if name not in names else f"{name}_{i}"
        names.append(name)
        run = separation.run_separation(
            model,
            x,
            y,
            cfg,
            delta=threat.delta,
            p=threat.p,
            seed=config.run.seed,
            store=store,
            name=name,
            model_name=inputs_lib.model_identity(ckpt),
        )
        runs[name] = (ckpt, run)
        if cfg.convergence_batches and cfg.convergence_steps:
            convergence[name] = separation.convergence_check(
                model, x, y, run, cfg, p=threat.p, store=store, name=name
            )
    report = separation.separation_report(
        runs, p=threat.p, dataset=inputs.dataset, data_dir=inputs.data_dir, convergence=convergence
    )
    text = separation.separation_markdown(report)
    store.write_report("separation", report, text)
    separation.plot_separation(report, store.path("separation.png"))
    return f"{text}\nreports written to {store.directory}"


def _shell_p(config: EvaluationConfig, base, x, num_points: int):
    """``(p, record)``: the threat model's p, or for ``--p=auto`` the ``--p_quantile`` quantile
    of the base's top-label confidence on the test points after the evaluated ones in the walk
    order (:func:`manifold_tf.shells.calibrate.resolve_p`; ``record`` says how, else None)."""
    if config.threat.p != P_AUTO:
        return config.threat.p, None
    cfg = config.defence
    order = walk.walk_order(len(x), seed=config.run.seed, kind=cfg.permutation)
    p, record = calibrate.resolve_p(
        base,
        x,
        order,
        num_points=num_points,
        quantile=cfg.shell.p_quantile,
        count=cfg.shell.p_calibration_points,
    )
    logging.info(
        "p=auto: p = %.4f, the %.2f quantile of the base's top-label confidence on %s",
        p,
        record["quantile"],
        record["source"],
    )
    return p, record


def _strategy(config: EvaluationConfig, workers: Workers):
    """The distribution strategy the defence evaluation builds its models under."""
    cfg = config.defence
    if workers.distributed and cfg.strategy == "mirrored":
        raise ValueError(
            "--defence_strategy=mirrored spreads one process's batches over its "
            "devices; with TF_CONFIG the workers split the batches instead: run one "
            "worker per device (BUILD.md)."
        )
    return (
        tf.distribute.MirroredStrategy()
        if cfg.strategy == "mirrored"
        else tf.distribute.get_strategy()
    )


def _defence(config: EvaluationConfig, workers: Workers = SINGLE) -> str:
    """The adaptive verdict, then Table 2 (CW on the base, the shell on x and x') on the points
    the verdict evaluated; the verdict prints first."""
    cfg = config.defence
    if len(cfg.shell.kinds) > 1:
        return _comparison(config, workers)
    store = _store(config, "defence", workers)
    inputs = inputs_lib.resolve(config.inputs, run_dir=store.directory)
    if (
        config.run.overwrite
        and inputs.train_quick_model
        and os.path.exists(inputs.checkpoint)
        and workers.is_chief
    ):
        os.remove(inputs.checkpoint)
    logging.info(
        "defence evaluation on %s (%s): %s", inputs.dataset, inputs.note, inputs.checkpoint
    )
    strategy = _strategy(config, workers)

    def load():
        with strategy.scope():
            return inputs_lib.load_model(inputs, width=config.inputs.width, seed=config.run.seed)

    # The chief first: it may train and cache the quick synthetic model the others then load.
    base = workers.chief_first(load, "model")
    x, y = inputs.load_test()
    num_points = min(config.adaptive.num_points, len(x))
    p, p_auto = _shell_p(config, base, x, num_points)
    with strategy.scope():
        shell = cfg.shell.build(base, config.threat, seed=config.run.seed, p=p)
    replicas = f"{cfg.strategy} ({strategy.num_replicas_in_sync} replicas)"
    metadata = defence_metadata(inputs, replicas, p_auto)
    context = RunContext.for_defence(
        cfg, store, epsilon=config.threat.epsilon, seed=config.run.seed, metadata=metadata
    )
    walk = num_points if cfg.points == "walked" else None
    phases_for = functools.partial(_phases, config, shell, walk)
    seconds_per_point = _plan(config, base, shell.image_shape, phases_for, num_points, workers)
    result, report = _verdict_and_table2(
        base, shell, x, y, config, context, walk, seconds_per_point, inputs.class_names
    )
    if not workers.is_chief:
        return (
            f"{workers.describe()}: its batches are in {store.directory}; the chief (worker 0) "
            f"writes the reports."
        )
    table2_text = defence_report.defence_markdown(report)
    if config.adaptive.attack == "none":
        return f"{table2_text}\nreports written to {store.directory}"
    verdict = adaptive_report.adaptive_markdown(result)
    return (
        f"{verdict}\n{table2_text}\nThe verdict is the adaptive evaluation above; Table 2 is the "
        f"paper's transfer protocol.\nreports written to {store.directory} (summary.json, "
        f"adaptive.md, defence.md, PNG figures)"
    )


def _phases(config: EvaluationConfig, shell, walk, n: int) -> dict:
    """The plan's phases (:func:`~manifold_tf.evaluation.estimate.defence_passes`) of one shell
    with the verdict on ``n`` points."""
    cfg = config.defence
    return estimate.defence_passes(
        table2_points=n if walk else cfg.batches * cfg.batch_points,
        num_points=n,
        shell=shell,
        per_prediction=shell.passes_per_prediction(),
        cw=cfg.attack.cw_settings,
        suite=config.adaptive,
    )


def _plan(config: EvaluationConfig, base, image_shape, phases_for, num_points: int, workers):
    """Logs the plan (``phases_for(n)``: each phase's passes, and its expected time, under the
    verdict's budget); returns the verdict's expected seconds per point, which sizes its first
    batch (None: no verdict)."""
    suite = config.adaptive
    rate = estimate.passes_per_second(base, image_shape)
    budget = suite.budget_seconds if suite.attack != "none" and not workers.distributed else None
    phases, note = estimate.under_budget(
        phases_for,
        budget_s=budget,
        rate=rate,
        num_points=num_points,
        batch_points=config.defence.batch_points,
    )
    logging.info("%s%s", estimate.describe(phases, rate), f"\n{note}" if note else "")
    if suite.attack == "none":
        return None
    return estimate.verdict_seconds_per_point(
        phases_for(num_points), rate, num_points, expected=True
    )


def _verdict_and_table2(
    base,
    shell,
    x,
    y,
    config: EvaluationConfig,
    context: RunContext,
    walk,
    seconds_per_point,
    class_names,
) -> tuple[dict | None, dict | None]:
    """``(verdict report, Table 2 report)`` (None: not run, or on a worker other than the chief).

    The verdict first (one process): with a budget or the sequential rule, Table 2 then runs on
    the points the verdict reached, reusing its CW x' (the same attack, points, labels).
    """
    suite, store = config.adaptive, context.store
    workers = store.workers
    known_cw = {}
    sequential = suite.attack != "none" and (suite.until == "decided" or suite.budget is not None)
    table2_first = workers.distributed and not sequential
    if table2_first:
        # Several workers split Table 2's batches, then the verdict's: Table 2 first, so that no
        # worker waits at a barrier while the chief alone runs the sanity checks and writes the
        # verdict. (With a stopping rule Table 2 follows the verdict, on the points it reached.)
        table2 = defence.run_table2(
            base, shell, x, y, config.defence, context, walk=walk, known_cw=known_cw
        )
    result = None
    if suite.attack != "none":
        run = adaptive.run_adaptive(
            base,
            shell,
            x,
            y,
            dataclasses.replace(suite, num_points=min(suite.num_points, len(x))),
            context,
            seconds_per_point=seconds_per_point,
        )
        if run is not None:  # the chief writes the reports
            result = adaptive_report.write_adaptive_report(
                run, x, store.alone(), class_names=class_names
            )
        if walk is not None and not table2_first:  # the chief tells every worker how far
            reached = sum(len(r["indices"]) for r in run.records) if run is not None else 0
            walk = int(workers.all_sum([reached], "points reached")[0])
        known_cw = adaptive.transfer_points(store)
    if not table2_first:
        table2 = defence.run_table2(
            base, shell, x, y, config.defence, context, walk=walk, known_cw=known_cw
        )
    report = None
    if table2 is not None:  # the chief writes the reports
        report = defence_report.write_defence_report(
            table2.records, table2.settings, x, store.alone(), class_names=class_names
        )
    return result, report


def _comparison_plan(config: EvaluationConfig, shells: dict, walk, n: int) -> dict:
    """The plan's phases for a comparison: CW and the base's suite once, each shell's own."""
    out = {}
    for kind, shell in shells.items():
        for name, passes in _phases(config, shell, walk, n).items():
            own = "on the shell" in name or name.startswith(
                ("Table 2: the shell", "adaptive: sanity")
            )
            out[f"{kind}: {name}" if own else name] = passes
    return out


def _comparison(config: EvaluationConfig, workers: Workers = SINGLE) -> str:
    """Several shells (``--shell=mcn,ncn,...``) on the same points: the verdict with the base's
    suite once per batch (:mod:`~manifold_tf.evaluation.compare`), each defence's reports in its
    folder, Table 2 per defence (CW's x' computed once), then the comparison report."""
    if workers.distributed:
        raise ValueError(
            f"--shell={config.defence.shell.kind} compares defences in one process: drop "
            f"TF_CONFIG (or evaluate one shell per run)."
        )
    cfg, suite = config.defence, config.adaptive
    if cfg.strategy == "mirrored":
        raise ValueError("--defence_strategy=mirrored evaluates one shell: give one --shell.")
    store = _store(config, "defence")
    inputs = inputs_lib.resolve(config.inputs, run_dir=store.directory)
    if config.run.overwrite and inputs.train_quick_model and os.path.exists(inputs.checkpoint):
        os.remove(inputs.checkpoint)
    base = inputs_lib.load_model(inputs, width=config.inputs.width, seed=config.run.seed)
    x, y = inputs.load_test()
    num_points = min(suite.num_points, len(x))
    p, p_auto = _shell_p(config, base, x, num_points)
    kinds = compare.check_kinds(cfg.shell.kinds)
    shells = {
        k: cfg.shell.for_kind(k).build(base, config.threat, seed=config.run.seed, p=p)
        for k in kinds
    }
    logging.info(
        "comparing %s on %s (%s): %s", kinds, inputs.dataset, inputs.note, inputs.checkpoint
    )
    metadata = defence_metadata(inputs, f"{cfg.strategy} (1 replicas)", p_auto)
    context = RunContext.for_defence(
        cfg, store, epsilon=config.threat.epsilon, seed=config.run.seed, metadata=metadata
    )
    walk = num_points if cfg.points == "walked" else None
    shape = next(iter(shells.values())).image_shape
    phases_for = functools.partial(_comparison_plan, config, shells, walk)
    seconds_per_point = _plan(config, base, shape, phases_for, num_points, workers)
    comparison = None
    if suite.attack != "none":
        comparison = compare.run_comparison(
            base,
            shells,
            x,
            y,
            dataclasses.replace(suite, num_points=num_points),
            context,
            seconds_per_point=seconds_per_point,
        )
        if walk is not None:
            walk = sum(len(r["indices"]) for r in comparison.base_records)
    table2 = _comparison_table2(base, shells, x, y, config, context, walk, inputs.class_names)
    if comparison is None:
        text = "\n".join(defence_report.defence_markdown(table2[k]) for k in kinds)
        return f"{text}\nreports written to {store.directory} (<kind>/defence.md)"
    report = compare_report.write_comparison(
        comparison, x, store, class_names=inputs.class_names, table2=table2
    )
    return (
        f"{compare_report.comparison_markdown(report)}\nreports written to {store.directory} "
        f"(comparison.json, comparison.md, comparison.png; per defence <kind>/summary.json, "
        f"adaptive.md, defence.md)"
    )


def _comparison_table2(
    base, shells: dict, x, y, config: EvaluationConfig, context: RunContext, walk, class_names
) -> dict:
    """Table 2 per defence, in its folder, on the ``walk`` points the verdict reached; kind ->
    its report (the first defence's x', CW's and the probe's, reused by the others)."""
    cfg, store, kinds, table2 = config.defence, context.store, list(shells), {}
    for i, k in enumerate(kinds):
        sub = store.sub(k)
        attack = cfg.attack
        if i and not attack.from_run:  # the first defence's x' (CW's and the probe's), reused
            attack = dataclasses.replace(attack, from_run=store.sub(kinds[0]).directory)
        run = defence.run_table2(
            base,
            shells[k],
            x,
            y,
            dataclasses.replace(cfg, shell=cfg.shell.for_kind(k), attack=attack),
            context.on(sub),
            walk=walk,
            known_cw=adaptive.transfer_points(sub),
        )
        table2[k] = defence_report.write_defence_report(
            run.records, run.settings, x, sub, class_names=class_names
        )
    return table2
