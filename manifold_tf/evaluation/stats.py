"""Statistics every report uses: exact binomial intervals, the paper's Chebyshev bound, McNemar,
and the paired difference of two classifiers evaluated on the same points.

Every accuracy or rate in a report is a count ``k`` of ``n`` points; :func:`proportion` gives it
with its exact two-sided 95% Clopper-Pearson interval. An attack's success count is a lower bound
on the true count (a stronger attack may find more), so a robust accuracy measured under attack is
an *upper* bound on the true robust accuracy, and its interval is about the measured quantity.

Paired difference (:func:`paired_difference`, :func:`paired_difference_counts`). A shell G and its
base F are judged on the same ``n`` points; per point each is robust or not, giving the 2x2 counts
``a`` (both robust), ``b`` (G only), ``c`` (F only), ``d`` (neither). The estimand is
``theta = p1 - p2`` with ``p1 = (a + b) / n`` (G's rate) and ``p2 = (a + c) / n`` (F's rate), so
``theta_hat = (b - c) / n``. The intervals are fixed-n (evaluate n points, then compute once) and
live, vectorised, in :mod:`~manifold_tf.evaluation.paired_intervals` (also Newcombe's method 11
and the adjusted Wald intervals of Bonett & Price and of Agresti & Min: :data:`PAIRED_METHODS`);
:mod:`~manifold_tf.evaluation.coverage` computes their exact coverage. The default,
:data:`DEFAULT_PAIRED_METHOD`, is Tango's: the only one measured there to cover at least 0.93 at
worst and 0.95 on average over the grid of :func:`~manifold_tf.evaluation.coverage.coverage_grid`
(n from 20 to 300, few discordant points, mostly one way; over every n from 20 to 300 its worst
is 0.927, at n = 110 with 5% shell-only points and none base-only). The two with worked examples:

- ``"newcombe"``: Newcombe (1998), "Improved confidence intervals for the difference between
  binomial proportions based on paired data", Stat. Med. 17:2635-2650, method 10. With Wilson
  score limits ``(l1, u1)`` for ``p1`` and ``(l2, u2)`` for ``p2`` (no continuity correction),

      L = theta_hat - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
      U = theta_hat + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)

  where ``phi`` estimates the correlation of the two margins: with ``A = ad - bc`` and
  ``P = (a + b)(c + d)(a + c)(b + d)``, ``phi = 0`` if ``P = 0``, else
  ``phi = max(A - n/2, 0) / sqrt(P)`` if ``A > 0`` and ``A / sqrt(P)`` otherwise (Newcombe's
  continuity-corrected phi: a positive association is shrunk towards 0, never made negative; the
  same reading as Fagerland, Lydersen & Laake's "Statistical Analysis of Contingency Tables",
  ch. 8, and Rufibach's ``biostatUZH::confIntPairedProportion``).
- ``"tango"``: Tango (1998), "Equivalence test and confidence interval for the difference in
  proportions for the paired-sample design", Stat. Med. 17:891-908. The score statistic for
  ``H0: theta = delta`` is

      Z(delta) = (b - c - n delta) / sqrt(n (2 q(delta) + delta (1 - delta)))

  with ``q(delta)`` the maximum likelihood estimate of the ``c``-cell probability under ``H0``:
  ``q = (sqrt(B^2 - 4 A C) - B) / (2 A)``, ``A = 2n``, ``B = -b - c + (2n - b + c) delta``,
  ``C = -c delta (1 - delta)``. The interval is ``{delta : |Z(delta)| <= z_{1 - alpha/2}}``. At
  ``b = c = 0`` the statistic is 0/0 at ``delta = 0``; it is taken as 0 there (no evidence of a
  difference), which gives the closed form ``+-z^2 / (n + z^2)`` for the limits. The limits are
  found by bisection on ``Z`` (it decreases in ``delta``) rather than by Brent's method, so that
  one vectorised code path serves one table and every table at once.

A verdict that stops when the interval is decided needs :mod:`manifold_tf.evaluation.sequential`
instead: these intervals hold for a sample size fixed in advance (a time or point budget counts as
fixed: it does not look at the outcomes), not for one chosen by looking at the data.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from manifold_tf.evaluation import paired_intervals
from manifold_tf.evaluation.paired_intervals import (
    check_method,
    interval_arrays,
    tango_score_arrays,
    z_value,
)
from manifold_tf.validation import check_int, check_real

# Callers name the methods through this module.
PAIRED_METHODS = paired_intervals.PAIRED_METHODS
DESCRIPTIONS = paired_intervals.DESCRIPTIONS

DEFAULT_PAIRED_METHOD = paired_intervals.DEFAULT_METHOD


def _count(value, name: str) -> int:
    """A count: an integer >= 0 (a whole float is accepted; int() would cut 2.7 to 2 unseen)."""
    return check_int(value, name, minimum=0)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial (Clopper-Pearson) interval for ``k`` successes in ``n`` trials."""
    k, n, level = _count(k, "k"), _count(n, "n"), check_real(level, "level")
    if n < 1 or not 0 <= k <= n or not 0.0 < level < 1.0:
        raise ValueError(
            f"need n >= 1, 0 <= k <= n and 0 < level < 1; got k={k}, n={n}, level={level}."
        )
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def proportion(k: int, n: int, level: float = 0.95) -> dict:
    """``{"k", "n", "rate", "ci_low", "ci_high", "level"}``: a count with its exact interval."""
    k, n = _count(k, "k"), _count(n, "n")
    if n == 0:
        if k:
            raise ValueError(f"need 0 <= k <= n; got k={k}, n=0.")
        return dict(k=0, n=0, rate=float("nan"), ci_low=0.0, ci_high=1.0, level=level)
    lo, hi = clopper_pearson(k, n, level)
    return dict(k=k, n=n, rate=k / n, ci_low=lo, ci_high=hi, level=level)


