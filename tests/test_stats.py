"""Paired differences of proportions (Newcombe 1998 method 10, Tango 1998) against published
figures and independent computations; the existing report statistics keep their outputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, norm

from manifold_tf.evaluation import stats

Z95 = norm.ppf(0.975)


def counts(a, b, c, d, method, confidence=0.95):
    r = stats.paired_difference_counts(a, b, c, d, method=method, confidence=confidence)
    return r["ci_low"], r["ci_high"]


# --- published worked examples ---------------------------------------------------------------


def test_newcombe_method10_newcombe_1998_example():
    """Newcombe (1998) Stat. Med. 17:2635, Table II, example a = 36, b = 12, c = 2, d = 0:
    method 10 gives 0.0569 to 0.3404 (d = 0, so phi = 0 and the phi correction plays no part)."""
    r = stats.paired_difference_counts(36, 12, 2, 0, method="newcombe")
    assert r["estimate"] == pytest.approx(0.2)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.0569, 0.3404), abs=5e-5)


def test_cavo_2012_example_fagerland():
    """Complete response before/after consolidation therapy (Cavo et al. 2012), the worked example
    of Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), ch. 8,
    as printed by their R package contingencytables (tests/testthat/test-ch8.R):
    table [[59, 6], [16, 80]], estimate -0.0621; Newcombe square-and-add (= method 10, phi > 0
    here: ad - bc = 4624 > n/2) -0.1186 to -0.0046; Tango asymptotic score -0.1240 to -0.0054."""
    assert counts(59, 6, 16, 80, "newcombe") == pytest.approx((-0.1186, -0.0046), abs=5e-5)
    assert counts(59, 6, 16, 80, "tango") == pytest.approx((-0.1240, -0.0054), abs=5e-5)
    assert stats.paired_difference_counts(59, 6, 16, 80)["estimate"] == pytest.approx(
        -0.0621, abs=5e-5
    )


def test_tango_bentur_2009_example():
    """Airway hyper-responsiveness before/after stem cell transplantation (Bentur et al. 2009),
    Fagerland, Lydersen & Laake (2014) Stat. Med. 33:2850: a, b, c, d = 1, 1, 7, 12, estimate
    -0.286, Tango score interval -0.517 to -0.026 (also the figure the R package ratesci checks its
    score function against, cross-checked there with PropCIs::scoreci.mp)."""
    assert counts(1, 1, 7, 12, "tango") == pytest.approx((-0.517, -0.026), abs=5e-4)


def test_method_md_example_n30():
    """METHOD.md, "Deciding": n = 30, b = 1, c = 0, 11 both robust gives about -6..+12 points
    (Newcombe method 10) where each marginal Clopper-Pearson interval is 37 points wide."""
    lo, hi = counts(11, 1, 0, 18, "newcombe")
    assert round(100 * lo) == -6 and round(100 * hi) == 12
    shell = stats.proportion(12, 30)
    assert 100 * (shell["ci_high"] - shell["ci_low"]) == pytest.approx(37, abs=1)
    assert hi - lo < 0.2


# --- independent computations ----------------------------------------------------------------


def newcombe_from_scipy_wilson(a, b, c, d, confidence=0.95):
    """Method 10 written out again on scipy's Wilson interval (not the module's)."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    ci1 = binomtest(a + b, n).proportion_ci(confidence_level=confidence, method="wilson")
    ci2 = binomtest(a + c, n).proportion_ci(confidence_level=confidence, method="wilson")
    e, f, g, h = a + b, c + d, a + c, b + d
    num = a * d - b * c
    num = max(num - n / 2, 0) if num > 0 else num
    phi = 0.0 if e * f * g * h == 0 else num / np.sqrt(e * f * g * h)
    dl1, du1, dl2, du2 = p1 - ci1.low, ci1.high - p1, p2 - ci2.low, ci2.high - p2
    return (
        p1 - p2 - np.sqrt(dl1**2 - 2 * phi * dl1 * du2 + du2**2),
        p1 - p2 + np.sqrt(du1**2 - 2 * phi * du1 * dl2 + dl2**2),
    )


TABLES = [
    (36, 12, 2, 0),
    (59, 6, 16, 80),
    (1, 1, 7, 12),
    (11, 1, 0, 18),
    (263, 21, 3, 18),
    (5, 3, 3, 9),
    (0, 4, 1, 0),
    (40, 0, 0, 10),
    (0, 0, 0, 25),
    (90, 6, 1, 3),
]


