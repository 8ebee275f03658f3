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
``theta_hat = (b - c) / n``. Two intervals, both fixed-n (evaluate n points, then compute once):

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
  ``C = -c delta (1 - delta)``. The interval is ``{delta : |Z(delta)| <= z_{1 - alpha/2}}``;
  ``Z`` decreases in ``delta``, so each limit is one root, found by Brent's method. At
  ``b = c = 0`` the statistic is 0/0 at ``delta = 0``; it is taken as 0 there (no evidence of a
  difference), which gives the closed form ``+-z^2 / (n + z^2)`` for the limits.

A verdict that stops when the interval is decided needs :mod:`manifold_tf.evaluation.sequential`
instead: these intervals hold for a sample size fixed in advance (a time or point budget counts as
fixed: it does not look at the outcomes), not for one chosen by looking at the data.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binomtest, norm


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial (Clopper-Pearson) interval for ``k`` successes in ``n`` trials."""
    if n < 1 or not 0 <= k <= n or not 0.0 < level < 1.0:
        raise ValueError(
            f"need n >= 1, 0 <= k <= n and 0 < level < 1; got k={k}, n={n}, level={level}."
        )
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
    return (
        f"{100 * p['rate']:.{digits}f}% ({p['k']}/{p['n']}, {100 * p['level']:.0f}% CI "
        f"{100 * p['ci_low']:.{digits}f}-{100 * p['ci_high']:.{digits}f})"
    )


def chebyshev_epsilon(t: int, alpha: float = 0.9) -> float:
    """The ``e`` with ``1 / (4 e^2 t) = 1 - alpha``.

    Then ``|mu_hat - mu| < e`` with probability ``>= alpha``.
    """
    if t < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need t >= 1 and 0 < alpha < 1; got t={t}, alpha={alpha}.")
    return float(np.sqrt(1.0 / (4.0 * (1.0 - alpha) * t)))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    ``a_only``: points where classifier A is right and B wrong; ``b_only``: the reverse. Under the
    null (A and B equally accurate on these points) the split of the ``a_only + b_only`` discordant
    points is Binomial(., 1/2).
    """
    n = int(a_only) + int(b_only)
    if n == 0:
        return 1.0
    return float(binomtest(int(a_only), n, 0.5).pvalue)


def _z(confidence: float) -> float:
    """Two-sided normal quantile ``z_{1 - alpha/2}`` for ``confidence = 1 - alpha``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"need 0 < confidence < 1; got {confidence}.")
    return float(norm.ppf(0.5 + confidence / 2.0))


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson (1927) score interval for ``k`` of ``n``, no continuity correction.

    ``(2k + z^2 -+ z sqrt(z^2 + 4k(1 - k/n))) / (2(n + z^2))`` (Newcombe 1998a, Stat. Med.
    17:857, method 3): the building block of Newcombe's paired method 10.
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need n >= 1 and 0 <= k <= n; got k={k}, n={n}.")
    z = _z(confidence)
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
            f"need two 1-D arrays of the same length; got {shell.shape} and {base.shape}."
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


def _newcombe_paired(a: int, b: int, c: int, d: int, confidence: float) -> tuple[float, float]:
    """Newcombe (1998) method 10; formulas in the module docstring."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, confidence)
    l2, u2 = wilson(a + c, n, confidence)
    # Integers: products of counts up to ~1e5 each stay exact in Python ints.
    prod = (a + b) * (c + d) * (a + c) * (b + d)
    assoc = a * d - b * c
    if prod == 0:
        phi = 0.0
    elif assoc > 0:
        phi = max(assoc - n / 2.0, 0.0) / np.sqrt(float(prod))
    else:
        phi = assoc / np.sqrt(float(prod))
    theta = p1 - p2
    dl1, du1, dl2, du2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
    # max(0, .): with |phi| <= 1 the radicands are >= (x - y)^2 >= 0; the guard is for rounding.
    low = theta - np.sqrt(max(0.0, dl1 * dl1 - 2.0 * phi * dl1 * du2 + du2 * du2))
    high = theta + np.sqrt(max(0.0, du1 * du1 - 2.0 * phi * du1 * dl2 + dl2 * dl2))
    return max(-1.0, float(low)), min(1.0, float(high))


