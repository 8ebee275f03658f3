"""Evaluation: clean and PGD accuracy, and the defence evaluation of the model shells (Table 2).

Defaults that make every command work on a fresh checkout: without ``--data_dir`` the synthetic
data set and the committed model trained on it (``weights/synthetic_narrow.keras``); with a CIFAR-10
``--data_dir`` the committed adversarially trained narrow model (``weights/narrow_adv.keras``).
"""

from __future__ import annotations

import os
import re
import time
import weakref

import numpy as np
import tensorflow as tf

from manifold_tf import reporting
from manifold_tf.validation import validate_images, validate_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS_DIR = os.path.join(ROOT, "weights")
DEFAULT_CHECKPOINTS = {
    "cifar10": os.path.join(WEIGHTS_DIR, "narrow_adv.keras"),
    "synthetic": os.path.join(WEIGHTS_DIR, "synthetic_narrow.keras"),
}


def resolve_dataset(dataset: str, data_dir: str | None) -> str:
    """``"auto"`` means CIFAR-10 when a ``data_dir`` is given, else the synthetic set."""
    if dataset == "auto":
        return "cifar10" if data_dir else "synthetic"
    return dataset


def default_checkpoint(dataset: str) -> str:
    """The committed model used when no ``--checkpoint`` is given."""
    path = DEFAULT_CHECKPOINTS[dataset]
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no --checkpoint given and the default model {path!r} is missing: pass "
            f"--checkpoint=PATH (a TF1 checkpoint, a .keras file or .weights.h5)."
        )
    return path


# One inference function per model, traced once per image shape: a new tf.function per call would
# retrace on every batch of an evaluation.
_PREDICT_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _predict_function(model):
    fn = _PREDICT_FUNCTIONS.get(model)
    if fn is None:
        fn = tf.function(lambda b: model(b, training=False), reduce_retracing=True)
        _PREDICT_FUNCTIONS[model] = fn
    return fn


def predict_logits(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, C]`` of ``model`` on ``x`` ``[N, 32, 32, 3]`` (pixels), in batches, inference mode."""
    fn = _predict_function(model)
    outs = [fn(tf.constant(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def accuracy(model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Clean accuracy in [0, 1]."""
    validate_images(x)
    validate_labels(y, num_examples=len(x), num_classes=int(model.output_shape[-1]))
    return float(np.mean(predict_logits(model, x, batch_size).argmax(-1) == y))


