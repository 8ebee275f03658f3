"""Anytime-valid confidence sequence for the paired robust difference, and when to stop.

Setting. The test set has ``N`` points (``n_total``). They are evaluated one at a time (or in
batches) in a uniformly random order drawn without replacement (:func:`random_order`); point ``i``
gives ``D_i = shell_i - base_i`` in ``{-1, 0, 1}`` (1: only the shell survives the attacks; -1:
only the base does). The estimand is the difference on the *whole finite test set*,
``theta = (1/N) sum_{j=1..N} D_j = (b - c) / N`` for the full set's discordant counts: what
:func:`~manifold_tf.evaluation.stats.paired_difference` would estimate after evaluating every
point, known exactly at ``t = N``. (With ``n_total=None`` the points are taken as i.i.d. draws
from a population and the estimand is the population difference ``E[D]``; nothing collapses.)

Construction: Waudby-Smith & Ramdas (WSR), "Estimating means of bounded random variables by betting"
(JRSS-B 86(1), 2024; arXiv:2010.09686), section 6 (sampling without replacement), and
"Confidence sequences for sampling without replacement" (NeurIPS 2020). Map ``X_i = (D_i + 1) / 2``
in ``[0, 1]``, with finite-set mean ``mu = (theta + 1) / 2``. For a candidate mean ``m``, the
mean of the points not yet drawn before draw ``t`` would be

    mu_t(m) = (N m - sum_{i<t} X_i) / (N - t + 1)          (m is impossible if outside [0, 1])

and ``E[X_t | past] = mu_t(mu)`` under uniform sampling without replacement. Two capital processes
bet for and against ``m``,

    K_t^+(m) = prod_{i<=t} (1 + lam_i^+(m) (X_i - mu_i(m))),
    K_t^-(m) = prod_{i<=t} (1 - lam_i^-(m) (X_i - mu_i(m))),

with predictable bets (WSR's "predictable plug-in" bets, truncated so the factors stay
positive): ``lam_t = sqrt(2 log(2/alpha) / (s2_{t-1} t log(1 + t)))``,
``lam_t^+ = min(lam_t, c / mu_t(m))``, ``lam_t^- = min(lam_t, c / (1 - mu_t(m)))``, ``c = 1/2``,
``s2_t = (1/4 + sum_{i<=t} (X_i - xbar_i)^2) / (t + 1)`` and
``xbar_t = (1/2 + sum_{i<=t} X_i) / (t + 1)``.
At the true ``m = mu`` both are nonnegative martingales with initial value 1, so the hedged process
``K_t(m) = max(K_t^+(m) / 2, K_t^-(m) / 2)`` crosses ``1/alpha`` at *any* time with probability
at most ``alpha`` (Ville's inequality, one half of alpha per side). The confidence sequence is

    C_t = {m : K_s(m) < 1/alpha and mu_s(m) in [0, 1] for every s <= t}

(the running intersection, valid because the guarantee is simultaneous over all ``t``). ``C_t`` is
computed on a grid of candidate means: on the lattice ``k / (2N)`` that the finite-set mean must
lie on when that has at most ``max_grid`` points (then the reported interval is exactly the hull of
the surviving lattice points), otherwise on a uniform grid whose hull is widened by one grid step
on each side, so that a true mean between two grid points is never cut off (this relies on ``C_t``
being an interval, which holds in every case we simulated; tests/test_sequential.py checks the
coverage of both paths). Both are intersected
with the deterministic bounds ``[S_t / N, (S_t + N - t) / N]`` (unseen points count as 0 or 1), so
after the last point the interval is the single value ``theta``.

Stopping (:func:`decide`): because ``P(theta in C_t for all t) >= 1 - alpha``, one may look after
every batch and stop the first time the interval excludes 0 ("helps" / "hurts") or its upper end
falls below a margin ("gains less than margin"), and the reported interval keeps its coverage.
An ordinary fixed-n interval recomputed at every look does not (METHOD.md, "Deciding").

A stop caused only by a time or point budget, never by the outcomes, is a fixed design: report
the fixed-n interval of :func:`~manifold_tf.evaluation.stats.paired_difference` for the points
evaluated (narrower than this sequence, which pays for the freedom to look).
"""

