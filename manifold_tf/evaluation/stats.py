"""Statistics every report uses: exact binomial intervals, the paper's Chebyshev bound, McNemar.

Every accuracy or rate in a report is a count ``k`` of ``n`` points; :func:`proportion` gives it
with its exact two-sided 95% Clopper-Pearson interval. An attack's success count is a lower bound
on the true count (a stronger attack may find more), so a robust accuracy measured under attack is
an *upper* bound on the true robust accuracy, and its interval is about the measured quantity.
"""

from __future__ import annotations

import numpy as np


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial (Clopper-Pearson) interval for ``k`` successes in ``n`` trials."""
    from scipy.stats import binomtest

    if n < 1 or not 0 <= k <= n or not 0.0 < level < 1.0:
        raise ValueError(f"need n >= 1, 0 <= k <= n and 0 < level < 1; got k={k}, n={n}, level={level}.")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def proportion(k: int, n: int, level: float = 0.95) -> dict:
    """``{"k", "n", "rate", "ci_low", "ci_high", "level"}``: a count with its exact interval."""
    k, n = int(k), int(n)
    if n == 0:
        return dict(k=0, n=0, rate=float("nan"), ci_low=0.0, ci_high=1.0, level=level)
    lo, hi = clopper_pearson(k, n, level)
    return dict(k=k, n=n, rate=k / n, ci_low=lo, ci_high=hi, level=level)


def format_proportion(p: dict, digits: int = 1) -> str:
    """``"51.3% (77/150, 95% CI 43.0-59.6)"``."""
    if not p["n"]:
        return "n/a (0 points)"
    return (f"{100 * p['rate']:.{digits}f}% ({p['k']}/{p['n']}, {100 * p['level']:.0f}% CI "
            f"{100 * p['ci_low']:.{digits}f}-{100 * p['ci_high']:.{digits}f})")


def chebyshev_epsilon(t: int, alpha: float = 0.9) -> float:
    """The ``e`` with ``1 / (4 e^2 t) = 1 - alpha``: ``|mu_hat - mu| < e`` with probability ``>= alpha``."""
    if t < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need t >= 1 and 0 < alpha < 1; got t={t}, alpha={alpha}.")
    return float(np.sqrt(1.0 / (4.0 * (1.0 - alpha) * t)))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    ``a_only``: points where classifier A is right and B wrong; ``b_only``: the reverse. Under the
    null (A and B equally accurate on these points) the split of the ``a_only + b_only`` discordant
    points is Binomial(., 1/2).
    """
    from scipy.stats import binomtest

    n = int(a_only) + int(b_only)
    if n == 0:
        return 1.0
    return float(binomtest(int(a_only), n, 0.5).pvalue)
