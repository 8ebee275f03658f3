"""The anytime-valid confidence sequence for the paired difference, and the stopping rule.

Coverage is checked by simulation: a fixed finite test set with given discordance rates, many
uniformly random evaluation orders (sampling without replacement, as in a real run), looks every
10 points; a sequence "covers" when the test set's difference lies in the interval at every look.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from manifold_tf.evaluation import sequential, stats

RATES = [(0.05, 0.05), (0.15, 0.05), (0.02, 0.20)]  # P(shell only), P(base only)


def finite_test_set(n_total: int, p_shell_only: float, p_base_only: float) -> np.ndarray:
    """A test set's paired differences with round(p N) points of each discordant kind."""
    b, c = round(p_shell_only * n_total), round(p_base_only * n_total)
    d = np.zeros(n_total, dtype=np.int8)
    d[:b], d[b : b + c] = 1, -1
    return d


def min_covered(n_sequences: int, confidence: float = 0.95, false_alarm: float = 1e-3) -> int:
    """Monte-Carlo slack: if the true simultaneous coverage were exactly ``confidence``, the count
    of covering sequences is Binomial(n_sequences, confidence) and falls below this bound with
    probability <= ``false_alarm`` (one-sided binomial quantile; 928 of 1000 at 95%)."""
    return int(binom.ppf(false_alarm, n_sequences, confidence))


def simulate(n_total, rates, n_sequences, seed, max_grid=2001, look_every=10):
    """Coverage at every look over ``n_sequences`` random orders of one finite test set."""
    pop = finite_test_set(n_total, *rates)
    theta = pop.mean()
    rng = np.random.default_rng(seed)
    orders = rng.permuted(np.tile(np.arange(n_total), (n_sequences, 1)), axis=1)
    r = sequential.confidence_sequence(
        pop[orders], n_total=n_total, look_every=look_every, max_grid=max_grid
    )
    # 1e-9: the lattice endpoints are k/N up to float rounding.
    hit = ((r["ci_low"] <= theta + 1e-9) & (theta - 1e-9 <= r["ci_high"])).all(axis=1)
    r["hit"] = hit
    return int(hit.sum()), r, theta


def check_coverage(n_total, rates, n_sequences, seed, max_grid=2001):
    covered, r, theta = simulate(n_total, rates, n_sequences, seed, max_grid=max_grid)
    width = r["ci_high"] - r["ci_low"]
    half = width.shape[1] // 2
    print(
        f"N={n_total} P(b)={rates[0]} P(c)={rates[1]} theta={theta:+.3f} grid={max_grid}: "
        f"covered at every look in {covered}/{n_sequences} = {covered / n_sequences:.3f}; "
        f"mean width at n={r['n'][half]}: {width[:, half].mean():.3f}"
    )
    assert covered >= min_covered(n_sequences), covered
    # After the whole set the interval is one point: the set's difference wherever it covered.
    assert np.allclose(r["ci_low"][:, -1], r["ci_high"][:, -1])
    assert np.allclose(r["ci_low"][r["hit"], -1], theta)
    return covered


@pytest.mark.parametrize("rates", RATES)
def test_coverage_at_every_look_n200(rates):
    check_coverage(200, rates, 1000, seed=11)


def test_coverage_at_every_look_n700_coarse_grid():
    """N = 700 on a 401-point grid (step 1/400 in the mean of X): the widened-hull path."""
    check_coverage(700, (0.15, 0.05), 1000, seed=12, max_grid=401)


@pytest.mark.slow
@pytest.mark.parametrize("rates", RATES)
def test_coverage_at_every_look_n700(rates):
    check_coverage(700, rates, 2000, seed=13)


@pytest.mark.slow
@pytest.mark.parametrize("rates", RATES)
def test_coverage_at_every_look_n700_coarse_grid_all_rates(rates):
    check_coverage(700, rates, 1000, seed=14, max_grid=401)


@pytest.mark.slow
@pytest.mark.parametrize("rates", RATES)
def test_coverage_population_mode(rates):
    """``n_total=None``: i.i.d. points, the estimand is E[D] = P(b) - P(c)."""
    rng = np.random.default_rng(15)
    u = rng.random((1000, 300))
    d = np.where(u < rates[0], 1, np.where(u < rates[0] + rates[1], -1, 0))
    theta = rates[0] - rates[1]
    r = sequential.confidence_sequence(d, n_total=None, look_every=10)
    covered = int(((r["ci_low"] <= theta) & (theta <= r["ci_high"])).all(axis=1).sum())
    print(f"population P(b)={rates[0]} P(c)={rates[1]}: covered {covered}/1000")
    assert covered >= min_covered(1000)


def test_interval_shrinks_and_nests():
    rng = np.random.default_rng(0)
    pop = finite_test_set(500, 0.10, 0.05)
    d = pop[rng.permutation(500)]
    r = sequential.confidence_sequence(d, n_total=500, look_every=10)
    low, high = r["ci_low"], r["ci_high"]
    assert np.all(np.diff(low) >= 0) and np.all(np.diff(high) <= 0)  # running intersection
    width = high - low
    assert width[4] < width[0] and width[24] < 0.6 * width[4] and width[-1] == 0.0
    assert r["n"][0] == 10 and r["n"][-1] == 500 and len(r["n"]) == 50
    # Before the end it is wider than the fixed-n interval at the same n: the price of looking.
    fixed = stats.paired_difference(d[:250] == 1, d[:250] == -1)
    assert width[24] > fixed["ci_high"] - fixed["ci_low"]


