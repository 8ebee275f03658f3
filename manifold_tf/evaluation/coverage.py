"""Exact coverage of the paired intervals, by enumerating every 2x2 table of ``n`` points.

The ``n`` points are i.i.d. draws of a pair of outcomes with cell probabilities ``p11`` (both
robust), ``p10`` (shell only), ``p01`` (base only) and ``p00 = 1 - p11 - p10 - p01``; the counts
``(a, b, c, d)`` are then multinomial and the interval covers ``theta = p10 - p01`` or not. Its
exact coverage is the sum of the probabilities of the tables whose interval contains ``theta``:
no simulation, no error bar. A method that depends on ``b, c, n`` alone
(:data:`~manifold_tf.evaluation.paired_intervals.USES_CONCORDANT`) is enumerated over the
``(b, c)`` pairs with the trinomial ``(b, c, a + d)`` (about ``n^2 / 2`` tables: 45 000 at
``n = 300``); the others over every ``(a, b, c)`` (about ``n^3 / 6``: 4.6 million at
``n = 300``). Each method's limits at each ``n`` are computed once and cached, so a grid of
probabilities at the same ``n`` costs one probability vector per case.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.special import gammaln, xlogy

from manifold_tf.evaluation.paired_intervals import USES_CONCORDANT, check_method, interval_arrays

# A limit that equals theta up to rounding covers it: the limits are computed to ~1e-15.
_TOLERANCE = 1e-12

# The regime of every verdict here: few discordant points, mostly one way (the shell's; issue
# 23). ``(p10, p01)``: shell only, base only; each is paired with several concordant splits.
DISCORDANT = tuple((p10, p01) for p10 in (0.02, 0.05, 0.1, 0.2) for p01 in (0.0, 0.01, 0.02, 0.05))
# The share of the concordant points that are robust for both (the rest: for neither).
CONCORDANT_SHARES = (0.1, 0.5, 0.9)
GRID_N = (20, 30, 60, 100, 200, 300)


def _tables(n: int, concordant: bool):
    """Every table of ``n`` points as arrays ``(a, b, c, d)``; without ``concordant``, one row per
    ``(b, c)`` with ``a = 0`` and ``d = n - b - c`` standing for all the concordant splits."""
    b, c = np.divmod(np.arange((n + 1) * (n + 1)), n + 1)
    keep = b + c <= n
    b, c = b[keep], c[keep]
    if not concordant:
        return np.zeros_like(b), b, c, n - b - c
    # For each (b, c): a = 0 .. n - b - c, built without a Python loop over the pairs.
    sizes = n - b - c + 1
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    a = np.arange(int(sizes.sum())) - starts
    b, c = np.repeat(b, sizes), np.repeat(c, sizes)
    return a, b, c, n - a - b - c


@functools.lru_cache(maxsize=8)
def _limits(method: str, n: int, confidence: float):
    a, b, c, d = _tables(n, USES_CONCORDANT[method])
    low, high = interval_arrays(method, a, b, c, d, confidence)
    # Small integers: at n = 300 the 4.6 million tables of a method that reads every cell would
    # hold 150 MB in int64 counts; int32 halves that (the limits stay doubles).
    a, b, c, d = (v.astype(np.int32) for v in (a, b, c, d))
    return a, b, c, d, low, high


def _check(n, p10, p01, p11) -> float:
    if int(n) != n or n < 1:
        raise ValueError(f"need an integer n >= 1; got {n}.")
    p00 = 1.0 - p10 - p01 - p11
    if min(p10, p01, p11) < 0.0 or p00 < -1e-12:
        raise ValueError(
            f"need cell probabilities >= 0 summing to at most 1; got p10={p10}, p01={p01}, "
            f"p11={p11}."
        )
    return max(p00, 0.0)


def paired_coverage(
    method: str, n: int, p10: float, p01: float, p11: float, confidence: float = 0.95
) -> dict:
    """Exact coverage of the ``method`` paired interval for ``n`` points with cell probabilities
    ``p10`` (shell only), ``p01`` (base only), ``p11`` (both; neither is the rest).

    Returns ``{"coverage", "below", "above", "mean_width", ...}``: the probability that the
    interval contains ``theta = p10 - p01``, that it lies wholly below / above it, and its
    expected width (units of a proportion: 0.1 = 10 points), with the inputs echoed.
    """
    check_method(method)
    p00 = _check(n, p10, p01, p11)
    a, b, c, d, low, high = _limits(method, int(n), float(confidence))
    n = int(n)
    if USES_CONCORDANT[method]:
        counts, probs = (a, b, c, d), (p11, p10, p01, p00)
    else:
        counts, probs = (b, c, d), (p10, p01, p11 + p00)
    # The multinomial probability of each table; xlogy makes a cell of probability 0 weigh 1 when
    # empty and 0 otherwise.
    log_p = gammaln(n + 1.0)
    for k, p in zip(counts, probs, strict=True):
        log_p = log_p + xlogy(k, p) - gammaln(k + 1.0)
    weight = np.exp(log_p)
    theta = p10 - p01
    below = high < theta - _TOLERANCE
    above = low > theta + _TOLERANCE
    return dict(
        method=method,
        n=n,
        p10=p10,
        p01=p01,
        p11=p11,
        confidence=confidence,
        coverage=float(weight[~below & ~above].sum()),
        below=float(weight[below].sum()),
        above=float(weight[above].sum()),
        mean_width=float(weight @ (high - low)),
        total_probability=float(weight.sum()),
    )


def coverage_grid(
    method: str,
    ns=GRID_N,
    discordant=DISCORDANT,
    shares=CONCORDANT_SHARES,
    confidence: float = 0.95,
) -> dict:
    """:func:`paired_coverage` over every ``n`` x ``(p10, p01)`` x concordant share.

    Returns ``{"cases": [...], "worst", "mean", "mean_width", "worst_case"}``: the minimum and the
    (unweighted) mean coverage over the cases and their mean expected width.
    """
    cases = [
        paired_coverage(method, n, p10, p01, share * (1.0 - p10 - p01), confidence)
        for n in ns
        for p10, p01 in discordant
        for share in shares
    ]
    cover = np.array([r["coverage"] for r in cases])
    return dict(
        method=method,
        cases=cases,
        worst=float(cover.min()),
        mean=float(cover.mean()),
        mean_width=float(np.mean([r["mean_width"] for r in cases])),
        worst_case=cases[int(cover.argmin())],
    )
