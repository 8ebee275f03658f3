"""The separation test of the goodness property (paper, Section 4, Table 1 and Appendix A).

``(p, q, delta)``-separation:
``Pr_{(x,y)~D}[exists y' != y, x' in N(x, delta): F(x')_{y'} >= p] <= q``. The test draws
``batches`` batches of ``batch_points`` random test points (paper: 10 x 30) by a seeded
permutation, and for every point finds the largest wrong-label confidence reachable in
``N(x, delta)`` with :func:`attacks.high_confidence`. From those confidences one run gives:

- the count of points with confidence ``>= p`` per batch and in total (Table 1's form);
- the whole curve ``s_p`` (fraction of points with confidence ``>= p``) for ``p`` in [0.5, 1);
- Appendix A's Chebyshev bound: ``Pr[|mu_hat - mu| >= e] <= 1 / (4 e^2 t)``, so with probability at
  least ``alpha`` the rate is ``<= mu_hat + e`` for ``e = sqrt(1 / (4 (1 - alpha) t))``
  (0.0913 for ``t = 300, alpha = 0.9``; the paper rounds to 0.1, valid for ``t >= 250``);
- an exact Clopper-Pearson interval (two-sided, 95% by default).

Every point counts, including those the model already misclassifies at ``x`` (the paper's event is
about any wrong label ``y' != y``, with ``y`` the true label). The attack is a lower bound on the
true maximum, so every count, and both bounds, are about the attack's success rate: they bound
``q`` from below, not from above.
"""

from __future__ import annotations

import time

import numpy as np

from manifold_tf import attacks, reporting, seeds
from manifold_tf.evaluation.config import SeparationConfig
from manifold_tf.evaluation.stats import chebyshev_epsilon, clopper_pearson
from manifold_tf.projected import madry_step_size
from manifold_tf.validation import validate_radius

PAPER_TABLE1 = {"robust": 26, "natural": 277, "points": 300, "p": 0.9, "delta": 8.0}


def sample_indices(
    num_available: int, *, num_batches: int, batch_points: int, seed: int
) -> np.ndarray:
    """Indices ``[num_batches, batch_points]`` of distinct test points from a seeded permutation."""
    num_batches, batch_points = int(num_batches), int(batch_points)
    if num_batches < 1 or batch_points < 1:
        raise ValueError(
            f"num_batches and batch_points must be >= 1; got {num_batches} and {batch_points}."
        )
    need = num_batches * batch_points
    if need > num_available:
        raise ValueError(
            f"{num_batches} batches of {batch_points} points need {need} test points; "
            f"only {num_available} are available."
        )
    perm = np.random.default_rng(seed).permutation(num_available)
    return perm[:need].reshape(num_batches, batch_points)


def p_grid(start: float = 0.5, stop: float = 1.0, step: float = 0.01) -> np.ndarray:
    """Probabilities ``start, start + step, ... < stop`` (rounded to 1e-9, so 0.9 is exactly
    0.9)."""
    n = int(np.floor((stop - start) / step - 1e-9)) + 1
    return np.round(start + step * np.arange(n), 9)


def counts_at(confidence: np.ndarray, ps) -> np.ndarray:
    """Number of points with ``confidence >= p`` for each ``p`` (any leading shape of points)."""
    c = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ps = np.atleast_1d(np.asarray(ps, dtype=np.float64))
    return (c[None, :] >= ps[:, None]).sum(axis=1)