@pytest.mark.parametrize("table", TABLES)
def test_newcombe_matches_scipy_wilson_reconstruction(table):
    for conf in (0.90, 0.95, 0.99):
        got = counts(*table, "newcombe", conf)
        assert got == pytest.approx(newcombe_from_scipy_wilson(*table, conf), abs=1e-10)


def test_newcombe_phi_continuity_correction():
    """Newcombe's corrected phi for ad > bc is max(ad - bc - n/2, 0) / sqrt(efgh): it shrinks a
    positive association towards 0 and never turns it negative. a, b, c, d = 1, 1, 1, 2 has
    ad - bc = 1 < n/2 = 2.5, so phi = 0: the interval is the plain square-and-add one."""
    a, b, c, d = 1, 1, 1, 2
    n = 5
    l1, u1 = stats.wilson(a + b, n)
    l2, u2 = stats.wilson(a + c, n)
    assert counts(a, b, c, d, "newcombe") == pytest.approx(
        (-np.hypot(0.4 - l1, u2 - 0.4), np.hypot(u1 - 0.4, 0.4 - l2)), abs=1e-12
    )
    # A strong positive association (ad - bc >> n/2) narrows the interval against phi = 0.
    lo, hi = counts(40, 5, 3, 40, "newcombe")
    p = 45 / 88, 43 / 88
    w1, w2 = stats.wilson(45, 88), stats.wilson(43, 88)
    assert hi - lo < (np.hypot(p[0] - w1[0], w2[1] - p[1]) + np.hypot(w1[1] - p[0], p[1] - w2[0]))


def tango_by_quartic(b, c, n, confidence=0.95):
    """Tango's limits as roots of a quartic (the route of Yang, Sun & Hardin 2013, Stat. Med.
    32:1336, "A non-iterative implementation of Tango's score confidence interval"): on Z^2 = z^2,
    q = ((b - c - n delta)^2 / (z^2 n) - delta (1 - delta)) / 2 must solve the restricted-MLE
    quadratic 2n q^2 + B(delta) q + C(delta) = 0; keep real roots in [-1, 1] with q >= 0 equal to
    the quadratic's larger root."""
    z2 = norm.ppf(0.5 + confidence / 2) ** 2
    P = np.polynomial.Polynomial
    dl = P([0, 1])
    q = ((b - c - n * dl) ** 2 / (z2 * n) - dl * (1 - dl)) / 2
    B = -b - c + (2 * n - b + c) * dl
    C = -c * dl * (1 - dl)
    poly = 2 * n * q * q + B * q + C
    roots = []
    for r in poly.roots():
        if abs(r.imag) > 1e-7 or not -1 <= r.real <= 1:
            continue
        t = r.real
        qt, bt, ct = q(t), B(t), C(t)
        mle = (np.sqrt(bt * bt - 8 * n * ct) - bt) / (4 * n)
        if qt >= -1e-9 and abs(qt - mle) < 1e-6:
            roots.append(t)
    theta = (b - c) / n
    lows, highs = [r for r in roots if r <= theta], [r for r in roots if r >= theta]
    return (min(lows) if lows else -1.0), (max(highs) if highs else 1.0)


def tango_by_grid(b, c, n, confidence=0.95, step=1e-5):
    """Inversion of the score test on a grid: the accepted deltas' hull."""
    z = norm.ppf(0.5 + confidence / 2)
    grid = np.arange(-1.0, 1.0 + step / 2, step)
    ok = [t for t in grid if abs(stats.tango_score(t, b, c, n)) <= z]
    return ok[0], ok[-1]


@pytest.mark.parametrize(
    "table",
    [
        (1, 1, 7, 12),
        (59, 6, 16, 80),
        (36, 12, 2, 0),
        (5, 3, 3, 9),
        (0, 4, 1, 0),
        (11, 1, 0, 18),
        (263, 21, 3, 18),
    ],
)
def test_tango_root_finding_matches_quartic_and_grid(table):
    a, b, c, d = table
    n = a + b + c + d
    got = counts(*table, "tango")
    assert got == pytest.approx(tango_by_quartic(b, c, n), abs=1e-7)
    assert got == pytest.approx(tango_by_grid(b, c, n, step=1e-4), abs=1.1e-4)


