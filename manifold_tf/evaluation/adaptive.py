"""The adaptive evaluation: attacks on the shell itself, on the points of a finished Table-2 run.

The paper only transfers attacks from the base model to the shell. Here the shell G is attacked
directly (:func:`manifold_tf.attacks.bpda`: BPDA with the identity approximation), starting from
the transferred ``x'``, and the base model alone is attacked with the same budget for comparison.
"""

from __future__ import annotations

import json
import time

import numpy as np

from manifold_tf import reporting
from manifold_tf.evaluation import defence
from manifold_tf.evaluation.config import AdaptiveConfig
from manifold_tf.evaluation.inputs import predict_logits

PROTOCOL = "adaptive"


def run_adaptive(base, shell, images: np.ndarray, config: AdaptiveConfig, store, *,
                 class_names=None, max_figure_cases: int = 12) -> dict:
    """Attacks the shell itself (BPDA, :func:`manifold_tf.attacks.bpda`) on the points of a finished Table-2 run.

    Reads the batch records and ``x'`` of :func:`defence.run_defence` from ``store``. For every point the
    shell still gets right at ``x`` and at the transferred ``x'`` (``G(x) = G(x') = y``), BPDA runs
    from that ``x'`` (the base's CW example, or ``x`` where CW failed) within the same ``epsilon``;
    the other points already count as failures. The shell's robust accuracy is then the share of
    points with ``G(x) = y`` that neither attack broke. A lower bound on the shell's
    vulnerability, like every attack.

    Writes ``adaptive/batch_XXX.json`` and ``batch_XXX_xadv.npy`` per batch (a resumed run skips
    finished batches; settings checked) and ``adaptive.json``, ``adaptive.md`` and
    ``adaptive_failures.png``.
    """
    from manifold_tf import attacks

    epsilon, steps, step_size = None, config.steps, config.step_size
    finished = store.finished(defence.PROTOCOL)
    records = [store.load(defence.PROTOCOL, b) for b in finished]
    table2 = store.settings(defence.PROTOCOL)
    if not records or table2 is None:
        raise ValueError(f"{store.directory} holds no finished Table-2 batches: run the defence "
                         f"evaluation there first (evaluate.py --shell=... --output_dir={store.directory}).")
    epsilon = table2["epsilon"]
    shell_settings = json.loads(json.dumps(reporting._to_jsonable(shell.settings())))
    if table2["shell"] != shell_settings:
        raise ValueError(f"the shell differs from the one of the Table-2 run in {store.directory}:\n"
                         f"  run:   {table2['shell']}\n  now:   {shell_settings}")
    settings = reporting._to_jsonable(dict(
        attack="BPDA (identity approximation of the search factor), untargeted, sign steps",
        epsilon=float(epsilon), steps=int(steps),
        step_size=float(step_size if step_size is not None else 2.5 * epsilon / max(int(steps), 1)),
        start="the base model's CW x' of the Table-2 run (x where CW failed)",
        shell=shell_settings))
    settings = store.bind(PROTOCOL, settings)
    results = []
    total = sum(len(r["labels"]) for r in records)
    progress = reporting.Progress(total, "adaptive", unit="points")
    for r in records:
        b = r["batch"]
        idx = np.asarray(r["indices"])
        x = images[idx]
        y = np.asarray(r["labels"])
        saved = store.load(PROTOCOL, b)
        if saved is not None:
            results.append(saved)
            progress.update(len(r["labels"]), extra=f"batch {b + 1}: already done")
            continue
        x_transfer = store.load_array(defence.PROTOCOL, b, "xadv")
        g_x, g_t = np.asarray(r["shell_clean"]), np.asarray(r["shell_adv"])
        todo = (g_x == y) & (g_t == y)
        x_out = x_transfer.copy()
        broken = np.zeros(len(y), bool)
        label = g_t.copy()
        steps_used = np.zeros(len(y), np.int64)
        t0 = time.perf_counter()
        if todo.any():
            out = attacks.bpda(shell, x[todo], y[todo], epsilon=epsilon, steps=steps,
                                step_size=step_size, x_init=x_transfer[todo])
            x_out[todo] = out["x_adv"]
            broken[todo] = out["success"]
            label[todo] = out["shell_label"]
            steps_used[todo] = out["steps_used"]
        seconds = time.perf_counter() - t0
        linf = np.abs(x_out - x).reshape(len(y), -1).max(-1)
        robust = (g_x == y) & (g_t == y) & ~broken
        result = dict(batch=b, indices=idx.tolist(), labels=y.tolist(),
                      shell_clean=g_x.tolist(), shell_transfer=g_t.tolist(), attacked=todo.tolist(),
                      adaptive_success=broken.tolist(), shell_adaptive=label.tolist(),
                      steps_used=steps_used.tolist(), linf=linf.tolist(), robust=robust.tolist(),
                      base_robust=_base_robust(base, x, y, r, epsilon=epsilon, steps=steps,
                                               step_size=settings["step_size"]),
                      seconds=seconds)
        store.save(PROTOCOL, b, result, arrays={"xadv": x_out.astype(np.float32)})
        results.append(result)
        progress.update(len(y), extra=(
            f"batch {b + 1}: BPDA broke {int(broken.sum())}/{int(todo.sum())} points the transfer "
            f"attack left intact; robust {int(robust.sum())}/{len(y)} ({seconds:.0f} s)"))
    return write_adaptive_report(results, settings, images, store, class_names=class_names,
                                 max_figure_cases=max_figure_cases)