from __future__ import annotations

import dataclasses

import numpy as np

BET_CAP = 0.5  # WSR's c: bets at most half the "all-in" size keep the capital away from 0.


def random_order(n_total: int, seed: int) -> np.ndarray:
    """The evaluation order: a seeded uniformly random permutation of ``range(n_total)``.

    The sequence's guarantee rests on this order being uniform and fixed before any outcome is
    seen; evaluating in dataset order (or re-drawing after a look) voids it.
    """
    if n_total < 1:
        raise ValueError(f"need n_total >= 1; got {n_total}.")
    return np.random.default_rng(seed).permutation(int(n_total))


def _check_d(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d)
    if d.size and not np.isin(d, (-1, 0, 1)).all():
        raise ValueError("paired differences must be -1, 0 or 1 (shell_i - base_i).")
    return d.astype(np.float64)


class PairedConfidenceSequence:
    """Betting confidence sequence for the shell-minus-base difference (module docstring).

    ``update(d_batch)`` adds the next points' differences and returns ``(ci_low, ci_high)`` for
    the difference after this look; the interval only ever shrinks. Vectorised over independent
    sequences: with ``n_sequences=S``, ``update`` takes arrays of shape ``(S, k)`` and returns two
    arrays of shape ``(S,)`` (used by the simulation tests; reports use ``S = 1``).

    ``n_total``: size of the finite test set the points are drawn from without replacement, or
    ``None`` for i.i.d. draws from a population. ``max_grid``: most candidate means evaluated.
    """

    def __init__(
        self,
        n_total: int | None,
        *,
        confidence: float = 0.95,
        max_grid: int = 2001,
        n_sequences: int | None = None,
    ):
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"need 0 < confidence < 1; got {confidence}.")
        if n_total is not None and n_total < 1:
            raise ValueError(f"need n_total >= 1 or None; got {n_total}.")
        if max_grid < 3:
            raise ValueError(f"need max_grid >= 3; got {max_grid}.")
        self.n_total = None if n_total is None else int(n_total)
        self.confidence = float(confidence)
        self._alpha = 1.0 - self.confidence
        self._log_threshold = np.log(1.0 / self._alpha)
        self._vector = n_sequences is not None
        s = 1 if n_sequences is None else int(n_sequences)
        if self.n_total is not None and 2 * self.n_total + 1 <= max_grid:
            # The finite-set mean of X in {0, 1/2, 1} is a multiple of 1/(2N): the exact lattice.
            self.grid = np.arange(2 * self.n_total + 1) / (2.0 * self.n_total)
            self._step = 0.0
        else:
            self.grid = np.linspace(0.0, 1.0, int(max_grid))
            self._step = float(self.grid[1] - self.grid[0])
        g = self.grid.size
        self.n = 0
        self._sum = np.zeros(s)  # S_t = sum of X_i
        self._sq = np.full(s, 0.25)  # 1/4 + sum (X_i - xbar_i)^2, WSR's variance numerator
        self._log_kp = np.zeros((s, g))
        self._log_km = np.zeros((s, g))
        self._alive = np.ones((s, g), dtype=bool)
        self._cols = (0, g)  # the columns [lo, hi) where some sequence has a candidate left
        self._low = np.zeros(s)  # last reported interval for the mean of X, in [0, 1]
        self._high = np.ones(s)

    def _step_one(self, x: np.ndarray) -> None:
        """Process one draw ``x`` (shape ``(S,)``) at time ``t = self.n + 1``."""
        t = self.n + 1
        # Only columns some sequence still holds need work: rejected candidates stay rejected.
        lo, hi = self._cols
        grid = self.grid[lo:hi]
        if self.n_total is not None:
            # Mean of the N - t + 1 points still undrawn, if the whole set's mean were m.
            mu = (self.n_total * grid[None, :] - self._sum[:, None]) / (self.n_total - t + 1)
        else:
            mu = np.broadcast_to(grid[None, :], (x.size, grid.size))
        # A candidate whose undrawn points would need a mean outside [0, 1] is impossible.
        possible = (mu >= -1e-12) & (mu <= 1.0 + 1e-12)
        mu = np.clip(mu, 1e-300, 1.0 - 1e-16)
        s2_prev = self._sq / t  # s2_{t-1}
        lam = np.sqrt(2.0 * np.log(2.0 / self._alpha) / (s2_prev * t * np.log1p(t)))[:, None]
        # Truncation c/mu, c/(1-mu) keeps 1 +- lam (x - mu) >= 1 - c > 0 for x in [0, 1]; the clip
        # above only stands in for mu = 0 or 1, where the bet on that side cannot lose.
        lam_p = np.minimum(lam, BET_CAP / mu)
        lam_m = np.minimum(lam, BET_CAP / (1.0 - mu))
        dev = x[:, None] - mu
        log_kp = self._log_kp[:, lo:hi]
        log_km = self._log_km[:, lo:hi]
        log_kp += np.log1p(lam_p * dev)
        log_km += np.log1p(-lam_m * dev)
        # max(K+/2, K-/2) >= 1/alpha, in logs.
        crossed = np.maximum(log_kp, log_km) >= self._log_threshold + np.log(2.0)
        alive = self._alive[:, lo:hi]
        alive &= possible & ~crossed
        cols = np.flatnonzero(alive.any(axis=0))
        self._cols = (lo + int(cols[0]), lo + int(cols[-1]) + 1) if cols.size else (lo, lo)
        # Running statistics for the next bet (the plug-in mean and variance).
        self._sum += x
        xbar = (0.5 + self._sum) / (t + 1)
        self._sq += (x - xbar) ** 2
        self.n = t

    def update(self, d_batch) -> tuple:
        """Add the next points' ``D_i`` (in draw order); return ``(ci_low, ci_high)``."""
        d = _check_d(d_batch)
        if not self._vector:
            d = d.reshape(1, -1)
        if d.ndim != 2 or d.shape[0] != self._alive.shape[0]:
            raise ValueError(f"need {self._alive.shape[0]} rows of differences; got {d.shape}.")
        if self.n_total is not None and self.n + d.shape[1] > self.n_total:
            raise ValueError(
                f"{self.n + d.shape[1]} points seen but the test set has "
                f"{self.n_total}: draws are without replacement."
            )
        for x in (d.T + 1.0) / 2.0:
            self._step_one(x)
        self._refresh()
        return self.interval

    def _refresh(self) -> None:
        """Recompute the reported interval from the surviving grid points and the hard bounds."""
        alive = self._alive
        any_alive = alive.any(axis=1)
        first = np.argmax(alive, axis=1)
        last = alive.shape[1] - 1 - np.argmax(alive[:, ::-1], axis=1)
        low = self.grid[first] - self._step
        high = self.grid[last] + self._step
        if self.n_total is not None:
            # Unseen points are each 0 or 1: the whole set's mean is within these bounds for sure.
            low = np.maximum(low, self._sum / self.n_total)
            high = np.minimum(high, (self._sum + self.n_total - self.n) / self.n_total)
        # Intersect with the previous look. With no grid point left (only possible on the coarse
        # grid: the mean sits between two rejected points) the previous interval is kept.
        new_low = np.where(any_alive, np.maximum(self._low, low), self._low)
        new_high = np.where(any_alive, np.minimum(self._high, high), self._high)
        if self.n_total is not None:
            new_low = np.maximum(new_low, self._sum / self.n_total)
            new_high = np.minimum(new_high, (self._sum + self.n_total - self.n) / self.n_total)
        self._low, self._high = new_low, np.maximum(new_high, new_low)

    @property
    def interval(self) -> tuple:
        """``(ci_low, ci_high)`` for the difference ``theta = 2 mu - 1``: floats, or arrays."""
        low, high = 2.0 * self._low - 1.0, 2.0 * self._high - 1.0
        if self._vector:
            return low, high
        return float(low[0]), float(high[0])

    @property
    def estimate(self):
        """Running mean of the differences seen so far (``nan`` before the first point)."""
        est = 2.0 * self._sum / self.n - 1.0 if self.n else np.full_like(self._sum, np.nan)
        return est if self._vector else float(est[0])