def summarize(
    confidence: np.ndarray, *, p: float = 0.9, ps=None, alpha: float = 0.9, level: float = 0.95
) -> dict:
    """Statistics of one run. ``confidence``: ``[num_batches, batch_points]`` in [0, 1].

    Returns a dict: ``per_batch`` counts at ``p``, ``total``, ``points``, ``fraction``, the
    Chebyshev ``epsilon`` and ``q_upper = fraction + epsilon`` (probability ``>= alpha``), the
    Clopper-Pearson interval, and ``curve``: ``p``, ``count``, ``fraction``, ``ci_low``, ``ci_high``
    per grid value.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.ndim != 2:
        raise ValueError(f"confidence must be [num_batches, batch_points]; got shape {conf.shape}.")
    ps = p_grid() if ps is None else np.asarray(ps, dtype=np.float64)
    t = conf.size
    per_batch = [int(counts_at(row, p)[0]) for row in conf]
    total = int(counts_at(conf, p)[0])
    eps = chebyshev_epsilon(t, alpha)
    counts = counts_at(conf, ps)
    intervals = [clopper_pearson(int(k), t, level) for k in counts]
    return dict(
        p=float(p),
        per_batch=per_batch,
        total=total,
        points=t,
        fraction=total / t,
        chebyshev=dict(
            alpha=alpha,
            epsilon=eps,
            q_upper=min(1.0, total / t + eps),
            q_lower=max(0.0, total / t - eps),
        ),
        clopper_pearson=dict(level=level, interval=clopper_pearson(total, t, level)),
        curve=dict(
            p=ps.tolist(),
            count=counts.tolist(),
            fraction=(counts / t).tolist(),
            ci_low=[lo for lo, _ in intervals],
            ci_high=[hi for _, hi in intervals],
        ),
    )


def run_separation(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    config: SeparationConfig,
    *,
    delta: float,
    p: float = 0.9,
    seed: int = 0,
    store=None,
    name: str | None = None,
    model_name: str | None = None,
) -> dict:
    """Runs the high-confidence attack on ``config.batches`` seeded random batches.

    Args:
      model: Keras model, images -> logits.
      images, labels: the test set, ``[M, 32, 32, 3]`` pixels and ``[M]`` ints.
      config: the test's settings: ``batches`` of ``batch_points`` points, the attack
        (:meth:`SeparationConfig.attack`: by default 20 sign steps of Madry's ``2.5 * radius /
        steps`` pixels, no random start) and the searched radius ``config.radius(delta)``.
      delta: the threat model's radius, pixels.
      p: the threshold shown in the progress lines (the statistics come from :func:`summarize`).
      store: a :class:`~manifold_tf.evaluation.store.RunStore`: each batch is saved as it finishes
        under the protocol ``separation_<name>`` (``separation`` without a name), and a resumed run
        loads the finished ones (same settings, checked).
      name: the model's name in the protocol and the progress lines.
      model_name: recorded in the settings, so that a resumed run never mixes two models.

    Returns:
      dict: ``settings`` (``delta``: the searched radius), ``indices``/``labels``/``wrong_label``/
      ``clean_correct`` per batch, ``confidence`` ``[batches, batch_points]``, ``seconds`` per
      batch.
    """

    radius = validate_radius(config.radius(delta), "delta")
    attack = config.attack(delta)
    num_batches, batch_points = int(config.batches), int(config.batch_points)
    indices = sample_indices(
        len(images), num_batches=num_batches, batch_points=batch_points, seed=seed
    )
    settings = dict(
        delta=radius,
        num_batches=num_batches,
        batch_points=batch_points,
        seed=int(seed),
        attack=dict(attack),
        num_test_points=int(len(images)),
        model=model_name,
    )
    protocol = _protocol(name)
    batches: list[dict | None] = [None] * num_batches
    if store is not None:
        settings = store.bind(protocol, settings)
        for b in range(num_batches):
            batches[b] = store.load(protocol, b)
    done = sum(r is not None for r in batches)
    progress = reporting.Progress(
        num_batches * batch_points,
        protocol.replace("_", " ", 1),  # "separation <name>"
        unit="points",
        initial=done * batch_points,
    )
    for b in range(num_batches):
        if batches[b] is not None:
            continue
        result = _attack_batch(model, images, labels, indices[b], b, radius, seed, attack)
        if store is not None:
            store.save(protocol, b, result)
        batches[b] = result
        count = int(counts_at(result["confidence"], p)[0])
        progress.update(batch_points, extra=f"batch {b + 1}: {count}/{batch_points} at p={p:g}")
    return dict(
        settings=settings,
        indices=[r["indices"] for r in batches],
        labels=[r["labels"] for r in batches],
        wrong_label=[r["wrong_label"] for r in batches],
        clean_correct=[r["clean_correct"] for r in batches],
        confidence=np.array([r["confidence"] for r in batches], dtype=np.float64),
        seconds=[r["seconds"] for r in batches],
    )


def _protocol(name: str | None) -> str:
    """The run store protocol of a model's run: ``separation`` or ``separation_<name>``."""
    return "separation" if name is None else f"separation_{name}"