def test_all_zero_set_collapses_to_zero():
    """No discordant point in the whole finite set: the final interval is exactly [0, 0]."""
    r = sequential.confidence_sequence(np.zeros(300, dtype=int), n_total=300, look_every=10)
    assert (r["ci_low"][-1], r["ci_high"][-1]) == (0.0, 0.0)
    assert np.all(r["ci_low"] <= 0) and np.all(r["ci_high"] >= 0)
    assert r["ci_high"][14] - r["ci_low"][14] < 0.1  # half-way: already narrow
    # Sampling without replacement is what buys the collapse: i.i.d. draws of the same stream
    # leave a population interval of positive width.
    pop = sequential.confidence_sequence(np.zeros(300, dtype=int), n_total=None, look_every=10)
    assert pop["ci_high"][-1] > 0.0 > pop["ci_low"][-1]


def test_batches_and_vectorisation_do_not_change_the_interval():
    rng = np.random.default_rng(1)
    pop = finite_test_set(400, 0.12, 0.04)
    d = np.stack([pop[rng.permutation(400)] for _ in range(3)])
    together = sequential.confidence_sequence(d, n_total=400, look_every=50)
    for row in range(3):
        cs = sequential.PairedConfidenceSequence(400)
        start = 0
        for size in (1, 7, 42, 150):
            cs.update(d[row, start : start + size])
            start += size
        one = sequential.confidence_sequence(d[row], n_total=400, look_every=50)
        assert cs.n == 200
        # The running intersection runs over every point, so batch boundaries do not matter.
        assert cs.interval == (one["ci_low"][3], one["ci_high"][3])
        assert np.array_equal(one["ci_low"], together["ci_low"][row])
        assert np.array_equal(one["ci_high"], together["ci_high"][row])
        assert cs.estimate == pytest.approx(d[row, :200].mean())


def test_decide_verdicts():
    rng = np.random.default_rng(2)
    n_total = 1000
    helps = finite_test_set(n_total, 0.30, 0.02)[rng.permutation(n_total)]
    dec = sequential.decide(helps[:300], n_total=n_total, margin=0.05)
    assert dec.reason == "helps" and dec.stop and dec.ci_low > 0 and dec.n == 300
    assert dec.estimate == pytest.approx(helps[:300].mean())

    hurts = -helps
    dec = sequential.decide(hurts[:300], n_total=n_total, margin=0.05)
    assert dec.reason == "hurts" and dec.stop and dec.ci_high < 0

    nothing = np.zeros(400, dtype=int)
    dec = sequential.decide(nothing, n_total=n_total, margin=0.05)
    assert dec.reason == "gains less than margin" and dec.stop
    assert dec.ci_low < 0 < dec.ci_high < 0.05

    mixed = finite_test_set(n_total, 0.10, 0.08)[rng.permutation(n_total)]
    dec = sequential.decide(mixed[:40], n_total=n_total, margin=0.05)
    assert dec.reason == "undecided" and not dec.stop

    # The whole set evaluated: the interval is the set's difference, and the run stops.
    flat = np.zeros(50, dtype=int)
    dec = sequential.decide(flat, n_total=50, margin=0.0)
    assert (dec.ci_low, dec.ci_high, dec.reason, dec.stop) == (0.0, 0.0, "undecided", True)

    dec = sequential.decide([], n_total=n_total, margin=0.05)
    assert (dec.ci_low, dec.ci_high, dec.stop, dec.n) == (-1.0, 1.0, False, 0)
    assert all(r in sequential.REASONS for r in ("helps", "hurts", "gains less than margin"))


def test_stopping_at_first_decision_rarely_misleads():
    """Stop at the first look whose interval excludes 0: with theta = 0 (b = c) a "helps" or
    "hurts" verdict at any look is a false one; it must happen in <= 5% of orders (up to the
    Monte-Carlo slack), because the interval covers theta at every look simultaneously."""
    covered, r, theta = simulate(200, (0.08, 0.08), 1000, seed=21)
    assert theta == 0.0
    false_verdict = ((r["ci_low"] > 0) | (r["ci_high"] < 0)).any(axis=1)
    assert false_verdict.sum() <= 1000 - min_covered(1000)


def test_random_order():
    order = sequential.random_order(100, seed=5)
    assert sorted(order) == list(range(100))
    assert np.array_equal(order, sequential.random_order(100, seed=5))
    assert not np.array_equal(order, sequential.random_order(100, seed=6))


def test_invalid_inputs():
    with pytest.raises(ValueError):
        sequential.confidence_sequence([0, 1, 2], n_total=10)
    with pytest.raises(ValueError):
        sequential.confidence_sequence(np.zeros(11, dtype=int), n_total=10)
    with pytest.raises(ValueError):
        sequential.PairedConfidenceSequence(10, confidence=1.0)
    with pytest.raises(ValueError):
        sequential.decide([1, 0], n_total=10, margin=-0.1)
    with pytest.raises(ValueError):
        sequential.random_order(0, seed=1)