def tango_score(delta: float, b: int, c: int, n: int) -> float:
    """Tango's (1998) score statistic ``Z(delta)`` for ``H0: p1 - p2 = delta`` (module docstring).

    ``+-inf`` where the null variance is 0 but the numerator is not (``delta`` is impossible
    given the data); 0 where both are 0 (``b = c = 0``, ``delta = 0``).
    """
    big_a = 2.0 * n
    big_b = -b - c + (2.0 * n - b + c) * delta
    big_c = -c * delta * (1.0 - delta)
    # B^2 - 4AC >= 0 for delta in [-1, 1] (C <= 0 there); the max() only absorbs rounding.
    q = (np.sqrt(max(0.0, big_b * big_b - 4.0 * big_a * big_c)) - big_b) / (2.0 * big_a)
    var = n * (2.0 * q + delta * (1.0 - delta))
    num = b - c - n * delta
    # The variance vanishes only at delta = +-1 or at b = c = 0, delta = 0; treat tiny values as
    # 0 so the sign of the numerator decides, instead of dividing by rounding noise.
    if var <= 1e-12 * n:
        if abs(num) <= 1e-12 * n:
            return 0.0
        return float(np.copysign(np.inf, num))
    return float(num / np.sqrt(var))


def _tango_paired(b: int, c: int, n: int, confidence: float) -> tuple[float, float]:
    """Tango (1998) score interval: the two roots of ``Z(delta) = -+z`` around ``(b - c) / n``."""
    z = _z(confidence)
    theta = (b - c) / n
    # Z(theta) = 0 and Z decreases, so the upper limit lies in [theta, 1] and the lower one in
    # [-1, theta]; at theta = +-1 (every pair discordant one way) that end is the limit itself.
    high = (
        1.0
        if theta >= 1.0
        else brentq(lambda t: tango_score(t, b, c, n) + z, theta, 1.0, xtol=1e-12)
    )
    low = (
        -1.0
        if theta <= -1.0
        else brentq(lambda t: tango_score(t, b, c, n) - z, -1.0, theta, xtol=1e-12)
    )
    return float(low), float(high)


PAIRED_METHODS = ("newcombe", "tango")


def paired_difference_counts(
    a: int, b: int, c: int, d: int, *, method: str = "newcombe", confidence: float = 0.95
) -> dict:
    """Shell-minus-base difference of paired proportions from the 2x2 counts, with its interval.

    ``a`` both robust, ``b`` shell only, ``c`` base only, ``d`` neither. Returns
    ``{"estimate", "ci_low", "ci_high", "shell_only", "base_only", "n", "method", "confidence"}``
    with ``estimate = (b - c) / n``; the interval is fixed-n (module docstring).
    """
    a, b, c, d = (int(v) for v in (a, b, c, d))
    if min(a, b, c, d) < 0 or a + b + c + d < 1:
        raise ValueError(f"need non-negative counts with n >= 1; got a={a}, b={b}, c={c}, d={d}.")
    if method not in PAIRED_METHODS:
        raise ValueError(f"method must be one of {PAIRED_METHODS}; got {method!r}.")
    _z(confidence)  # validates confidence before any work
    n = a + b + c + d
    if method == "newcombe":
        low, high = _newcombe_paired(a, b, c, d, confidence)
    else:
        low, high = _tango_paired(b, c, n, confidence)
    return dict(
        estimate=(b - c) / n,
        ci_low=low,
        ci_high=high,
        shell_only=b,
        base_only=c,
        n=n,
        method=method,
        confidence=confidence,
    )


def paired_difference(
    shell_robust, base_robust, *, method: str = "newcombe", confidence: float = 0.95
) -> dict:
    """:func:`paired_difference_counts` from per-point outcomes (booleans, same points, order)."""
    a, b, c, d = paired_counts(shell_robust, base_robust)
    return paired_difference_counts(a, b, c, d, method=method, confidence=confidence)


def format_paired_difference(p: dict, digits: int = 1) -> str:
    """``"+3.3 points (shell only 1, base only 0 of 30; 95% CI -6.1 to +11.8, newcombe)"``."""
    return (
        f"{100 * p['estimate']:+.{digits}f} points (shell only {p['shell_only']}, base only "
        f"{p['base_only']} of {p['n']}; {100 * p['confidence']:.0f}% CI "
        f"{100 * p['ci_low']:+.{digits}f} to {100 * p['ci_high']:+.{digits}f}, {p['method']})"
    )