def _attack_batch(
    model, images, labels, idx: np.ndarray, b: int, radius: float, seed: int, attack: dict
) -> dict:
    """Batch ``b`` (test points ``idx``): the largest wrong-label confidence within ``radius``
    pixels of each point, its label and whether the model is right at the point."""
    start = time.perf_counter()
    x, y = images[idx].astype(np.float32), labels[idx].astype(np.int32)
    seeded = seeds.point_seeds(seed, idx)  # a point's draws do not depend on its batch
    out = attacks.high_confidence(model, x, y, epsilon=radius, seed=seeded, **attack)
    conf, wrong = out.details["confidence"], out.details["label"]
    pred = np.argmax(model(x, training=False).numpy(), axis=-1)
    return dict(
        batch=b,
        indices=idx.tolist(),
        labels=y.tolist(),
        confidence=np.asarray(conf, np.float64).tolist(),
        wrong_label=np.asarray(wrong).tolist(),
        clean_correct=(pred == y).tolist(),
        seconds=time.perf_counter() - start,
    )


def convergence_check(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    run: dict,
    config: SeparationConfig,
    *,
    p: float,
    store=None,
    name: str | None = None,
) -> dict:
    """Reruns the search on the first ``config.convergence_batches`` batches of ``run`` with more
    steps and a restart.

    Rows: the main run, each of ``config.convergence_steps`` (same optimiser, Madry's step rule),
    and the main run's settings from a random start combined with the main run (per point the
    higher confidence: a restart). A count that still grows with steps or restarts has not
    converged, and the main count understates the model's true rate by at least the difference.
    The radius, seed and attack are the run's (``run["settings"]``); ``store`` and ``name`` as for
    :func:`run_separation` (protocol ``separation_<name>_convergence``).
    """

    batches = min(int(config.convergence_batches), len(run["indices"]))
    if batches == 0:
        return {}
    delta, seed, attack = (run["settings"][k] for k in ("delta", "seed", "attack"))
    idx = np.concatenate([np.asarray(i) for i in run["indices"][:batches]])
    x, y = images[idx].astype(np.float32), labels[idx].astype(np.int32)
    main = np.concatenate([np.asarray(c) for c in run["confidence"][:batches]])
    variants = [
        (f"{s} steps", dict(attack, steps=int(s), step_size=madry_step_size(delta, s)))
        for s in config.convergence_steps
    ]
    variants.append(
        (f"{attack['steps']} steps + 1 random restart", dict(attack, random_start=True))
    )
    protocol = f"{_protocol(name)}_convergence"
    settings = dict(delta=delta, points=idx.tolist(), variants=[v for v in variants], seed=seed)
    if store is not None:
        store.bind(protocol, settings)
    rows = [dict(name=f"{attack['steps']} steps (main run)", count=int(counts_at(main, p)[0]))]
    progress = reporting.Progress(len(variants), "separation convergence", unit="runs")
    for b, (row, kwargs) in enumerate(variants):
        saved = store.load(protocol, b) if store is not None else None
        if saved is None:
            conf = attacks.high_confidence(
                model, x, y, epsilon=delta, seed=seed + 1000 + b, **kwargs
            ).details["confidence"]
            conf = np.asarray(conf, np.float64)
            if kwargs.get("random_start"):
                conf = np.maximum(conf, main)
            saved = dict(name=row, confidence=conf.tolist(), count=int(counts_at(conf, p)[0]))
            if store is not None:
                store.save(protocol, b, saved)
        rows.append(dict(name=saved["name"], count=saved["count"]))
        progress.update(1, extra=f"{row}: {saved['count']}/{len(idx)} at p={p:g}")
    return dict(points=int(len(idx)), p=float(p), rows=rows)