def confidence_sequence(
    d_values,
    *,
    n_total: int | None,
    look_every: int = 1,
    confidence: float = 0.95,
    max_grid: int = 2001,
) -> dict:
    """The interval after each look over a stream of differences ``D_i`` (in draw order).

    ``d_values``: shape ``(n,)``, or ``(S, n)`` for ``S`` independent sequences. Looks are after
    every ``look_every`` points and after the last one. Returns ``{"n": (L,), "ci_low": (..., L),
    "ci_high": (..., L)}`` (the leading axis only for 2-D input).
    """
    d = _check_d(d_values)
    if d.ndim not in (1, 2):
        raise ValueError(f"need a 1-D or 2-D array of differences; got shape {d.shape}.")
    if look_every < 1:
        raise ValueError(f"need look_every >= 1; got {look_every}.")
    vector = d.ndim == 2
    d2 = d if vector else d[None, :]
    cs = PairedConfidenceSequence(
        n_total, confidence=confidence, max_grid=max_grid, n_sequences=d2.shape[0]
    )
    ends = list(range(look_every, d2.shape[1] + 1, look_every))
    if not ends or ends[-1] != d2.shape[1]:
        ends.append(d2.shape[1])
    lows, highs, start = [], [], 0
    for end in ends:
        low, high = cs.update(d2[:, start:end])
        lows.append(low)
        highs.append(high)
        start = end
    low, high = np.stack(lows, axis=-1), np.stack(highs, axis=-1)
    return dict(
        n=np.asarray(ends), ci_low=low if vector else low[0], ci_high=high if vector else high[0]
    )


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do after a look: ``stop``, why, and the anytime-valid interval after ``n`` points.

    ``reason``: ``"helps"`` (interval above 0), ``"hurts"`` (below 0), ``"gains less than margin"``
    (upper end below the margin, the interval not below 0) or ``"undecided"``. ``stop`` is true
    for the first three, and also when the whole test set has been evaluated.
    """

    stop: bool
    reason: str
    ci_low: float
    ci_high: float
    n: int
    estimate: float = float("nan")


REASONS = ("helps", "hurts", "gains less than margin", "undecided")


def decide(
    d_values, *, n_total: int | None, margin: float, confidence: float = 0.95, max_grid: int = 2001
) -> Decision:
    """Stop or go on, from every difference ``D_i`` seen so far (in draw order).

    ``margin`` is in proportion units (0.05 = 5 points of robust accuracy). The interval is the
    running intersection of the confidence sequence over every prefix of ``d_values``, so this may
    be called after any batch, as often as wanted, and acted on.
    """
    if margin < 0:
        raise ValueError(f"need margin >= 0; got {margin}.")
    d = _check_d(d_values).reshape(-1)
    cs = PairedConfidenceSequence(n_total, confidence=confidence, max_grid=max_grid)
    low, high = cs.update(d) if d.size else cs.interval
    if low > 0:
        reason = "helps"
    elif high < 0:
        reason = "hurts"
    elif high < margin:
        reason = "gains less than margin"
    else:
        reason = "undecided"
    exhausted = n_total is not None and d.size >= n_total
    return Decision(
        stop=reason != "undecided" or exhausted,
        reason=reason,
        ci_low=low,
        ci_high=high,
        n=int(d.size),
        estimate=cs.estimate,
    )