def test_tango_boundaries():
    """b = c = 0: Z is 0/0 at delta = 0 (taken as 0) and -+sqrt(n|delta|/(1 -+ delta)) elsewhere,
    so the limits are -+z^2 / (n + z^2). All pairs discordant one way (b = n): the upper limit
    is 1 and the lower one solves sqrt(n (1 - delta) / (1 + delta)) = z."""
    n = 30
    z2 = Z95**2
    assert counts(30, 0, 0, 0, "tango") == pytest.approx((-z2 / (n + z2), z2 / (n + z2)))
    assert counts(0, 0, 0, 30, "tango") == pytest.approx((-z2 / (n + z2), z2 / (n + z2)))
    assert counts(0, 30, 0, 0, "tango") == pytest.approx(((n - z2) / (n + z2), 1.0))
    assert counts(0, 0, 30, 0, "tango") == pytest.approx((-1.0, -(n - z2) / (n + z2)))
    assert stats.tango_score(0.0, 0, 0, 10) == 0.0
    assert stats.tango_score(1.0, 3, 0, 10) == -np.inf


@pytest.mark.parametrize("method", stats.PAIRED_METHODS)
def test_interval_properties(method):
    rng = np.random.default_rng(3)
    for _ in range(40):
        a, b, c, d = rng.multinomial(rng.integers(1, 120), rng.dirichlet(np.ones(4)))
        r = stats.paired_difference_counts(a, b, c, d, method=method)
        assert -1.0 <= r["ci_low"] <= r["estimate"] <= r["ci_high"] <= 1.0
        # Swapping the classifiers mirrors the interval.
        lo, hi = counts(a, c, b, d, method)
        assert (lo, hi) == pytest.approx((-r["ci_high"], -r["ci_low"]), abs=1e-9)
        # A higher confidence gives a wider interval.
        lo99, hi99 = counts(a, b, c, d, method, 0.99)
        assert lo99 <= r["ci_low"] + 1e-12 and hi99 >= r["ci_high"] - 1e-12


def test_paired_difference_from_outcomes():
    shell = np.array([1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    base = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    assert stats.paired_counts(shell, base) == (2, 3, 1, 2)
    for method in stats.PAIRED_METHODS:
        r = stats.paired_difference(shell, base, method=method)
        assert r == stats.paired_difference_counts(2, 3, 1, 2, method=method)
        assert (r["shell_only"], r["base_only"], r["n"], r["method"]) == (3, 1, 8, method)
        assert r["estimate"] == pytest.approx(0.25)
    assert stats.paired_counts([1, 0, 1], [0, 0, 1]) == (1, 1, 0, 1)  # 0/1 integers accepted
    with pytest.raises(ValueError):
        stats.paired_counts([1, 2], [0, 1])
    with pytest.raises(ValueError):
        stats.paired_counts([True, False], [True])
    with pytest.raises(ValueError):
        stats.paired_difference_counts(0, 0, 0, 0)
    with pytest.raises(ValueError):
        stats.paired_difference_counts(1, 2, 3, 4, method="wald")
    with pytest.raises(ValueError):
        stats.paired_difference_counts(1, 2, 3, 4, confidence=1.0)


def test_format_paired_difference():
    r = stats.paired_difference_counts(11, 1, 0, 18, method="newcombe")
    assert stats.format_paired_difference(r) == (
        "+3.3 points (shell only 1, base only 0 of 30; 95% CI -5.7 to +12.3, newcombe)"
    )


def test_wilson_known_values():
    # Wilson (1927) interval for 48/50 at 95%, as given by scipy's independent implementation.
    assert stats.wilson(48, 50) == pytest.approx((0.8653990931, 0.9889611157), abs=1e-9)
    assert stats.wilson(0, 10) == pytest.approx((0.0, Z95**2 / (10 + Z95**2)))


def test_existing_report_statistics_unchanged():
    """The functions reports already use keep their outputs."""
    assert stats.clopper_pearson(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-5)
    assert stats.proportion(77, 150)["rate"] == pytest.approx(77 / 150)
    assert stats.format_proportion(stats.proportion(77, 150)) == "51.3% (77/150, 95% CI 43.0-59.6)"
    assert stats.format_proportion(stats.proportion(0, 0)) == "n/a (0 points)"
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(10, 0) == pytest.approx(2 * 0.5**10)
    assert stats.chebyshev_epsilon(250, 0.9) == pytest.approx(0.1)
