"""Randomised defences judged by ``k`` fresh predictions per point (issue 23, part 3).

A shell that declares itself random (:attr:`~manifold_tf.shells.FactorShell.is_random`) answers
with a draw; one prediction per point says little (AutoAttack's PR #105, Croce et al. 2022 use 5
runs). So the verdict makes ``k`` runs: run 0 is the shell itself (the draw the attacks fought,
with EOT, and verified every success on), runs ``1..k-1`` are copies with fresh seeds
(:meth:`~manifold_tf.shells.FactorShell.with_seed`), each predicting once at ``x`` and once at the
point's worst ``x'``: the breaking ``x'`` where an attack broke it, else the standing ``x'`` with
the highest attack score (run 0 was right there: the step that produced it verified it).

A point is *robust in run j* when run ``j`` is right at ``x`` and at ``x'`` (run 0 of a point an
attack broke: never); the verdict's robust accuracy is the worst of ``k``: robust in every run;
clean likewise (right at ``x`` in every run). The report adds the mean over the runs, with a 95%
interval valid for any dependence between runs (Bonferroni over the ``k`` runs' Clopper-Pearson
intervals), and each point's fraction of runs it is robust / clean in.

A point run 0 gets wrong at ``x`` is not attacked (as for any shell): its ``x'`` is ``x``, so in
another run it counts robust when that run is right at ``x``. The worst of ``k`` is unaffected;
the mean is then a looser upper bound, like every robust accuracy of an attack suite.

A deterministic shell has ``k = 1``: nothing here runs, its records and reports are unchanged.
"""

from __future__ import annotations

import weakref

import numpy as np

from manifold_tf import seeds
from manifold_tf.evaluation.stats import clopper_pearson, proportion

FIELDS = ("shell_draws_clean", "shell_draws_robust")
# shell -> {run j: its copy}: built once, so each copy's compiled search is traced once per run.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def num_draws(shell, config) -> int:
    """``k``: ``config.random_draws`` for a random shell, 1 for a deterministic one."""
    return int(config.random_draws) if shell.is_random else 1


def draw_seed(seed: int, j: int) -> int:
    """The seed of run ``j >= 1`` of a shell seeded ``seed`` (a non-negative 63-bit int)."""
    return int(seeds.fold(np.int64(int(seed)), "fresh draw", j)) & 0x7FFFFFFFFFFFFFFF


def worst(shell, config, x, y, g_x, shell_run, labels):
    """The shell suite's outcome per point for :func:`~manifold_tf.evaluation.adaptive.
    adaptive_batch`: ``(x_worst [N, H, W, C], predictions [N], record fields)``: the breaking
    ``x'`` where an attack broke the point, else ``x``; with ``k > 1`` runs, :func:`judge`'s
    ``x_worst``, its fresh predictions and fields (zeros and ``{}`` when ``k == 1``)."""
    broken = ~shell_run.standing & (shell_run.broken_by != "clean")
    x_worst = np.where(broken[:, None, None, None], shell_run.result.x_adv, x)
    k = num_draws(shell, config)
    out = judge(shell, k, x, y, g_x, shell_run.standing, shell_run.result.x_adv, labels)
    if out is None:
        return x_worst, np.zeros(len(y), np.int64), {}
    return out.pop("x_worst"), out.pop("predictions"), out


def run_shell(shell, j: int):
    """Run ``j``'s copy of ``shell`` (``j >= 1``; cached): a fresh seed, :func:`draw_seed`."""
    copies = _COPIES.setdefault(shell, {})
    if j not in copies:
        copies[j] = shell.with_seed(draw_seed(getattr(shell, "seed", 0), j))
    return copies[j]