def separation_report(
    runs: dict, *, p: float, dataset: str, data_dir: str | None, convergence: dict | None = None
) -> dict:
    """The report of one or more models' runs: ``{name: (checkpoint, run)}`` -> the JSON dict."""
    report = dict(dataset=dataset, data_dir=data_dir, models={}, paper_table1=PAPER_TABLE1)
    for name, (checkpoint, run) in runs.items():
        summary = summarize(run["confidence"], p=p)
        report["settings"] = run["settings"]
        report["models"][name] = dict(
            convergence=(convergence or {}).get(name, {}),
            checkpoint=checkpoint,
            summary=summary,
            seconds=float(sum(run["seconds"])),
            clean_accuracy=float(sum(map(sum, run["clean_correct"]))) / summary["points"],
            confidence=run["confidence"],
            wrong_label=run["wrong_label"],
            indices=run["indices"],
        )
    s0 = next(iter(report["models"].values()))["summary"]
    cheb = s0["chebyshev"]
    report["bound_note"] = (
        f"Chebyshev (paper, Appendix A): Pr[|mu_hat - mu| >= e] <= 1/(4 e^2 t); with t = "
        f"{s0['points']} and alpha = {cheb['alpha']:g}, e = sqrt(1/(4 (1 - alpha) t)) = "
        f"{cheb['epsilon']:.4f}, so mu <= mu_hat + e (and mu >= mu_hat - e) each with probability "
        f">= {cheb['alpha']:g}. "
        f"Clopper-Pearson: exact two-sided {s0['clopper_pearson']['level']:.0%} binomial interval. "
        f"Both bound mu, the attack's success rate, not q: the attack finds a lower bound on each "
        f"point's best wrong-label confidence, so q >= mu; the lower bounds hold for q, the upper "
        f"bounds do not."
    )
    return report


def separation_markdown(report: dict) -> str:
    """Table 1 per batch, the statistics per model, the bound note and the paper's figures."""
    models = report["models"]
    names = list(models)
    s = report["settings"]
    p = next(iter(models.values()))["summary"]["p"]
    cheb = next(iter(models.values()))["summary"]["chebyshev"]
    batch_rows = [
        [f"Batch #{b + 1}"] + [r["summary"]["per_batch"][b] for r in models.values()]
        for b in range(s["num_batches"])
    ]
    batch_rows.append(
        ["Total"] + [f"{r['summary']['total']}/{r['summary']['points']}" for r in models.values()]
    )
    stats_rows = [
        [
            n,
            f"{r['summary']['total']}/{r['summary']['points']}",
            r["summary"]["fraction"],
            r["summary"]["chebyshev"]["q_lower"],
            r["summary"]["chebyshev"]["q_upper"],
            "[{:.4f}, {:.4f}]".format(*r["summary"]["clopper_pearson"]["interval"]),
            r["clean_accuracy"],
            f"{r['seconds']:.0f}",
        ]
        for n, r in models.items()
    ]
    return (
        f"# Separation test: radius {s['delta']:g} px, p = {p:g}\n\n"
        f"Attack: {s['attack']}; seed {s['seed']}; dataset {report['dataset']}.\n\n"
        + reporting.markdown_table(["", *names], batch_rows)
        + "\n"
        + reporting.markdown_table(
            [
                "model",
                f"count at p={p:g}",
                "fraction",
                "q >= (Chebyshev)",
                f"attack rate <= (Chebyshev, alpha={cheb['alpha']:g}; not a bound on q)",
                "attack rate, Clopper-Pearson 95%",
                "clean accuracy (points)",
                "seconds",
            ],
            stats_rows,
        )
        + f"\n{report['bound_note']}\n\n"
        + _convergence_markdown(models)
        + "Paper's Table 1 (wide models, delta 8, p 0.9): robust 26/300, natural 277/300.\n"
    )


def _convergence_markdown(models: dict) -> str:
    parts = []
    for name, r in models.items():
        c = r.get("convergence") or {}
        if not c:
            continue
        rows = [[row["name"], f"{row['count']}/{c['points']}"] for row in c["rows"]]
        parts.append(
            f"Convergence of the search for `{name}` on its first {c['points']} points:\n\n"
            + reporting.markdown_table(["search", f"count at p={c['p']:g}"], rows)
            + "\n"
        )
    return "".join(parts)


def plot_separation(report: dict, path: str) -> None:
    s = report["settings"]
    first = next(iter(report["models"].values()))["summary"]
    p = first["p"]
    reporting.plot_separation_curve(
        {n: r["summary"]["curve"] for n, r in report["models"].items()},
        path,
        p=p,
        reference=(
            {"paper robust (wide)": 26 / 300, "paper natural (wide)": 277 / 300}
            if (s["delta"], p) == (8.0, 0.9)
            else None
        ),
        title=(
            f"s_p at delta={s['delta']:g} px, {first['points']} points (95% Clopper-Pearson bands)"
        ),
    )
