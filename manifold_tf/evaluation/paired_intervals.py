"""Fixed-n 95% intervals for the difference of two paired proportions, vectorised over tables.

A shell G and its base F are judged on the same ``n`` points, giving the 2x2 counts ``a`` (both
robust), ``b`` (G only), ``c`` (F only), ``d`` (neither); the estimand is
``theta = p1 - p2 = (P(b) - P(c))``, estimated by ``(b - c) / n``. Every method here takes arrays
of counts (any shape, broadcast together) and returns the arrays ``(low, high)`` clipped to
``[-1, 1]``: the reports call them on one table (:func:`~manifold_tf.evaluation.stats.
paired_difference_counts`), :mod:`~manifold_tf.evaluation.coverage` on every table of ``n``
points at once, so the coverage measured is that of the very code the reports run.

- ``"newcombe"``: Newcombe (1998), Stat. Med. 17:2635, method 10 (hybrid score: Wilson limits of
  each margin, square-and-add with a correlation correction ``phi``; formulas in
  :mod:`~manifold_tf.evaluation.stats`). Depends on all four cells.
- ``"newcombe_cc"``: the same paper's method 11: method 10 with continuity-corrected Wilson limits
  (Newcombe 1998a, Stat. Med. 17:857, method 4) for the margins.
- ``"tango"``: Tango (1998), Stat. Med. 17:891, the score interval: ``{delta : |Z(delta)| <= z}``
  with ``Z(delta) = (b - c - n delta) / sqrt(n (2 q + delta (1 - delta)))``, ``q`` the restricted
  maximum likelihood estimate of the ``c``-cell probability. ``Z`` decreases in ``delta``, so each
  limit is found by bisection (60 halvings: below the resolution of a double). Depends on
  ``b, c, n`` only.
- ``"bonett_price"``: Bonett & Price (2012), J. Educ. Behav. Stat. 37:479, the adjusted Wald
  interval: with ``p10 = (b + 1) / (n + 2)``, ``p01 = (c + 1) / (n + 2)``,
  ``(p10 - p01) -+ z sqrt((p10 + p01 - (p10 - p01)^2) / (n + 2))``.
- ``"agresti_min"``: Agresti & Min (2005), Stat. Med. 24:729, the Wald interval after adding 1/2
  to every cell: ``p10 = (b + 1/2) / (n + 2)``, ``p01 = (c + 1/2) / (n + 2)``, the same formula.

:data:`USES_CONCORDANT` says which methods look at ``a`` and ``d`` (the others depend on ``b``,
``c`` and ``n`` alone, which lets the coverage enumeration collapse the concordant cells).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from manifold_tf.validation import check_real

PAIRED_METHODS = ("tango", "newcombe", "newcombe_cc", "bonett_price", "agresti_min")
# The fixed-n paired interval of every report: Tango's score interval, chosen by its exact
# coverage over the regime of the verdicts (few discordant points, mostly one way; n <= 300;
# :mod:`manifold_tf.evaluation.coverage`, tests/test_paired_coverage.py): worst 0.933, mean 0.963
# where Newcombe's method 10 had worst 0.884; the only one of these with worst >= 0.93.
DEFAULT_METHOD = "tango"
USES_CONCORDANT = {m: m.startswith("newcombe") for m in PAIRED_METHODS}
# What a report says about each interval (summary.json's "interval", the figure's axis label).
DESCRIPTIONS = {
    "tango": "Tango 1998 score interval",
    "newcombe": "Newcombe 1998 method 10 (hybrid score)",
    "newcombe_cc": "Newcombe 1998 method 11 (hybrid score, continuity-corrected)",
    "bonett_price": "Bonett & Price 2012 adjusted Wald",
    "agresti_min": "Agresti & Min 2005 adjusted Wald (+1/2 per cell)",
}


def z_value(confidence: float) -> float:
    """Two-sided normal quantile ``z_{1 - alpha/2}`` for ``confidence = 1 - alpha``."""
    if not 0.0 < check_real(confidence, "confidence") < 1.0:
        raise ValueError(f"need 0 < confidence < 1; got {confidence}.")
    return float(norm.ppf(0.5 + confidence / 2.0))


def check_method(method: str) -> str:
    """``method`` if it names an interval here, else a ``ValueError`` listing the names."""
    if method not in PAIRED_METHODS:
        raise ValueError(f"paired interval method must be one of {PAIRED_METHODS}; got {method!r}.")
    return method


def wilson_arrays(k, n, z: float, cc: bool = False):
    """Wilson score limits for ``k`` of ``n`` (arrays), optionally continuity-corrected.

    Without correction ``(2k + z^2 -+ z sqrt(z^2 + 4k(1 - k/n))) / (2(n + z^2))``; with it
    Newcombe (1998a) method 4: ``(2k + z^2 - 1 - z sqrt(z^2 - 2 - 1/n + 4p(n(1 - p) + 1)))`` over
    the same denominator for the lower limit (0 at ``k = 0``) and
    ``(2k + z^2 + 1 + z sqrt(z^2 + 2 - 1/n + 4p(n(1 - p) - 1)))`` for the upper (1 at ``k = n``).
    """
    k, n = np.asarray(k, float), np.asarray(n, float)
    p, z2, denom = k / n, z * z, 2.0 * (n + z * z)
    if not cc:
        half = z * np.sqrt(z2 + 4.0 * k * (1.0 - p))
        low, high = (2.0 * k + z2 - half) / denom, (2.0 * k + z2 + half) / denom
    else:
        # The radicands are >= 0 away from k = 0 (lower) and k = n (upper), where the limits are
        # set exactly below; the max() keeps those cells from warning before they are replaced.
        rl = np.maximum(z2 - 2.0 - 1.0 / n + 4.0 * p * (n * (1.0 - p) + 1.0), 0.0)
        ru = np.maximum(z2 + 2.0 - 1.0 / n + 4.0 * p * (n * (1.0 - p) - 1.0), 0.0)
        low = np.where(k == 0, 0.0, (2.0 * k + z2 - 1.0 - z * np.sqrt(rl)) / denom)
        high = np.where(k == n, 1.0, (2.0 * k + z2 + 1.0 + z * np.sqrt(ru)) / denom)
    # Clamp: at k = 0 or k = n the limit is exactly 0 or 1, but rounding can leave 1e-17 outside.
    return np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)


def _newcombe(a, b, c, d, z: float, cc: bool):
    a, b, c, d = (np.asarray(v, float) for v in (a, b, c, d))
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_arrays(a + b, n, z, cc)
    l2, u2 = wilson_arrays(a + c, n, z, cc)
    # Floats: the product of four margins reaches ~1e19 at n = 1e5, still exact enough in a double
    # for a square root; Python ints are not available to a vectorised code path.
    prod = (a + b) * (c + d) * (a + c) * (b + d)
    assoc = a * d - b * c
    root = np.sqrt(np.where(prod > 0, prod, 1.0))
    phi = np.where(assoc > 0, np.maximum(assoc - n / 2.0, 0.0), assoc) / root
    phi = np.where(prod > 0, phi, 0.0)
    theta = p1 - p2
    dl1, du1, dl2, du2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
    # max(0, .): with |phi| <= 1 the radicands are >= (x - y)^2 >= 0; the guard is for rounding.
    low = theta - np.sqrt(np.maximum(0.0, dl1 * dl1 - 2.0 * phi * dl1 * du2 + du2 * du2))
    high = theta + np.sqrt(np.maximum(0.0, du1 * du1 - 2.0 * phi * du1 * dl2 + dl2 * dl2))
    return low, high


def tango_score_arrays(delta, b, c, n):
    """Tango's ``Z(delta)`` (arrays); ``+-inf`` where the null variance is 0 but the numerator is
    not, 0 where both are (``b = c = 0``, ``delta = 0``)."""
    delta, b, c, n = (np.asarray(v, float) for v in (delta, b, c, n))
    big_a = 2.0 * n
    big_b = -b - c + (2.0 * n - b + c) * delta
    big_c = -c * delta * (1.0 - delta)
    # B^2 - 4AC >= 0 for delta in [-1, 1] (C <= 0 there); the max() only absorbs rounding.
    q = (np.sqrt(np.maximum(0.0, big_b * big_b - 4.0 * big_a * big_c)) - big_b) / (2.0 * big_a)
    var = n * (2.0 * q + delta * (1.0 - delta))
    num = b - c - n * delta
    # The variance vanishes only at delta = +-1 or at b = c = 0, delta = 0; tiny values count as 0
    # so that the sign of the numerator decides, instead of a division by rounding noise.
    degenerate = var <= 1e-12 * n
    with np.errstate(divide="ignore", invalid="ignore"):
        z = num / np.sqrt(np.where(degenerate, 1.0, var))
    edge = np.where(np.abs(num) <= 1e-12 * n, 0.0, np.copysign(np.inf, num))
    return np.where(degenerate, edge, z)


def _tango(b, c, n, z: float, halvings: int = 60):
    b, c, n = np.broadcast_arrays(*(np.asarray(v, float) for v in (b, c, n)))
    theta = (b - c) / n
    limits = []
    # Z(theta) = 0 and Z decreases: the upper limit is the last delta in [theta, 1] with
    # Z >= -z, the lower the first in [-1, theta] with Z <= z. Bisection keeps `inside` on the
    # accepted side and `outside` on the rejected one; an end whose Z is accepted is the limit.
    for sign, end in ((1.0, 1.0), (-1.0, -1.0)):
        inside, outside = theta.copy(), np.full_like(theta, end)
        accepted_end = sign * tango_score_arrays(outside, b, c, n) >= -z
        for _ in range(halvings):
            mid = 0.5 * (inside + outside)
            ok = sign * tango_score_arrays(mid, b, c, n) >= -z
            inside, outside = np.where(ok, mid, inside), np.where(ok, outside, mid)
        limits.append(np.where(accepted_end, end, 0.5 * (inside + outside)))
    high, low = limits
    return low, high


def _adjusted_wald(b, c, n, z: float, add: float):
    b, c, n = (np.asarray(v, float) for v in (b, c, n))
    m = n + 2.0
    p10, p01 = (b + add) / m, (c + add) / m
    centre = p10 - p01
    half = z * np.sqrt(np.maximum(0.0, p10 + p01 - centre * centre) / m)
    return centre - half, centre + half


def interval_arrays(method: str, a, b, c, d, confidence: float = 0.95):
    """``(low, high)``: the ``method`` interval of every table ``(a, b, c, d)`` (arrays, any shape,
    broadcast; non-negative counts with ``n = a + b + c + d >= 1``), in ``[-1, 1]``."""
    check_method(method)
    z = z_value(confidence)
    counts = [np.asarray(v) for v in (a, b, c, d)]
    for name, v in zip("abcd", counts, strict=True):
        if v.dtype.kind not in "iuf" or not np.all(np.isfinite(v) & (v >= 0) & (v == np.round(v))):
            raise ValueError(f"{name} must hold counts (integers >= 0); got {v!r}."[:300])
    if np.any(sum(counts) < 1):
        raise ValueError("need n = a + b + c + d >= 1 in every table.")
    if method in ("newcombe", "newcombe_cc"):
        low, high = _newcombe(a, b, c, d, z, cc=method == "newcombe_cc")
    else:
        n = np.asarray(a) + np.asarray(b) + np.asarray(c) + np.asarray(d)
        if method == "tango":
            low, high = _tango(b, c, n, z)
        else:
            low, high = _adjusted_wald(b, c, n, z, 1.0 if method == "bonett_price" else 0.5)
    return np.clip(low, -1.0, 1.0), np.clip(high, -1.0, 1.0)