def judge(shell, k: int, x, y, g_x, standing, x_adv, labels) -> dict | None:
    """The ``k`` runs of one batch, or None when ``k == 1`` (nothing beyond run 0).

    Args:
      shell: the (random) shell. k: runs per point.
      x: images ``[N, H, W, C]`` (pixels); y: labels ``[N]``; g_x: run 0's labels at ``x``.
      standing: ``[N]`` bool, no attack broke the point (it was attacked: run 0 right at ``x``).
      x_adv: ``[N, H, W, C]``, the suite's ``x'`` per point (the breaking one, else the
        highest-scored; ``x`` where no attack ran).
      labels: ``(shell, x) -> [M]`` labels, a fresh prediction.

    Returns:
      ``{"shell_draws_clean": [N][k], "shell_draws_robust": [N][k]`` (bools, JSON lists),
      ``"predictions": [N]`` the shell predictions spent per point, ``"x_worst": [N, H, W, C]``
      (``x_adv`` where some run was wrong there, else ``x``)}.
    """
    if k <= 1:
        return None
    n = len(y)
    attacked = g_x == y
    clean = np.zeros((n, k), bool)
    at_adv = np.zeros((n, k), bool)
    clean[:, 0] = attacked
    at_adv[:, 0] = standing  # run 0 verified right at the standing x' (never at a breaking one)
    x_check = np.where(attacked[:, None, None, None], x_adv, x)
    rows = np.flatnonzero(attacked)
    predictions = np.full(n, k - 1, np.int64) + np.where(attacked, k - 1, 0)
    for j in range(1, k):
        fresh = run_shell(shell, j)
        clean[:, j] = labels(fresh, x) == y
        at_adv[:, j] = clean[:, j]  # x' is x where nothing was attacked
        if rows.size:
            at_adv[rows, j] = labels(fresh, x_check[rows]) == y[rows]
    robust = clean & at_adv
    wrong_at_adv = attacked & ~at_adv[:, 1:].all(axis=1)
    return {
        "shell_draws_clean": clean.tolist(),
        "shell_draws_robust": robust.tolist(),
        "predictions": predictions,
        "x_worst": np.where((wrong_at_adv | ~standing)[:, None, None, None], x_check, x),
    }


def outcomes(records: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """Worst-of-k ``(clean [n], robust [n])`` over the records, or None without draws."""
    if not records or any(FIELDS[0] not in r for r in records):
        return None
    clean = np.array(sum((r[FIELDS[0]] for r in records), []), bool)
    robust = np.array(sum((r[FIELDS[1]] for r in records), []), bool)
    return clean.all(axis=1), robust.all(axis=1)


def _mean(per_run: np.ndarray, level: float = 0.95) -> dict:
    """The mean over the ``k`` runs of their accuracies ``per_run`` ``[n, k]`` bool, with the
    Bonferroni interval: each run's Clopper-Pearson at ``1 - (1 - level) / k``, averaged."""
    n, k = per_run.shape
    ends = np.array([clopper_pearson(int(c), n, 1 - (1 - level) / k) for c in per_run.sum(0)])
    return dict(
        rate=float(per_run.mean()) if n else float("nan"),
        ci_low=float(ends[:, 0].mean()),
        ci_high=float(ends[:, 1].mean()),
        n=int(n),
        runs=int(k),
        level=level,
        method="mean of the runs; Bonferroni over their Clopper-Pearson intervals",
    )


def summarize(records: list[dict]) -> dict | None:
    """The report's block for a random shell: ``k``, the mean robust and clean accuracy over the
    runs with intervals, each run's accuracies, and each point's fractions; None without draws."""
    if outcomes(records) is None:
        return None
    clean = np.array(sum((r[FIELDS[0]] for r in records), []), bool)
    robust = np.array(sum((r[FIELDS[1]] for r in records), []), bool)
    n, k = robust.shape
    indices = sum((r["indices"] for r in records), [])
    return dict(
        k=int(k),
        rule="worst of k: robust (clean) only if every run is right at x' and x (at x)",
        mean_robust=_mean(robust),
        mean_clean=_mean(clean),
        robust_by_run=[proportion(int(c), n) for c in robust.sum(0)],
        clean_by_run=[proportion(int(c), n) for c in clean.sum(0)],
        points={
            int(i): dict(robust=float(r), clean=float(c))
            for i, r, c in zip(indices, robust.mean(1), clean.mean(1), strict=True)
        },
    )


def for_summary(shell: dict) -> dict:
    """``summary.json``'s entry of a random shell (the verdict's block without the points)."""
    d = shell.get("random_draws")
    return {} if d is None else dict(random_draws={k: v for k, v in d.items() if k != "points"})


def markdown(block: dict | None) -> str:
    """The report's paragraph on the runs ("" for a deterministic shell)."""
    if block is None:
        return ""

    def fmt(m):
        return f"{100 * m['rate']:.1f}% (95% CI {100 * m['ci_low']:.1f}-{100 * m['ci_high']:.1f})"

    fractions = np.array([p["robust"] for p in block["points"].values()])
    all_ = int((fractions == 1).sum())
    return (
        f"\nRandom shell: {block['k']} runs per point (run 0 attacked with EOT, runs 1..k-1 with "
        f"fresh seeds). Robust and clean accuracy above are the worst of {block['k']} (right in "
        f"every run). Mean over the runs: robust {fmt(block['mean_robust'])}, clean "
        f"{fmt(block['mean_clean'])} ({block['mean_robust']['method']}). Points robust in "
        f"every run {all_}, in some {int((fractions > 0).sum() - all_)}, "
        f"in none {int((fractions == 0).sum())} (each point's fraction: adaptive.json).\n"
    )