def format_proportion(p: dict, digits: int = 1) -> str:
    """``"51.3% (77/150, 95% CI 43.0-59.6)"``."""
    if not p["n"]:
        return "n/a (0 points)"
    return (
        f"{100 * p['rate']:.{digits}f}% ({p['k']}/{p['n']}, {100 * p['level']:.0f}% CI "
        f"{100 * p['ci_low']:.{digits}f}-{100 * p['ci_high']:.{digits}f})"
    )


def chebyshev_epsilon(t: int, alpha: float = 0.9) -> float:
    """The ``e`` with ``1 / (4 e^2 t) = 1 - alpha``.

    Then ``|mu_hat - mu| < e`` with probability ``>= alpha``.
    """
    t, alpha = _count(t, "t"), check_real(alpha, "alpha")
    if t < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need t >= 1 and 0 < alpha < 1; got t={t}, alpha={alpha}.")
    return float(np.sqrt(1.0 / (4.0 * (1.0 - alpha) * t)))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    ``a_only``: points where classifier A is right and B wrong; ``b_only``: the reverse. Under the
    null (A and B equally accurate on these points) the split of the ``a_only + b_only`` discordant
    points is Binomial(., 1/2).
    """
    a_only, b_only = _count(a_only, "a_only"), _count(b_only, "b_only")
    n = a_only + b_only
    if n == 0:
        return 1.0
    return float(binomtest(int(a_only), n, 0.5).pvalue)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson (1927) score interval for ``k`` of ``n``, no continuity correction.

    ``(2k + z^2 -+ z sqrt(z^2 + 4k(1 - k/n))) / (2(n + z^2))`` (Newcombe 1998a, Stat. Med.
    17:857, method 3): the building block of Newcombe's paired method 10.
    """
    k, n = _count(k, "k"), _count(n, "n")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need n >= 1 and 0 <= k <= n; got k={k}, n={n}.")
    z = z_value(confidence)
    centre, half = 2.0 * k + z * z, z * np.sqrt(z * z + 4.0 * k * (1.0 - k / n))
    denom = 2.0 * (n + z * z)
    # Clamp: at k = 0 or k = n the limit is exactly 0 or 1, but rounding can leave 1e-17 outside.
    return max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom)