def _base_robust(base, x: np.ndarray, y: np.ndarray, record: dict, *, epsilon: float, steps: int,
                 step_size: float) -> list:
    """The base model alone under an attack of the same strength, for comparison with the shell.

    Robust: CW of the Table-2 run failed and PGD with the CW margin loss (``steps`` steps of
    ``step_size`` from ``x``, the white-box counterpart of BPDA) leaves the prediction at ``y``.
    """
    from manifold_tf import attacks

    x_pgd = attacks.pgd(base, x, y, epsilon=epsilon, steps=steps, step_size=step_size, loss="cw",
                        random_start=False)
    pgd_ok = predict_logits(base, np.asarray(x_pgd)).argmax(-1) == y
    return (pgd_ok & ~np.asarray(record["base_success"], bool)).tolist()


def _adaptive_rates(results: list[dict]) -> dict:
    y = np.concatenate([r["labels"] for r in results])
    g_x = np.concatenate([r["shell_clean"] for r in results])
    g_t = np.concatenate([r["shell_transfer"] for r in results])
    attacked = np.concatenate([r["attacked"] for r in results]).astype(bool)
    broken = np.concatenate([r["adaptive_success"] for r in results]).astype(bool)
    robust = np.concatenate([r["robust"] for r in results]).astype(bool)
    base_robust = np.concatenate([r["base_robust"] for r in results]).astype(bool)
    n = len(y)
    return dict(points=n, retained=int(np.sum(g_x == y)), base_robust=int(base_robust.sum()),
                base_robust_accuracy=float(np.mean(base_robust)),
                robust_transfer=int(np.sum((g_x == y) & (g_t == y))),
                attacked=int(attacked.sum()), broken_by_bpda=int(broken.sum()),
                robust_adaptive=int(robust.sum()),
                robust_accuracy_transfer=float(np.mean((g_x == y) & (g_t == y))),
                robust_accuracy_adaptive=float(np.mean(robust)))


def adaptive_markdown(report: dict) -> str:
    """The adaptive-attack report as Markdown: settings, the table per batch and in total."""
    s, average = report["settings"], report["average"]
    rows = []
    for name, r in [(f"Batch #{i + 1}", r) for i, r in enumerate(report["per_batch"])] + [
            ("Total", average)]:
        n = r["points"]
        rows.append([name, n, f"{r['retained']}/{n}", f"{r['robust_transfer']}/{n}",
                     f"{r['broken_by_bpda']}/{r['attacked']}", f"{r['robust_adaptive']}/{n}",
                     f"{r['base_robust']}/{n}"])
    table = reporting.markdown_table(
        ["", "points", "G(x) = y", "shell robust to transfer (CW on F)", "broken by BPDA / attacked",
         "shell robust to both", f"base alone robust to CW + PGD-{s['steps']}"], rows)
    return (f"# Adaptive attack on the {s['shell']['shell'].upper()} shell\n\n"
            f"Attack: {s['attack']}; epsilon {s['epsilon']:g} px, {s['steps']} steps of "
            f"{s['step_size']:g} px, start: {s['start']}.\n\nShell: `{json.dumps(s['shell'])}`\n\n"
            f"{table}\nRobust accuracy of the shell: {100 * average['robust_accuracy_transfer']:.1f}% "
            f"against the transfer attack of Table 2, {100 * average['robust_accuracy_adaptive']:.1f}% "
            f"against transfer + BPDA (a lower bound on what an adaptive attacker achieves).\n"
            f"For comparison, the base model alone: {100 * average['base_robust_accuracy']:.1f}% "
            f"against CW and PGD with the same budget and steps (CW margin loss, from x).\n\n"
            f"Time: {report['seconds']:.0f} s.\n")


def write_adaptive_report(results: list[dict], settings: dict, images: np.ndarray, store, *,
                          class_names=None, max_figure_cases: int = 12) -> dict:
    """``adaptive.json``, ``adaptive.md`` and ``adaptive_failures.png`` from the batch results."""
    per_batch = [_adaptive_rates([r]) for r in results]
    average = _adaptive_rates(results)
    report = dict(settings=settings, per_batch=per_batch, average=average,
                  seconds=float(sum(r["seconds"] for r in results)))
    store.write_report("adaptive", report, adaptive_markdown(report))
    cases = []
    for r in results:
        hits = [k for k, ok in enumerate(r["adaptive_success"]) if ok]
        if not hits:
            continue
        x_adv = store.load_array(PROTOCOL, r["batch"], "xadv")
        for k in hits:
            cases.append(dict(index=r["indices"][k], x=images[r["indices"][k]], x_adv=x_adv[k],
                              label=r["labels"][k], shell_clean=r["shell_clean"][k],
                              shell_adv=r["shell_adaptive"][k]))
    reporting.plot_failure_cases(
        cases[:max_figure_cases], store.path("adaptive_failures.png"),
        class_names=class_names,
        title=(f"BPDA on the {report['settings']['shell']['shell'].upper()} shell: {len(cases)} "
               f"points broken (eps {report['settings']['epsilon']:g})"))
    return report
