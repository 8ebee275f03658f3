"""The separation test of the goodness property (paper, Section 4, Table 1 and Appendix A).

``(p, q, delta)``-separation: ``Pr_{(x,y)~D}[exists y' != y, x' in N(x, delta): F(x')_{y'} >= p] <= q``.
The test draws ``num_batches`` batches of ``batch_points`` random test points (paper: 10 x 30) by a
seeded permutation, and for every point finds the largest wrong-label confidence reachable in
``N(x, delta)`` with :func:`attacks.high_confidence`. From those confidences one run gives:

- the count of points with confidence ``>= p`` per batch and in total (Table 1's form);
- the whole curve ``s_p`` (fraction of points with confidence ``>= p``) for ``p`` in [0.5, 1);
- Appendix A's Chebyshev bound: ``Pr[|mu_hat - mu| >= e] <= 1 / (4 e^2 t)``, so with probability at
  least ``alpha`` the bad-event rate ``q`` is ``<= mu_hat + e`` for ``e = sqrt(1 / (4 (1 - alpha) t))``
  (0.0913 for ``t = 300, alpha = 0.9``; the paper rounds to 0.1, valid for ``t >= 250``);
- an exact Clopper-Pearson interval for ``q`` (two-sided, 95% by default).

Every point counts, including those the model already misclassifies at ``x`` (the paper's event is
about any wrong label ``y' != y``, with ``y`` the true label). The attack is a lower bound on the
true maximum, so every count and interval bounds the model's separation from below.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from manifold_tf import reporting
from manifold_tf.validation import validate_radius

PAPER_TABLE1 = {"robust": 26, "natural": 277, "points": 300, "p": 0.9, "delta": 8.0}


def sample_indices(num_available: int, *, num_batches: int, batch_points: int, seed: int) -> np.ndarray:
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
    """Probabilities ``start, start + step, ... < stop`` (rounded to 1e-9, so 0.9 is exactly 0.9)."""
    n = int(np.floor((stop - start) / step - 1e-9)) + 1
    return np.round(start + step * np.arange(n), 9)


def counts_at(confidence: np.ndarray, ps) -> np.ndarray:
    """Number of points with ``confidence >= p`` for each ``p`` (any leading shape of points)."""
    c = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ps = np.atleast_1d(np.asarray(ps, dtype=np.float64))
    return (c[None, :] >= ps[:, None]).sum(axis=1)


def chebyshev_epsilon(t: int, alpha: float = 0.9) -> float:
    """The ``e`` with ``1 / (4 e^2 t) = 1 - alpha``: ``|mu_hat - mu| < e`` with probability ``>= alpha``."""
    if t < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need t >= 1 and 0 < alpha < 1; got t={t}, alpha={alpha}.")
    return float(np.sqrt(1.0 / (4.0 * (1.0 - alpha) * t)))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial (Clopper-Pearson) interval for ``k`` successes in ``n`` trials."""
    from scipy.stats import beta

    if n < 1 or not 0 <= k <= n or not 0.0 < level < 1.0:
        raise ValueError(f"need n >= 1, 0 <= k <= n and 0 < level < 1; got k={k}, n={n}, level={level}.")
    a = (1.0 - level) / 2.0
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def summarize(
    confidence: np.ndarray, *, p: float = 0.9, ps=None, alpha: float = 0.9, level: float = 0.95
) -> dict:
    """Statistics of one run. ``confidence``: ``[num_batches, batch_points]`` in [0, 1].

    Returns a dict: ``per_batch`` counts at ``p``, ``total``, ``points``, ``fraction``, the Chebyshev
    ``epsilon`` and ``q_upper = fraction + epsilon`` (probability ``>= alpha``), the Clopper-Pearson
    interval, and ``curve``: ``p``, ``count``, ``fraction``, ``ci_low``, ``ci_high`` per grid value.
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
        chebyshev=dict(alpha=alpha, epsilon=eps, q_upper=min(1.0, total / t + eps),
                       q_lower=max(0.0, total / t - eps)),
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
    *,
    delta: float,
    num_batches: int = 10,
    batch_points: int = 30,
    seed: int = 0,
    attack: dict | None = None,
    batch_dir: str | None = None,
    desc: str = "separation",
    p: float = 0.9,
    model_name: str | None = None,
) -> dict:
    """Runs the high-confidence attack on ``num_batches`` seeded random batches.

    Args:
      model: Keras model, images -> logits.
      images, labels: the test set, ``[M, 32, 32, 3]`` pixels and ``[M]`` ints.
      delta: neighbourhood radius in pixels.
      attack: keyword arguments of :func:`attacks.high_confidence` (``steps``, ``step_size``,
        ``optimizer``, ``random_start``, ``jit_compile``); defaults: 20 sign steps of
        ``delta / 8`` pixels (2.5 * delta / steps, Madry's rule), no random start.
      batch_dir: if given, each batch is saved there as ``batch_XXX.json`` when it finishes, and a
        batch already saved with the same settings is loaded instead of recomputed (resume).
      p: the threshold shown in the progress lines (the statistics come from :func:`summarize`).
      model_name: recorded in the settings, so that a resumed run never mixes two models.

    Returns:
      dict: ``settings``, ``indices``/``labels``/``wrong_label``/``clean_correct`` per batch,
      ``confidence`` ``[num_batches, batch_points]``, ``seconds`` per batch.
    """
    from manifold_tf import attacks  # imported here: keeps the statistics usable without TF work

    delta = validate_radius(delta, "delta")
    attack = dict(attack or {})
    attack.setdefault("steps", 20)
    attack.setdefault("step_size", 2.5 * delta / max(int(attack["steps"]), 1))
    attack.setdefault("optimizer", "sign")
    attack.setdefault("random_start", False)
    indices = sample_indices(len(images), num_batches=num_batches, batch_points=batch_points, seed=seed)
    settings = dict(delta=delta, num_batches=int(num_batches), batch_points=int(batch_points),
                    seed=int(seed), attack={k: v for k, v in attack.items() if k != "jit_compile"},
                    num_test_points=int(len(images)), model=model_name)
    batches: list[dict | None] = [None] * num_batches
    if batch_dir is not None:
        os.makedirs(batch_dir, exist_ok=True)
        for b in range(num_batches):
            path = os.path.join(batch_dir, f"batch_{b:03d}.json")
            if os.path.exists(path):
                saved = reporting.read_json(path)
                if saved.get("settings") != json.loads(json.dumps(settings)):
                    raise ValueError(
                        f"{path} was computed with other settings ({saved.get('settings')}); "
                        f"now {settings}. Use another output directory or --overwrite."
                    )
                batches[b] = saved
    done = sum(r is not None for r in batches)
    progress = reporting.Progress(num_batches * batch_points, desc, unit="points",
                                  initial=done * batch_points)
    for b in range(num_batches):
        if batches[b] is not None:
            continue
        start = time.perf_counter()
        idx = indices[b]
        x, y = images[idx].astype(np.float32), labels[idx].astype(np.int32)
        _, conf, wrong = attacks.high_confidence(model, x, y, delta=delta, seed=seed + b, **attack)
        pred = np.argmax(model(x, training=False).numpy(), axis=-1)
        result = dict(
            settings=settings, batch=b, indices=idx.tolist(), labels=y.tolist(),
            confidence=np.asarray(conf, np.float64).tolist(), wrong_label=np.asarray(wrong).tolist(),
            clean_correct=(pred == y).tolist(), seconds=time.perf_counter() - start,
        )
        if batch_dir is not None:
            reporting.write_json(os.path.join(batch_dir, f"batch_{b:03d}.json"), result)
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