def accuracy_report(
    model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epsilon: float,
    pgd_steps: int,
    pgd_step_size: float,
    restarts: int = 1,
    batch_size: int = 128,
    seed: int = 0,
) -> dict:
    """Clean and PGD-k accuracy (untargeted, cross-entropy, random start) with progress and ETA."""
    from manifold_tf import attacks

    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    validate_images(x)
    validate_labels(y, num_examples=len(x), num_classes=int(model.output_shape[-1]))
    clean_correct = predict_logits(model, x, batch_size).argmax(-1) == y
    adv_correct = np.zeros(len(x), bool)
    progress = reporting.Progress(len(x), f"PGD-{pgd_steps}", unit="images")
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        x_adv = attacks.pgd(
            model, xb, yb, epsilon=epsilon, steps=pgd_steps, step_size=pgd_step_size,
            restarts=restarts, seed=seed + i,
        )
        adv_correct[i : i + len(xb)] = predict_logits(model, np.asarray(x_adv)).argmax(-1) == yb
        progress.update(len(xb))
    return {
        "num_examples": int(len(x)),
        "clean_accuracy": float(clean_correct.mean()),
        "pgd_accuracy": float((adv_correct & clean_correct).mean()),
        "settings": {
            "epsilon": epsilon, "pgd_steps": pgd_steps, "pgd_step_size": pgd_step_size,
            "restarts": restarts, "loss": "xent", "random_start": True, "seed": seed,
        },
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------------------------------
# Defence evaluation of a model shell (paper, Section 6 and Table 2)
#
# Protocol (METHOD.md, "Defence evaluation"): walk a seeded random permutation of the test set, keep
# the points the base model classifies correctly, cut them into batches; per point run CW L-inf
# (untargeted, against the base prediction, budget epsilon) on the base model -> x'; apply the shell
# to x and x'; sort every point into one of four categories. Each finished batch is written at once
# (JSON + the x' array), and the report is always assembled from those files, so a resumed run
# produces the same report as an uninterrupted one.

CATEGORIES = ("robust_kept", "vulnerable_fixed", "wrong_but_robust", "wrong_not_robust")
CATEGORY_TITLES = {
    "robust_kept": "base robust, shell correct and consistent",
    "vulnerable_fixed": "base vulnerable, shell correct and robust",
    "wrong_but_robust": "shell wrong but robust (G(x) = G(x') != y)",
    "wrong_not_robust": "shell wrong and not robust (G(x) != G(x'))",
}
# The paper's Table 2 (wide adv_trained model, full CIFAR-10 test set, CarliniWagnerShell); batch 4's
# printed shell rate "0.07%" is 2/30 = 6.67% (the 2 failures of the text are both in batch 4).
PAPER_TABLE2 = dict(
    points=150,
    base_attack_success=[0.30, 1 / 3, 0.40, 1 / 3, 0.4667],
    shell_attack_success=[0.0, 0.0, 0.0, 2 / 30, 0.0],
    retained_accuracy=[0.9667, 1.0, 1.0, 0.9933, 1.0],
    average=dict(base_attack_success=56 / 150, shell_attack_success=2 / 150,
                 retained_accuracy=147 / 150),
    categories=dict(robust_kept=94, vulnerable_fixed=53, wrong_but_robust=1, wrong_not_robust=2),
)
# CPU-cheap defaults for the base attack: the paper's CW schedule (CW_PAPER) except 100 Adam steps
# per constant instead of 1000, and stopping a point once it has a success within epsilon (the
# success set is the same; only the size of the final perturbation would shrink further).
DEFENCE_ATTACK_DEFAULTS = dict(max_iterations=100, stop_within_epsilon=True)
PERMUTATIONS = ("numpy", "paper")


def walk_order(num_test: int, *, seed: int, kind: str = "numpy") -> np.ndarray:
    """The order in which test points are walked.

    ``"numpy"``: ``np.random.default_rng(seed).permutation(num_test)``. ``"paper"``: the authors'
    order, Python ``random.seed(seed)`` (they used 123), ``random.sample(range(n), n)``, taken from
    the end.
    """
    if kind == "numpy":
        return np.random.default_rng(seed).permutation(num_test)
    if kind == "paper":
        import random

        rng = random.Random(seed)
        return np.asarray(rng.sample(range(num_test), num_test)[::-1])
    raise ValueError(f"permutation must be one of {PERMUTATIONS}; got {kind!r}.")


def select_correct_points(
    model, x: np.ndarray, y: np.ndarray, *, num_points: int, seed: int, permutation: str = "numpy",
    chunk: int = 256,
) -> np.ndarray:
    """The first ``num_points`` indices, in permutation order, that ``model`` classifies correctly.

    Predictions are computed chunk by chunk along the permutation, only as far as needed.
    Raises ``ValueError`` when the test set holds fewer correct points.
    """
    order = walk_order(len(x), seed=seed, kind=permutation)
    chosen: list[int] = []
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        pred = predict_logits(model, x[idx], batch_size=chunk).argmax(-1)
        chosen.extend(int(i) for i in idx[pred == y[idx]])
        if len(chosen) >= num_points:
            return np.asarray(chosen[:num_points])
    raise ValueError(
        f"the base model classifies only {len(chosen)} of the {len(x)} test points correctly; "
        f"{num_points} are needed (num_batches x batch_points): lower them."
    )


def categorize(base_success, shell_clean, shell_adv, labels) -> np.ndarray:
    """The category name of every point (see :data:`CATEGORY_TITLES`); all arguments ``[N]``.

    ``base_success``: the attack found a valid ``x'`` (``||x' - x||_inf <= eps``, base wrong);
    ``shell_clean``/``shell_adv``: the shell's labels ``G(x)`` and ``G(x')``.
    """
    base_success, shell_clean = np.asarray(base_success, bool), np.asarray(shell_clean)
    shell_adv, labels = np.asarray(shell_adv), np.asarray(labels)
    correct = (shell_clean == labels) & (shell_adv == labels)
    out = np.where(shell_clean == shell_adv, "wrong_but_robust", "wrong_not_robust").astype(object)
    out[correct & ~base_success] = "robust_kept"
    out[correct & base_success] = "vulnerable_fixed"
    return out.astype(str)


def batch_rates(record: dict) -> dict:
    """Table 2's three rates and the category counts of one batch record (or of several merged)."""
    y = np.asarray(record["labels"])
    g_x, g_adv = np.asarray(record["shell_clean"]), np.asarray(record["shell_adv"])
    n = len(y)
    shell_success = (g_adv != y) & (g_adv != g_x)  # the attack changed a prediction into an error
    counts = {c: int(np.sum(np.asarray(record["category"]) == c)) for c in CATEGORIES}
    return dict(
        points=n,
        base_attack_success=int(np.sum(record["base_success"])) / n,
        shell_attack_success=int(np.sum(shell_success)) / n,
        retained_accuracy=int(np.sum(g_x == y)) / n,
        shell_adversarial_accuracy=int(np.sum(g_adv == y)) / n,
        base_successes=int(np.sum(record["base_success"])),
        shell_successes=int(np.sum(shell_success)),
        retained=int(np.sum(g_x == y)),
        new_vulnerabilities=int(np.sum(~np.asarray(record["base_success"], bool) & (g_adv != g_x))),
        categories=counts,
    )


def _shell_labels(shell, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The shell's labels and top probabilities on ``x``, and for NCN which points met no label.

    Under a multi-device strategy the shell runs through ``predict`` (spread over the devices) and
    the NCN diagnostic is ``None``; otherwise ``embed`` runs batch by batch and keeps it.
    """
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool)
    # A shell built under a strategy's scope remembers it (Keras' trainer), unlike the global one.
    strategy = getattr(shell, "_distribute_strategy", None) or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1:
        probs = shell.predict(x, batch_size=batch_size, verbose=0)
        return probs.argmax(-1), probs.max(-1), None
    outs = [shell.embed(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    probs = np.concatenate([o["probabilities"].numpy() for o in outs])
    unmet = np.concatenate([o["unmet"].numpy() for o in outs]) if "unmet" in outs[0] else None
    return probs.argmax(-1), probs.max(-1), unmet


def defence_batch(base, shell, x: np.ndarray, y: np.ndarray, *, epsilon: float, attack: dict,
                  shell_batch_size: int, desc: str = "",
                  precomputed: tuple[np.ndarray, list] | None = None) -> tuple[dict, np.ndarray]:
    """Table 2 on one batch of base-correct points: ``(record, x_adv [N, 32, 32, 3])``.

    The shell is run on ``x`` and on ``x'`` where the attack succeeded; where it failed,
    ``x' = x`` and ``G(x') = G(x)`` is taken as is (the shells are deterministic per point; with a
    random start they are not, and ``x'`` is then run as well). ``precomputed``: ``(x_adv,
    attack_iterations)`` of the same attack on the same points (another shell's run), reused.
    """
    from manifold_tf import attacks

    t0 = time.perf_counter()
    if precomputed is None:
        cw = attacks.cw_linf_details(base, x, y, epsilon=epsilon, **attack)
        x_adv, iterations = np.asarray(cw["x_adv"]), np.asarray(cw["iterations"]).tolist()
        found = np.asarray(cw["success"], bool)
    else:
        x_adv, iterations = precomputed
        found = np.ones(len(x), bool)  # x' = x where that attack failed: caught below
    base_adv = predict_logits(base, x_adv).argmax(-1)
    linf = np.abs(x_adv - x).reshape(len(x), -1).max(-1)
    # Valid: within the budget (up to float rounding of the projection) and misclassified.
    success = found & (base_adv != y) & (linf <= epsilon + 1e-3)
    t1 = time.perf_counter()
    if desc:
        what = "reused x'" if precomputed is not None else f"CW attack done in {t1 - t0:.0f} s"
        print(f"{desc}: {what} ({int(success.sum())}/{len(x)} successes); "
              f"shell on {len(x)} + {int(success.sum())} images ...", flush=True)
    g_x, c_x, unmet_x = _shell_labels(shell, x, shell_batch_size)
    rerun = success | bool(getattr(shell, "random_start", False))
    g_adv, c_adv = g_x.copy(), c_x.copy()
    g_adv[rerun], c_adv[rerun], unmet_rerun = _shell_labels(shell, x_adv[rerun], shell_batch_size)
    diagnostics = {}
    if unmet_x is not None and unmet_rerun is not None:
        unmet_adv = unmet_x.copy()
        unmet_adv[rerun] = unmet_rerun
        diagnostics = dict(shell_clean_unmet=unmet_x.tolist(), shell_adv_unmet=unmet_adv.tolist())
    t2 = time.perf_counter()
    record = dict(
        labels=y.tolist(),
        base_success=success.tolist(),
        base_adv_pred=base_adv.tolist(),
        linf=linf.tolist(),
        attack_iterations=iterations,
        shell_clean=g_x.tolist(),
        shell_adv=g_adv.tolist(),
        shell_clean_confidence=c_x.tolist(),
        shell_adv_confidence=c_adv.tolist(),
        **diagnostics,
        category=categorize(success, g_x, g_adv, y).tolist(),
        seconds=dict(attack=t1 - t0, shell=t2 - t1),
    )
    return record, x_adv


def run_defence(
    base,
    shell,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    output_dir: str,
    epsilon: float = 8.0,
    num_batches: int = 5,
    batch_points: int = 30,
    seed: int = 0,
    permutation: str = "numpy",
    attack: dict | None = None,
    shell_batch_size: int = 30,
    resume: bool = False,
    metadata: dict | None = None,
    class_names=None,
    max_figure_cases: int = 12,
    attack_from: str | None = None,
) -> dict:
    """Runs (or resumes) the Table-2 protocol and writes its reports to ``output_dir``.

    Args:
      base: Keras model, images -> logits. shell: a shell wrapping it (``MCNShell``/``NCNShell``).
      images, labels: the test set, ``[M, 32, 32, 3]`` pixels, ``[M]`` ints.
      output_dir: an existing directory (see :func:`reporting.prepare_output_dir`). Receives
        ``batches/batch_XXX.json`` and ``batch_XXX_xadv.npy`` (written as each batch finishes),
        ``defence.json``, ``defence.md`` and ``failures.png``.
      epsilon: CW L-inf budget in pixels (a success needs ``||x' - x||_inf <= epsilon``).
      attack: keyword arguments of :func:`attacks.cw_linf_details` (default
        :data:`DEFENCE_ATTACK_DEFAULTS` over the paper's CW settings).
      resume: keep the batches already in ``output_dir`` (they must have the same settings);
        otherwise earlier batch files there are deleted first.
      metadata: recorded in the settings (checkpoint, dataset ...): a resumed run must match it.
      class_names: label names for the figure.
      attack_from: the output directory of an earlier run with the same base model, data, points,
        epsilon and attack settings (checked): its ``x'`` are reused instead of attacking again,
        so that two shells are compared on the same adversarial examples at the cost of the
        shells alone. Batches it lacks are attacked here.

    Returns:
      The report dict written to ``defence.json``.
    """
    attack = {**DEFENCE_ATTACK_DEFAULTS, **(attack or {})}
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).astype(np.int64)
    validate_images(images)
    num_points = int(num_batches) * int(batch_points)
    indices = select_correct_points(base, images, labels, num_points=num_points, seed=seed,
                                    permutation=permutation).reshape(num_batches, batch_points)
    settings = reporting._to_jsonable(dict(
        protocol="Table 2 (METHOD.md, Defence evaluation)",
        shell=shell.settings(), epsilon=float(epsilon),
        attack={k: v for k, v in attack.items() if k != "jit_compile"},  # speed only
        num_batches=int(num_batches), batch_points=int(batch_points), seed=int(seed),
        permutation=permutation, num_test_points=int(len(images)), **(metadata or {}),
    ))
    comparable = {k: v for k, v in settings.items() if k != "strategy"}
    batch_dir = os.path.join(output_dir, "batches")
    os.makedirs(batch_dir, exist_ok=True)
    if not resume:
        for name in os.listdir(batch_dir):
            if name.startswith("batch_"):
                os.remove(os.path.join(batch_dir, name))

    def path(b: int, suffix: str) -> str:
        return os.path.join(batch_dir, f"batch_{b:03d}{suffix}")

    records: list[dict | None] = [None] * num_batches
    for b in range(num_batches):
        if os.path.exists(path(b, ".json")):
            saved = reporting.read_json(path(b, ".json"))
            theirs = {k: v for k, v in saved["settings"].items() if k != "strategy"}
            if theirs != comparable or saved["indices"] != indices[b].tolist():
                raise ValueError(
                    f"{path(b, '.json')} comes from a run with other settings or points:\n"
                    f"  saved: {saved['settings']}\n  now:   {settings}\n"
                    f"Use another --output_dir, or --overwrite to start again."
                )
            records[b] = saved
    done = sum(r is not None for r in records)
    progress = reporting.Progress(num_points, "defence", unit="points", initial=done * batch_points)
    if done:
        print(f"resuming: {done}/{num_batches} batches already done in {batch_dir}", flush=True)
    for b in range(num_batches):
        if records[b] is not None:
            continue
        idx = indices[b]
        precomputed = _reusable_attack(attack_from, b, settings, idx) if attack_from else None
        print(f"batch {b + 1}/{num_batches}: "
              + (f"reusing x' from {attack_from}" if precomputed else
                 f"CW L-inf attack (eps {epsilon:g}) on {batch_points} points ..."), flush=True)
        record, x_adv = defence_batch(base, shell, images[idx], labels[idx], epsilon=epsilon,
                                      attack=attack, shell_batch_size=shell_batch_size,
                                      desc=f"batch {b + 1}/{num_batches}", precomputed=precomputed)
        record = dict(settings=settings, batch=b, indices=idx.tolist(), **record)
        # x' first, then the JSON that marks the batch as finished.
        reporting.write_array(path(b, "_xadv.npy"), x_adv.astype(np.float32))
        reporting.write_json(path(b, ".json"), record)
        records[b] = record
        r = batch_rates(record)
        progress.update(batch_points, extra=(
            f"batch {b + 1}/{num_batches}: base attack {r['base_successes']}/{batch_points}, "
            f"shell attack {r['shell_successes']}/{batch_points}, retained {r['retained']}/"
            f"{batch_points} (attack {record['seconds']['attack']:.0f} s, shell "
            f"{record['seconds']['shell']:.0f} s)"))
    return write_defence_report(records, images, output_dir, class_names=class_names,
                                max_figure_cases=max_figure_cases)


ATTACK_KEYS = ("epsilon", "attack", "checkpoint", "dataset", "data_dir", "num_test_points")


def _reusable_attack(run_dir: str, b: int, settings: dict, indices: np.ndarray):
    """``(x_adv, iterations)`` of batch ``b`` from another run, if it exists; checks it matches."""
    path = os.path.join(run_dir, "batches", f"batch_{b:03d}.json")
    if not os.path.exists(path):
        return None
    saved = reporting.read_json(path)
    theirs = {k: saved["settings"].get(k) for k in ATTACK_KEYS}
    mine = {k: settings.get(k) for k in ATTACK_KEYS}
    if theirs != mine or saved["indices"] != indices.tolist():
        raise ValueError(
            f"cannot reuse the attack of {path}: other points or attack settings.\n"
            f"  saved: {theirs}\n  now:   {mine}"
        )
    x_adv = np.load(os.path.join(run_dir, "batches", f"batch_{b:03d}_xadv.npy"))
    return x_adv, saved["attack_iterations"]


def summarize_defence(records: list[dict]) -> dict:
    """Per-batch and overall rates and counts (the overall rates are over all points)."""
    merged = {k: sum((list(r[k]) for r in records), []) for k in
              ("labels", "base_success", "shell_clean", "shell_adv", "category")}
    per_batch = [batch_rates(r) for r in records]
    summary = dict(per_batch=per_batch, average=batch_rates(merged))
    if all("shell_clean_unmet" in r for r in records):  # NCN: points where the fallback was used
        summary["ncn_unmet"] = dict(
            clean=int(sum(map(sum, (r["shell_clean_unmet"] for r in records)))),
            adversarial=int(sum(map(sum, (r["shell_adv_unmet"] for r in records)))),
            points=len(merged["labels"]))
    return summary


def _pct(rate: float, count: int, n: int) -> str:
    return f"{100 * rate:.2f}% ({count}/{n})"


def defence_markdown(report: dict) -> str:
    """The report as Markdown: settings, Table 2 per batch and on average, categories, the paper's."""
    import json
    s = report["settings"]
    rows = []
    for name, r in [(f"Batch #{i + 1}", r) for i, r in enumerate(report["per_batch"])] + [
        ("Average", report["average"])
    ]:
        n = r["points"]
        rows.append([name, n, _pct(r["base_attack_success"], r["base_successes"], n),
                     _pct(r["shell_attack_success"], r["shell_successes"], n),
                     _pct(r["retained_accuracy"], r["retained"], n),
                     *[r["categories"][c] for c in CATEGORIES]])
    table = reporting.markdown_table(
        ["", "points", "base attack success", "shell attack success", "shell retained accuracy",
         *CATEGORIES], rows)
    avg = report["average"]
    cats = "\n".join(f"- `{c}` ({CATEGORY_TITLES[c]}): {avg['categories'][c]}" for c in CATEGORIES)
    paper = PAPER_TABLE2
    unmet = report.get("ncn_unmet")
    unmet_text = (
        f"NCN fallback (no label met p, the most confident label answered): "
        f"{unmet['clean']}/{unmet['points']} points at x, {unmet['adversarial']}/{unmet['points']} "
        f"at x'.\n\n" if unmet else "")
    return (
        f"# Defence evaluation (Table 2 protocol): {s['shell']['shell'].upper()} shell\n\n"
        f"Points: {avg['points']} base-correct test points ({s['num_batches']} batches x "
        f"{s['batch_points']}), {s['permutation']} permutation, seed {s['seed']}, of "
        f"{s['num_test_points']} test images.\n\n"
        f"Settings:\n\n- shell: `{json.dumps(s['shell'])}`\n"
        f"- base attack: CW L-inf, untargeted, epsilon {s['epsilon']:g} px: "
        f"`{json.dumps(s['attack'])}`\n"
        + "".join(f"- {k}: `{v}`\n" for k, v in s.items()
                  if k not in ("shell", "attack", "epsilon", "protocol", "num_batches",
                               "batch_points", "seed", "permutation", "num_test_points"))
        + f"\n{table}\n"
        f"Shell attack success: `G(x') != y` and `G(x') != G(x)`. Retained accuracy: `G(x) = y`. "
        f"Base attack success: CW found `x'` with `||x' - x||_inf <= {s['epsilon']:g}` that the "
        f"base misclassifies.\n\nCategories:\n\n{cats}\n- base-robust points the shell made "
        f"inconsistent (new vulnerabilities): {avg['new_vulnerabilities']}\n\n{unmet_text}"
        f"Paper's Table 2 (wide adv_trained model, full CIFAR-10, CarliniWagnerShell, "
        f"{paper['points']} points): base attack success "
        f"{100 * paper['average']['base_attack_success']:.2f}%, shell attack success "
        f"{100 * paper['average']['shell_attack_success']:.2f}%, retained accuracy "
        f"{100 * paper['average']['retained_accuracy']:.0f}%; categories {paper['categories']}.\n\n"
        f"Time: attack {report['seconds']['attack']:.0f} s, shell {report['seconds']['shell']:.0f} s.\n"
    )


def write_defence_report(records: list[dict], images: np.ndarray, output_dir: str, *,
                         class_names=None, max_figure_cases: int = 12) -> dict:
    """Assembles ``defence.json``, ``defence.md`` and ``failures.png`` from the batch records."""
    summary = summarize_defence(records)
    report = dict(
        settings=records[0]["settings"],
        per_batch=summary["per_batch"],
        average=summary["average"],
        **({"ncn_unmet": summary["ncn_unmet"]} if "ncn_unmet" in summary else {}),
        paper_table2=PAPER_TABLE2,
        points=[
            dict(index=i, batch=r["batch"], label=r["labels"][k], category=r["category"][k],
                 base_success=r["base_success"][k], base_adv_pred=r["base_adv_pred"][k],
                 linf=r["linf"][k], shell_clean=r["shell_clean"][k], shell_adv=r["shell_adv"][k])
            for r in records for k, i in enumerate(r["indices"])
        ],
        seconds=dict(attack=sum(r["seconds"]["attack"] for r in records),
                     shell=sum(r["seconds"]["shell"] for r in records)),
    )
    reporting.write_json(os.path.join(output_dir, "defence.json"), report)
    reporting.write_text(os.path.join(output_dir, "defence.md"), defence_markdown(report))
    cases = []
    for r in records:
        bad = [k for k, c in enumerate(r["category"]) if c in ("wrong_but_robust", "wrong_not_robust")]
        if not bad:
            continue
        x_adv = np.load(os.path.join(output_dir, "batches", f"batch_{r['batch']:03d}_xadv.npy"))
        for k in bad:
            cases.append(dict(
                index=r["indices"][k], x=images[r["indices"][k]], x_adv=x_adv[k], label=r["labels"][k],
                shell_clean=r["shell_clean"][k], shell_adv=r["shell_adv"][k],
                shell_clean_confidence=r["shell_clean_confidence"][k],
                shell_adv_confidence=r["shell_adv_confidence"][k],
                base_adv=r["base_adv_pred"][k], category=r["category"][k]))
    s = report["settings"]
    reporting.plot_failure_cases(
        cases[:max_figure_cases], os.path.join(output_dir, "failures.png"), class_names=class_names,
        title=(f"{s['shell']['shell'].upper()} shell failures ({len(cases)} of "
               f"{report['average']['points']} points; CW eps {s['epsilon']:g})"))
    return report


def run_adaptive(
    base,
    shell,
    images: np.ndarray,
    *,
    output_dir: str,
    epsilon: float = 8.0,
    steps: int = 20,
    step_size: float | None = None,
    resume: bool = False,
    class_names=None,
    max_figure_cases: int = 12,
) -> dict:
    """Attacks the shell itself (BPDA, :func:`adaptive.bpda`) on the points of a finished Table-2 run.

    Reads the batch records and ``x'`` of :func:`run_defence` in ``output_dir``. For every point the
    shell still gets right at ``x`` and at the transferred ``x'`` (``G(x) = G(x') = y``), BPDA runs
    from that ``x'`` (the base's CW example, or ``x`` where CW failed) within the same ``epsilon``;
    the other points already count as failures. The shell's robust accuracy is then the share of
    points with ``G(x) = y`` that neither attack broke. A lower bound on the shell's
    vulnerability, like every attack.

    Writes ``batches/batch_XXX_adaptive.json`` and ``batch_XXX_adaptive_xadv.npy`` per batch (a
    resumed run skips batches whose file has the same settings) and ``adaptive.json``,
    ``adaptive.md`` and ``adaptive_failures.png``.
    """
    from manifold_tf import adaptive

    batch_dir = os.path.join(output_dir, "batches")
    names = sorted(n for n in os.listdir(batch_dir) if re.fullmatch(r"batch_\d{3}\.json", n))
    records = [reporting.read_json(os.path.join(batch_dir, n)) for n in names] if names else []
    if not records:
        raise ValueError(f"{output_dir} holds no finished Table-2 batches: run the defence "
                         f"evaluation there first (evaluate.py --shell=... --output_dir={output_dir}).")
    shell_settings = reporting._to_jsonable(shell.settings())
    for r in records:
        if r["settings"]["shell"] != shell_settings:
            raise ValueError(f"the shell differs from the one of the Table-2 run in {output_dir}:\n"
                             f"  run:   {r['settings']['shell']}\n  now:   {shell_settings}")
    settings = reporting._to_jsonable(dict(
        attack="BPDA (identity approximation of the search factor), untargeted, sign steps",
        epsilon=float(epsilon), steps=int(steps),
        step_size=float(step_size if step_size is not None else 2.5 * epsilon / max(int(steps), 1)),
        start="the base model's CW x' of the Table-2 run (x where CW failed)",
        shell=shell_settings))
    results = []
    total = sum(len(r["labels"]) for r in records)
    progress = reporting.Progress(total, "adaptive", unit="points")
    for r in records:
        b = r["batch"]
        path = os.path.join(batch_dir, f"batch_{b:03d}_adaptive.json")
        xpath = os.path.join(batch_dir, f"batch_{b:03d}_adaptive_xadv.npy")
        idx = np.asarray(r["indices"])
        x = images[idx]
        y = np.asarray(r["labels"])
        if resume and os.path.exists(path):
            saved = reporting.read_json(path)
            if saved["settings"] == settings:
                if "base_robust" not in saved:  # written before the base comparison existed
                    saved["base_robust"] = _base_robust(base, x, y, r, epsilon=epsilon,
                                                        steps=steps, step_size=settings["step_size"])
                    reporting.write_json(path, saved)
                results.append(saved)
                progress.update(len(r["labels"]), extra=f"batch {b + 1}: already done")
                continue
        x_transfer = np.load(os.path.join(batch_dir, f"batch_{b:03d}_xadv.npy"))
        g_x, g_t = np.asarray(r["shell_clean"]), np.asarray(r["shell_adv"])
        todo = (g_x == y) & (g_t == y)
        x_out = x_transfer.copy()
        broken = np.zeros(len(y), bool)
        label = g_t.copy()
        steps_used = np.zeros(len(y), np.int64)
        t0 = time.perf_counter()
        if todo.any():
            out = adaptive.bpda(shell, x[todo], y[todo], epsilon=epsilon, steps=steps,
                                step_size=step_size, x_init=x_transfer[todo])
            x_out[todo] = out["x_adv"]
            broken[todo] = out["success"]
            label[todo] = out["shell_label"]
            steps_used[todo] = out["steps_used"]
        seconds = time.perf_counter() - t0
        linf = np.abs(x_out - x).reshape(len(y), -1).max(-1)
        robust = (g_x == y) & (g_t == y) & ~broken
        result = dict(settings=settings, batch=b, indices=idx.tolist(), labels=y.tolist(),
                      shell_clean=g_x.tolist(), shell_transfer=g_t.tolist(), attacked=todo.tolist(),
                      adaptive_success=broken.tolist(), shell_adaptive=label.tolist(),
                      steps_used=steps_used.tolist(), linf=linf.tolist(), robust=robust.tolist(),
                      base_robust=_base_robust(base, x, y, r, epsilon=epsilon, steps=steps,
                                               step_size=settings["step_size"]),
                      seconds=seconds)
        reporting.write_array(xpath, x_out.astype(np.float32))
        reporting.write_json(path, result)
        results.append(result)
        progress.update(len(y), extra=(
            f"batch {b + 1}: BPDA broke {int(broken.sum())}/{int(todo.sum())} points the transfer "
            f"attack left intact; robust {int(robust.sum())}/{len(y)} ({seconds:.0f} s)"))
    return write_adaptive_report(results, images, output_dir, class_names=class_names,
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
    import json

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


def write_adaptive_report(results: list[dict], images: np.ndarray, output_dir: str, *,
                          class_names=None, max_figure_cases: int = 12) -> dict:
    """``adaptive.json``, ``adaptive.md`` and ``adaptive_failures.png`` from the batch results."""
    per_batch = [_adaptive_rates([r]) for r in results]
    average = _adaptive_rates(results)
    report = dict(settings=results[0]["settings"], per_batch=per_batch, average=average,
                  seconds=float(sum(r["seconds"] for r in results)))
    reporting.write_json(os.path.join(output_dir, "adaptive.json"), report)
    reporting.write_text(os.path.join(output_dir, "adaptive.md"), adaptive_markdown(report))
    cases = []
    for r in results:
        hits = [k for k, ok in enumerate(r["adaptive_success"]) if ok]
        if not hits:
            continue
        x_adv = np.load(os.path.join(output_dir, "batches", f"batch_{r['batch']:03d}_adaptive_xadv.npy"))
        for k in hits:
            cases.append(dict(index=r["indices"][k], x=images[r["indices"][k]], x_adv=x_adv[k],
                              label=r["labels"][k], shell_clean=r["shell_clean"][k],
                              shell_adv=r["shell_adaptive"][k]))
    reporting.plot_failure_cases(
        cases[:max_figure_cases], os.path.join(output_dir, "adaptive_failures.png"),
        class_names=class_names,
        title=(f"BPDA on the {report['settings']['shell']['shell'].upper()} shell: {len(cases)} "
               f"points broken (eps {report['settings']['epsilon']:g})"))
    return report


SAMPLE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-sample")
QUICK_MODEL = "quick_synthetic_model.keras"


def defence_inputs(dataset: str, data_dir: str | None, checkpoint: str | None,
                   output_dir: str) -> dict:
    """What the defence evaluation runs on: ``dataset``, ``data_dir``, ``checkpoint``, ``note``.

    Explicit flags win (``--dataset=auto`` then means CIFAR-10 when ``--data_dir`` is given). With
    neither ``--checkpoint`` nor ``--data_dir`` the embedded default is, in order:
      1. the CIFAR-10 sample at ``../shared/data/cifar10-sample`` (next to the repository) with the
         committed ``weights/narrow_adv.keras``, when both exist;
      2. the synthetic data set with the committed ``weights/synthetic_narrow.keras``;
      3. the synthetic data set with a narrow model trained here for a few hundred steps
         (:func:`quick_synthetic_model`, about a minute), saved in ``output_dir`` so that
         ``--resume`` reuses the same model.
    So the command works on a fresh checkout with nothing else present.
    """
    quick = os.path.join(output_dir, QUICK_MODEL)
    if checkpoint or data_dir or dataset != "auto":
        dataset = resolve_dataset(dataset, data_dir)
        if checkpoint:
            path, note = checkpoint, "as given"
        elif os.path.exists(DEFAULT_CHECKPOINTS[dataset]) or dataset == "cifar10":
            path, note = default_checkpoint(dataset), "default model"  # raises if missing
        else:
            path, note = quick, "quickly trained model"
        return dict(dataset=dataset, data_dir=data_dir, checkpoint=path,
                    train_quick_model=path == quick, note=note)
    sample = os.path.isfile(os.path.join(SAMPLE_DIR, "cifar-10-batches-py", "test_batch"))
    if sample and os.path.exists(DEFAULT_CHECKPOINTS["cifar10"]):
        return dict(dataset="cifar10", data_dir=SAMPLE_DIR, checkpoint=DEFAULT_CHECKPOINTS["cifar10"],
                    train_quick_model=False, note="embedded default: CIFAR-10 sample + narrow_adv.keras")
    if os.path.exists(DEFAULT_CHECKPOINTS["synthetic"]):
        return dict(dataset="synthetic", data_dir=None, checkpoint=DEFAULT_CHECKPOINTS["synthetic"],
                    train_quick_model=False, note="embedded default: synthetic data + committed model")
    return dict(dataset="synthetic", data_dir=None, checkpoint=quick, train_quick_model=True,
                note="embedded default: synthetic data + a quickly trained narrow model")


def quick_synthetic_model(path: str, *, steps: int = 300, batch_size: int = 32, seed: int = 0):
    """A narrow Madry ResNet trained naturally on the synthetic set for ``steps`` steps, cached at ``path``.

    The synthetic classes are far apart, so a few hundred SGD steps reach near-perfect test
    accuracy. An existing ``path`` is loaded instead (a resumed run must use the same model).
    """
    import keras

    from manifold_tf import data, models

    if os.path.exists(path):
        return keras.saving.load_model(path)
    keras.utils.set_random_seed(seed)
    x, y = data.synthetic_arrays("train", seed=0)
    model = models.madry_resnet("narrow")
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = data.make_dataset(x, y, batch_size=batch_size, training=True, seed=seed)
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    tmp = path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)
    return model