def paired_counts(shell_robust, base_robust) -> tuple[int, int, int, int]:
    """``(a, b, c, d)``: both robust, shell only, base only, neither, from two boolean arrays."""
    shell = np.asarray(shell_robust)
    base = np.asarray(base_robust)
    if shell.shape != base.shape or shell.ndim != 1:
        raise ValueError(
            f"shell_robust and base_robust must be two 1-D arrays of the same length; got "
            f"{shell.shape} and {base.shape}."
        )
    for name, arr in (("shell_robust", shell), ("base_robust", base)):
        # 0/1 integers are accepted too; anything else is a caller's mistake, not a robust flag.
        if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1.")
    shell, base = shell.astype(bool), base.astype(bool)
    return (
        int(np.sum(shell & base)),
        int(np.sum(shell & ~base)),
        int(np.sum(~shell & base)),
        int(np.sum(~shell & ~base)),
    )


def tango_score(delta: float, b: int, c: int, n: int) -> float:
    """Tango's (1998) score statistic ``Z(delta)`` for ``H0: p1 - p2 = delta`` (module docstring).

    ``+-inf`` where the null variance is 0 but the numerator is not (``delta`` is impossible
    given the data); 0 where both are 0 (``b = c = 0``, ``delta = 0``).
    """
    return float(tango_score_arrays(delta, b, c, n))


def paired_difference_counts(
    a: int, b: int, c: int, d: int, *, method: str = DEFAULT_PAIRED_METHOD, confidence: float = 0.95
) -> dict:
    """Shell-minus-base difference of paired proportions from the 2x2 counts, with its interval.

    ``a`` both robust, ``b`` shell only, ``c`` base only, ``d`` neither; ``method`` one of
    :data:`PAIRED_METHODS` (default :data:`DEFAULT_PAIRED_METHOD`). Returns
    ``{"estimate", "ci_low", "ci_high", "shell_only", "base_only", "n", "method", "confidence"}``
    with ``estimate = (b - c) / n``; the interval is fixed-n (module docstring).
    """
    a, b, c, d = (_count(v, name) for v, name in ((a, "a"), (b, "b"), (c, "c"), (d, "d")))
    if min(a, b, c, d) < 0 or a + b + c + d < 1:
        raise ValueError(f"need non-negative counts with n >= 1; got a={a}, b={b}, c={c}, d={d}.")
    check_method(method)
    z_value(confidence)  # validates confidence before any work
    n = a + b + c + d
    low, high = interval_arrays(method, a, b, c, d, confidence)
    return dict(
        estimate=(b - c) / n,
        ci_low=float(low),
        ci_high=float(high),
        shell_only=b,
        base_only=c,
        n=n,
        method=method,
        confidence=confidence,
    )


def paired_difference(
    shell_robust, base_robust, *, method: str = DEFAULT_PAIRED_METHOD, confidence: float = 0.95
) -> dict:
    """:func:`paired_difference_counts` from per-point outcomes (booleans, same points, order)."""
    a, b, c, d = paired_counts(shell_robust, base_robust)
    return paired_difference_counts(a, b, c, d, method=method, confidence=confidence)


def format_paired_difference(p: dict, digits: int = 1) -> str:
    """``"+3.3 points (shell only 1, base only 0 of 30; 95% CI -8.4 to +16.7, tango)"``."""
    return (
        f"{100 * p['estimate']:+.{digits}f} points (shell only {p['shell_only']}, base only "
        f"{p['base_only']} of {p['n']}; {100 * p['confidence']:.0f}% CI "
        f"{100 * p['ci_low']:+.{digits}f} to {100 * p['ci_high']:+.{digits}f}, {p['method']})"
    )
