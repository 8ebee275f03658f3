"""Exact coverage of the paired intervals (every 2x2 table of n points enumerated), and the
enumeration itself checked against oracles: a brute force over every sequence of points, Monte
Carlo, intervals whose coverage is known in closed form, the collapsed against the full sum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import binom

from manifold_tf.evaluation import coverage, paired_intervals, stats

FAST_N = (30, 60, 100)


def test_default_covers_on_the_fast_grid():
    """The goal of issue 23 for the default interval: worst >= 0.93, mean >= 0.95."""
    g = coverage.coverage_grid(stats.DEFAULT_PAIRED_METHOD, ns=FAST_N, shares=(0.5,))
    assert len(g["cases"]) == len(FAST_N) * len(coverage.DISCORDANT)
    assert g["worst"] >= 0.93, g["worst_case"]
    assert g["mean"] >= 0.95


def test_newcombe_undercovers_where_the_default_does_not():
    """Why the default changed: 2% shell-only points, none base-only, n = 100 (issue 23: 0.884)."""
    bad = coverage.paired_coverage("newcombe", 100, 0.02, 0.0, 0.49)
    assert bad["coverage"] == pytest.approx(0.884, abs=5e-4)
    assert bad["below"] > 0.1  # it misses by lying below the shell's true gain
    good = coverage.paired_coverage(stats.DEFAULT_PAIRED_METHOD, 100, 0.02, 0.0, 0.49)
    assert good["coverage"] >= 0.95


def _brute_force(method, n, p11, p10, p01):
    """Coverage summed over all 4^n sequences of points (each point's cell drawn independently),
    every interval computed one table at a time by the reports' scalar path."""
    p = {"a": p11, "b": p10, "c": p01, "d": 1.0 - p11 - p10 - p01}
    theta, total, width = p10 - p01, 0.0, 0.0
    cache = {}
    for seq in itertools.product("abcd", repeat=n):
        table = tuple(seq.count(k) for k in "abcd")
        if table not in cache:
            r = stats.paired_difference_counts(*table, method=method)
            cache[table] = (r["ci_low"], r["ci_high"])
        low, high = cache[table]
        prob = float(np.prod([p[k] for k in seq]))
        total += prob * (low <= theta <= high)
        width += prob * (high - low)
    return total, width


@pytest.mark.parametrize("method", ["tango", "newcombe", "bonett_price"])
def test_matches_brute_force_over_sequences(method):
    for n, p11, p10, p01 in ((5, 0.3, 0.3, 0.1), (4, 0.1, 0.45, 0.0)):
        r = coverage.paired_coverage(method, n, p10, p01, p11)
        cover, width = _brute_force(method, n, p11, p10, p01)
        assert r["coverage"] == pytest.approx(cover, abs=1e-12)
        assert r["mean_width"] == pytest.approx(width, abs=1e-12)
        assert r["total_probability"] == pytest.approx(1.0, abs=1e-12)
        assert r["coverage"] + r["below"] + r["above"] == pytest.approx(1.0, abs=1e-12)


def test_matches_monte_carlo():
    n, p = 60, (0.4, 0.1, 0.02, 0.48)  # p11, p10, p01, p00
    exact = coverage.paired_coverage("newcombe", n, p[1], p[2], p[0])["coverage"]
    tables = np.random.default_rng(7).multinomial(n, p, size=40_000)
    low, high = paired_intervals.interval_arrays("newcombe", *tables.T)
    theta = p[1] - p[2]
    mc = np.mean((low <= theta) & (theta <= high))
    assert abs(mc - exact) < 4.0 * np.sqrt(exact * (1.0 - exact) / len(tables))


def test_closed_form_intervals(monkeypatch):
    """An interval of all of [-1, 1] covers with probability 1 and is 2 wide; the point interval
    at (b - c) / n covers exactly when b - c = n theta: with no base-only points, a binomial."""

    def everything(m, a, b, c, d, conf):
        return -np.ones(a.shape), np.ones(a.shape)

    monkeypatch.setattr(coverage, "interval_arrays", everything)
    coverage._limits.cache_clear()
    wide = coverage.paired_coverage("tango", 40, 0.1, 0.05, 0.3)
    assert wide["coverage"] == pytest.approx(1.0, abs=1e-12)
    assert wide["mean_width"] == pytest.approx(2.0, abs=1e-12)

    def point(m, a, b, c, d, conf):
        est = (b - c) / (a + b + c + d)
        return est, est

    monkeypatch.setattr(coverage, "interval_arrays", point)
    coverage._limits.cache_clear()
    r = coverage.paired_coverage("tango", 40, 0.1, 0.0, 0.3)  # theta = 0.1: b = 4
    assert r["coverage"] == pytest.approx(binom.pmf(4, 40, 0.1), abs=1e-12)
    assert r["mean_width"] == 0.0
    assert r["below"] == pytest.approx(binom.cdf(3, 40, 0.1), abs=1e-12)
    coverage._limits.cache_clear()


def test_collapsed_sum_equals_full_sum(monkeypatch):
    """Tango depends on b, c, n alone: summing the trinomial over (b, c) gives what the full
    multinomial over every (a, b, c, d) gives."""
    collapsed = coverage.paired_coverage("tango", 50, 0.1, 0.02, 0.2)
    monkeypatch.setitem(coverage.USES_CONCORDANT, "tango", True)
    coverage._limits.cache_clear()
    full = coverage.paired_coverage("tango", 50, 0.1, 0.02, 0.2)
    coverage._limits.cache_clear()
    for key in ("coverage", "below", "above", "mean_width"):
        assert full[key] == pytest.approx(collapsed[key], abs=1e-12)


def test_concordant_blind_methods_ignore_the_split():
    tables = np.array([(a, 3, 1, 26 - a) for a in range(27)])
    for method, uses in paired_intervals.USES_CONCORDANT.items():
        low, high = paired_intervals.interval_arrays(method, *tables.T)
        assert (np.ptp(low) + np.ptp(high) > 1e-9) == uses, method


def test_bad_input():
    with pytest.raises(ValueError, match="paired interval method must be one of"):
        coverage.paired_coverage("wald", 30, 0.1, 0.0, 0.5)
    with pytest.raises(ValueError, match="method must be one of"):
        stats.paired_difference_counts(1, 2, 3, 4, method="exact")
    with pytest.raises(ValueError, match="cell probabilities"):
        coverage.paired_coverage("tango", 30, 0.6, 0.0, 0.5)
    with pytest.raises(ValueError, match="cell probabilities"):
        coverage.paired_coverage("tango", 30, -0.1, 0.0, 0.5)
    with pytest.raises(ValueError, match="integer n"):
        coverage.paired_coverage("tango", 0, 0.1, 0.0, 0.5)


def test_the_verdict_names_the_interval_it_used():
    """The verdict's differences carry the method and its description; the setting selects it,
    the default is stats' default, and an unknown name is refused with the list of names."""
    from manifold_tf.evaluation import adaptive_report  # deferred: imports TensorFlow
    from manifold_tf.evaluation.config import AdaptiveConfig  # deferred: as above

    records = [
        dict(
            base_broken_by=["", "clean", "apgd_ce", "", "", "bpda"],
            shell_broken_by=["", "", "", "clean", "", ""],
            cost=dict(base_passes=60, shell_predictions=12),
            seconds=dict(total=1.0),
        )
    ]
    ok = dict(passed=True, failures=[])
    for method in (None, *stats.PAIRED_METHODS):
        suite = dict(shell_attacks=["transfer_cw", "bpda"])
        if method:
            suite["paired_interval"] = method
        v = adaptive_report.summarize(records, dict(suite=suite), ok)
        used = method or stats.DEFAULT_PAIRED_METHOD
        for key in ("robust_accuracy", "clean_accuracy"):
            d = v["difference"][key]
            assert d["method"] == used
            assert d["interval"] == f"fixed-n, {stats.DESCRIPTIONS[used]}"
        # Robust: both 2, shell only 3, base only 1, neither 0.
        want = stats.paired_difference_counts(2, 3, 1, 0, method=used)
        got = v["difference"]["robust_accuracy"]
        assert {k: got[k] for k in want} == want
        assert f"{used})" in adaptive_report.verdict_lines(v)
    assert AdaptiveConfig().paired_interval == stats.DEFAULT_PAIRED_METHOD
    with pytest.raises(ValueError, match="paired_interval"):
        AdaptiveConfig(paired_interval="wald")


def test_the_flag_reaches_the_config():
    from absl import flags  # deferred: the CLI (and TensorFlow) only for this test

    from manifold_tf.cli import evaluate  # deferred: as above

    cases = (([], stats.DEFAULT_PAIRED_METHOD), (["--paired_interval=newcombe"], "newcombe"))
    for argv, want in cases:
        flag_values = flags.FlagValues()
        evaluate.define_flags(flag_values)
        flag_values(["evaluate.py", "--shell=mcn", *argv])
        assert evaluate.config_from_flags(flag_values).adaptive.paired_interval == want
    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values)
    with pytest.raises(flags.IllegalFlagValueError):
        flag_values(["evaluate.py", "--paired_interval=wald"])


@pytest.mark.slow
def test_default_covers_on_the_full_grid():
    """n in 20, 30, 60, 100, 200, 300; 16 discordance patterns; three concordant splits."""
    g = coverage.coverage_grid(stats.DEFAULT_PAIRED_METHOD)
    assert len(g["cases"]) == 6 * 16 * 3
    assert g["worst"] >= 0.93, g["worst_case"]
    assert g["mean"] >= 0.95
