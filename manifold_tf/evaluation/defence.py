"""Defence evaluation of a model shell (paper, Section 6 and Table 2).

Protocol (METHOD.md, "Defence evaluation"): walk a seeded random permutation of the test set, keep
the points the base model classifies correctly, cut them into batches; per point run CW L-inf
(untargeted, against the base prediction, budget epsilon) on the base model -> x'; apply the shell
to x and x'; sort every point into one of four categories. Each finished batch is written at once
to the run store (JSON + the x' array), and the report is always assembled from those records, so a
resumed run produces the same report as an uninterrupted one.

This module runs the protocol and returns its records (:func:`run_table2`);
:mod:`~manifold_tf.evaluation.defence_report` renders them (``defence.json``, ``defence.md``,
``failures.png``), called by :mod:`~manifold_tf.evaluation.runner`.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from absl import logging

from manifold_tf import attacks, reporting
from manifold_tf.evaluation.config import DefenceConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.inputs import predict_logits
from manifold_tf.evaluation.store import RunStore
from manifold_tf.evaluation.walk import continue_batches, select_correct_points, walk_order
from manifold_tf.projected import madry_step_size
from manifold_tf.shells.base import answer
from manifold_tf.validation import validate_images, validate_radius

PROTOCOL = "defence"
# PGD steps of the probe x' on the points where CW failed (see defence_batch).
PROBE_STEPS = 20
# What the Table-2 protocol can and cannot show, stated in every report.
PROTOCOL_BIAS = (
    "Table 2 transfers a minimal CW x' from the base model to the shell. With epsilon <= delta, x "
    "lies inside the shell's delta-ball around x', and a barely misclassified x' is the easiest "
    "case for a shell that looks for confident labels nearby: this protocol cannot show that the "
    "shell is robust. The adaptive evaluation attacks the shell itself; its figure is the verdict."
)

CATEGORIES = ("robust_kept", "vulnerable_fixed", "wrong_but_robust", "wrong_not_robust")
CATEGORY_TITLES = {
    "robust_kept": "base robust, shell correct and consistent",
    "vulnerable_fixed": "base vulnerable, shell correct and robust",
    "wrong_but_robust": "shell wrong but robust (G(x) = G(x') != y)",
    "wrong_not_robust": "shell wrong and not robust (G(x) != G(x'))",
}
# The paper's Table 2 (wide adv_trained model, full CIFAR-10 test set, CarliniWagnerShell); batch
# 4's printed shell rate "0.07%" is 2/30 = 6.67% (the 2 failures of the text are both in batch 4).
PAPER_TABLE2 = dict(
    points=150,
    base_attack_success=[0.30, 1 / 3, 0.40, 1 / 3, 0.4667],
    shell_attack_success=[0.0, 0.0, 0.0, 2 / 30, 0.0],
    retained_accuracy=[0.9667, 1.0, 1.0, 0.9933, 1.0],
    average=dict(
        base_attack_success=56 / 150, shell_attack_success=2 / 150, retained_accuracy=147 / 150
    ),
    categories=dict(robust_kept=94, vulnerable_fixed=53, wrong_but_robust=1, wrong_not_robust=2),
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


def _shell_labels(
    shell, x: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The shell's labels and top probabilities on ``x``, and for NCN which points met no label.

    Under a multi-device strategy the shell runs through ``predict`` (spread over the devices) and
    the NCN diagnostic is ``None``; otherwise ``embed`` runs batch by batch and keeps it.
    """
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool)
    # A shell built under a strategy's scope remembers it (Keras' trainer), unlike the global one.
    strategy = shell.distribute_strategy
    if strategy.num_replicas_in_sync > 1:
        probs = shell.predict(x, batch_size=batch_size, verbose=0)
        return answer({"probabilities": probs}), probs.max(-1), None
    outs = [shell.embed(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    probs = np.concatenate([o["probabilities"].numpy() for o in outs])
    unmet = np.concatenate([o["unmet"].numpy() for o in outs]) if "unmet" in outs[0] else None
    return answer({"probabilities": probs}), probs.max(-1), unmet


def defence_batch(
    base,
    shell,
    x: np.ndarray,
    y: np.ndarray,
    *,
    context: RunContext,
    shell_batch_size: int,
    desc: str = "",
    precomputed: tuple[np.ndarray, list] | None = None,
    cw: attacks.AttackResult | None = None,
) -> tuple[dict, np.ndarray]:
    """Table 2 on one batch of base-correct points: ``(record, x_adv [N, 32, 32, 3])``.

    ``x'`` is CW's point where CW succeeded on the base (the paper's protocol). Where it failed,
    the paper's protocol has no ``x'`` and ``G(x') = G(x)`` by construction, so "new
    vulnerabilities" (base-robust points the shell gets wrong) would be 0 for every deterministic
    shell; instead ``x'`` is a probe: PGD with the CW margin loss on the base (20 steps from
    ``x``, within ``epsilon``), and the shell is run on it. The base-attack column stays CW's.
    ``context``: the run's budget ``epsilon`` (pixels) and CW's settings (``cw_settings``, of
    :func:`manifold_tf.attacks.cw_linf`).
    ``precomputed``: ``(x_adv, attack_iterations, base_success)`` of the same attack on the same
    points (another shell's run), reused. ``cw``: CW's result on these points, already computed
    (by the adaptive evaluation, same attack and labels): the probe still runs.
    """
    epsilon, attack = validate_radius(context.epsilon, "epsilon"), context.cw_settings
    t0 = time.perf_counter()
    if precomputed is None:
        if cw is None:
            cw = attacks.cw_linf(base, x, y, epsilon=epsilon, settings=attack)
        # A copy: the probe below overwrites the points where CW failed.
        x_adv, iterations = np.array(cw.x_adv), np.asarray(cw.details["iterations"]).tolist()
        found = np.asarray(cw.success, bool)
        base_adv = predict_logits(base, x_adv).argmax(-1)
        linf = np.abs(x_adv - x).reshape(len(x), -1).max(-1)
        # Valid: within the budget (up to float rounding of the projection) and misclassified.
        success = found & (base_adv != y) & (linf <= epsilon + 1e-3)
        if (~success).any():
            probe = attacks.pgd(
                base,
                x[~success],
                y[~success],
                epsilon=epsilon,
                steps=PROBE_STEPS,
                step_size=madry_step_size(epsilon, PROBE_STEPS),
                settings=attacks.PGDSettings(loss="cw", random_start=False),
            )
            x_adv[~success] = probe.x_adv
    else:
        x_adv, iterations, success = precomputed
        success = np.asarray(success, bool)
    base_adv = predict_logits(base, x_adv).argmax(-1)
    linf = np.abs(x_adv - x).reshape(len(x), -1).max(-1)
    t1 = time.perf_counter()
    if desc:
        what = "reused x'" if precomputed is not None else f"CW attack done in {t1 - t0:.0f} s"
        logging.info(
            f"{desc}: {what} ({int(success.sum())}/{len(x)} successes); "
            f"shell on {len(x)} x and {len(x)} x' ..."
        )
    g_x, c_x, unmet_x = _shell_labels(shell, x, shell_batch_size)
    g_adv, c_adv, unmet_adv = _shell_labels(shell, x_adv, shell_batch_size)
    diagnostics = {}
    if unmet_x is not None and unmet_adv is not None:
        diagnostics = dict(shell_clean_unmet=unmet_x.tolist(), shell_adv_unmet=unmet_adv.tolist())
    t2 = time.perf_counter()
    record = dict(
        labels=y.tolist(),
        base_success=success.tolist(),
        probe=(~success).tolist(),
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


def table2_points(
    base,
    images: np.ndarray,
    labels: np.ndarray,
    config: DefenceConfig,
    *,
    seed: int,
    walk: int | None = None,
) -> list[np.ndarray]:
    """Table 2's points, as a list of index batches.

    ``walk=None``: the paper's ``batches x batch_points`` first base-correct points of the seeded
    order. ``walk=N``: the base-correct points among the first ``N`` of the order (those the
    adaptive evaluation also runs on), in batches of ``batch_points`` (the last may be smaller).
    """
    if walk is None:
        num_points = int(config.batches) * int(config.batch_points)
        chosen = select_correct_points(
            base, images, labels, num_points=num_points, seed=seed, permutation=config.permutation
        )
        return list(chosen.reshape(config.batches, config.batch_points))
    order = walk_order(len(images), seed=seed, kind=config.permutation)[:walk]
    correct = order[predict_logits(base, images[order]).argmax(-1) == labels[order]]
    if not len(correct):
        raise ValueError(
            f"the base model gets none of the first {len(order)} points right: "
            f"Table 2 needs base-correct points (raise --num_points)."
        )
    return [
        correct[i : i + config.batch_points] for i in range(0, len(correct), config.batch_points)
    ]


@dataclasses.dataclass(frozen=True)
class DefenceRun:
    """The finished Table-2 protocol: what :mod:`~manifold_tf.evaluation.defence_report` renders.

    ``records``: one dict per batch, in batch order (the ``defence/batch_XXX.json`` records:
    ``indices``, ``labels``, ``category`` ... one entry per point). ``settings``: the settings the
    run was bound with (JSON form), also the report's ``settings``.
    """

    records: list[dict]
    settings: dict


def run_table2(
    base,
    shell,
    images: np.ndarray,
    labels: np.ndarray,
    config: DefenceConfig,
    context: RunContext,
    *,
    walk: int | None = None,
    known_cw: dict | None = None,
) -> DefenceRun | None:
    """Runs (or resumes) the Table-2 protocol in ``context.store``; returns its records, writes no
    report.

    Args:
      base: Keras model, images -> logits. shell: a shell wrapping it (built from ``config.shell``).
      images, labels: the test set, ``[M, 32, 32, 3]`` pixels, ``[M]`` ints.
      config: points and the base attack (``config.attack``: CW L-inf; a success needs
        ``||x' - x||_inf <= epsilon``). ``config.attack.from_run``: the run directory of an
        earlier run with the same base model, data, points, epsilon and attack settings (checked):
        its ``x'`` are reused instead of attacking again, so that two shells are compared on the
        same adversarial examples at the cost of the shells alone.
      context: the run (:meth:`RunContext.for_defence` of ``config``, checked): ``store``
        receives ``defence/batch_XXX.json`` and ``batch_XXX_xadv.npy`` as each batch finishes;
        ``epsilon``, the attacker's L-inf budget, pixels (the threat model's); ``seed``;
        ``metadata``, recorded in the settings (checkpoint, dataset ...): a resumed run must
        match it.
      walk: see :func:`table2_points` (``None``: the paper's point count).
      known_cw: point index -> :class:`~manifold_tf.evaluation.adaptive.TransferPoint` (CW's
        ``x'``, success and iterations on that point, as the adaptive evaluation computed them
        with the same attack): a batch whose points are all known reuses them.

    Under several workers (``store.workers``) each computes its own batches, then all wait for
    every batch (:meth:`RunStore.gather`).

    Returns:
      The :class:`DefenceRun` on the chief (render it with
      :func:`~manifold_tf.evaluation.defence_report.write_defence_report`); ``None`` on the other
      workers, whose part is done.
    """
    context.check_defence(config)
    store, seed = context.store, context.seed
    epsilon, batch_points = validate_radius(context.epsilon, "epsilon"), config.batch_points
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).astype(np.int64)
    validate_images(images)
    points = np.concatenate(table2_points(base, images, labels, config, seed=seed, walk=walk))
    num_batches = -(-len(points) // batch_points)
    settings = _table2_settings(shell, config, context, num_batches, len(images), walk)
    # A resumed run on more points (the verdict reached more) keeps its finished batches, a last
    # partial one included, and goes on after them: the point count is free on resume.
    settings = store.bind(PROTOCOL, settings, free=("strategy", "num_batches", "walk"))
    indices, records = _saved_table2(store, points, batch_points)
    num_batches = len(indices)
    done = sum(r is not None for r in records)
    progress = store.progress([len(i) for i in indices], records, "defence")
    if done:
        logging.info(
            f"resuming: {done}/{num_batches} batches already done in {store.path(PROTOCOL)}"
        )
    from_run = config.attack.from_run
    for b in range(num_batches):
        if records[b] is not None or not store.mine(b):
            continue
        idx = indices[b]
        precomputed = _reusable_attack(from_run, b, settings, idx) if from_run else None
        logging.info(
            f"batch {b + 1}/{num_batches}: "
            + (
                f"reusing x' from {from_run}"
                if precomputed
                else f"CW L-inf attack (eps {epsilon:g}) on {len(idx)} points ..."
            )
        )
        record, x_adv = defence_batch(
            base,
            shell,
            images[idx],
            labels[idx],
            context=context,
            shell_batch_size=config.shell.batch_size,
            desc=f"batch {b + 1}/{num_batches}",
            precomputed=precomputed,
            cw=None if precomputed is not None else _known_cw(known_cw, idx),
        )
        record = dict(batch=b, indices=idx.tolist(), **record)
        store.save(PROTOCOL, b, record, arrays={"xadv": x_adv.astype(np.float32)})
        records[b] = record
        progress.update(len(idx), extra=_batch_note(b, num_batches, record))
    records = store.gather(PROTOCOL, num_batches)
    if not store.workers.is_chief:
        return None  # the chief writes the reports
    return DefenceRun(records=records, settings=settings)


def _table2_settings(
    shell, config: DefenceConfig, context: RunContext, num_batches: int, num_test: int, walk
) -> dict:
    """The settings Table 2 is bound with (JSON form), on ``num_test`` test points."""
    return reporting.to_jsonable(
        dict(
            protocol="Table 2 (METHOD.md, Defence evaluation)",
            shell=shell.settings(),
            epsilon=float(context.epsilon),
            attack=config.attack.cw_settings.recorded(),
            num_batches=int(num_batches),
            batch_points=int(config.batch_points),
            seed=int(context.seed),
            permutation=config.permutation,
            num_test_points=int(num_test),
            **(context.metadata or {}),
            **({} if walk is None else dict(walk=int(walk))),
        )
    )


def _saved_table2(store: RunStore, points: np.ndarray, batch_points: int) -> tuple[list, list]:
    """``(indices, records)``: Table 2's batches of ``points`` after those ``store`` finished,
    and the finished records (None for the others)."""
    saved = {b: store.load(PROTOCOL, b) for b in store.finished(PROTOCOL)}
    try:
        indices = continue_batches(
            points, {b: r["indices"] for b, r in saved.items()}, batch_points
        )
    except ValueError as e:
        raise ValueError(f"{store.path(PROTOCOL)}: {e}") from None
    return indices, [saved.get(b) for b in range(len(indices))]


def _known_cw(known_cw: dict | None, idx: np.ndarray) -> attacks.AttackResult | None:
    """CW's result on points ``idx`` from the verdict (``known_cw``), when it has all of them."""
    if not (known_cw and all(int(i) in known_cw for i in idx)):
        return None
    return attacks.AttackResult(
        np.stack([known_cw[int(i)].x_adv for i in idx]),
        np.array([known_cw[int(i)].success for i in idx]),
        details=dict(iterations=np.array([known_cw[int(i)].iterations for i in idx])),
    )


def _batch_note(b: int, num_batches: int, record: dict) -> str:
    """The progress line of Table 2's finished batch ``b``."""
    rates, size = batch_rates(record), len(record["indices"])
    return (
        f"batch {b + 1}/{num_batches}: base attack {rates['base_successes']}/{size}, "
        f"shell attack {rates['shell_successes']}/{size}, retained {rates['retained']}/"
        f"{size} (attack {record['seconds']['attack']:.0f} s, shell "
        f"{record['seconds']['shell']:.0f} s)"
    )


# The settings a reused x' must share with this run (--base_attack_from_run).
ATTACK_KEYS = ("epsilon", "attack", "checkpoint", "dataset", "data_dir", "num_test_points")


def _reusable_attack(run_dir: str, b: int, settings: dict, indices: np.ndarray):
    """``(x_adv, iterations, base_success)`` of batch ``b`` from another run, if it exists.

    ``None`` when that run has not finished batch ``b``; raises ``ValueError`` when its points or
    attack settings differ from this run's (``settings``, the bound settings of this run).
    """
    other = RunStore(run_dir, resume=True)
    saved = other.load(PROTOCOL, b)
    if saved is None:
        return None
    path = other.path(PROTOCOL, f"batch_{b:03d}.json")
    theirs = {k: (other.settings(PROTOCOL) or {}).get(k) for k in ATTACK_KEYS}
    mine = {k: settings.get(k) for k in ATTACK_KEYS}
    if theirs != mine or saved["indices"] != indices.tolist():
        raise ValueError(
            f"cannot reuse the attack of {path}: other points or attack settings.\n"
            f"  saved: {theirs}\n  now:   {mine}"
        )
    return other.load_array(PROTOCOL, b, "xadv"), saved["attack_iterations"], saved["base_success"]


def summarize_defence(records: list[dict]) -> dict:
    """Per-batch and overall rates and counts (the overall rates are over all points)."""
    merged = {
        k: sum((list(r[k]) for r in records), [])
        for k in ("labels", "base_success", "shell_clean", "shell_adv", "category")
    }
    per_batch = [batch_rates(r) for r in records]
    summary = dict(per_batch=per_batch, average=batch_rates(merged))
    if all("shell_clean_unmet" in r for r in records):  # NCN: points where the fallback was used
        summary["ncn_unmet"] = dict(
            clean=int(sum(map(sum, (r["shell_clean_unmet"] for r in records)))),
            adversarial=int(sum(map(sum, (r["shell_adv_unmet"] for r in records)))),
            points=len(merged["labels"]),
        )
    return summary
