"""Auto-PGD's step-size schedule and momentum for BPDA (Croce & Hein 2020), per point, in numpy.

Used by :func:`manifold_tf.attacks.bpda.bpda` with ``schedule="apgd"``. Units: pixels (0..255).
"""

from __future__ import annotations

import numpy as np

from manifold_tf import projected

APGD_RHO, APGD_MOMENTUM = 0.75, 0.75  # Croce & Hein 2020


class ApgdSchedule:
    """Auto-PGD's step-size schedule and momentum (as :func:`projected.apgd_ascent`), per point, in
    numpy: the BPDA loop evaluates the real shell between steps, so it cannot be one compiled loop.
    The objective ``f`` is the shell's margin at the current iterate (higher is better)."""

    def __init__(self, start: np.ndarray, epsilon: float, steps: int):
        n = len(start)
        self.eta = np.full(n, 2.0 * epsilon, np.float32)
        self.x_prev, self.x_best = start.copy(), start.copy()
        self.g_best = np.zeros_like(start)
        self.f_prev, self.f_best = np.full(n, np.inf), np.full(n, -np.inf)
        self.f_last = np.full(n, -np.inf)
        self.count, self.reduced_last = np.zeros(n), np.zeros(n, bool)
        checks = [w for w in projected.apgd_checkpoints(steps) if w < steps]
        self.since = {w: float(w - prev) for prev, w in zip(checks, checks[1:], strict=False)}

    def step(self, i, a, z, g, f, lo, hi):
        """Step ``i`` of the points ``a`` ``[M]`` from ``z`` ``[M, ...]`` along the gradient ``g``
        with objective ``f`` ``[M]``; the next iterate float32, clipped to ``[lo, hi]``."""
        expand = (-1,) + (1,) * (z.ndim - 1)
        self.count[a] += f > self.f_prev[a]
        better = f > self.f_best[a]
        self.x_best[a[better]], self.g_best[a[better]] = z[better], g[better]
        self.f_best[a[better]] = f[better]
        if i in self.since:
            reduce = (self.count[a] < APGD_RHO * self.since[i]) | (
                ~self.reduced_last[a] & (self.f_best[a] <= self.f_last[a])
            )
            self.eta[a[reduce]] /= 2.0
            z = np.where(reduce.reshape(expand), self.x_best[a], z)
            g = np.where(reduce.reshape(expand), self.g_best[a], g)
            f = np.where(reduce, self.f_best[a], f)
            self.f_last[a], self.reduced_last[a], self.count[a] = self.f_best[a], reduce, 0.0
        alpha = APGD_MOMENTUM if i > 0 else 1.0  # the first step has no previous point
        z_step = np.clip(z + self.eta[a].reshape(expand) * np.sign(g), lo, hi)
        z_new = np.clip(z + alpha * (z_step - z) + (1.0 - alpha) * (z - self.x_prev[a]), lo, hi)
        self.x_prev[a], self.f_prev[a] = z, f
        return z_new.astype(np.float32)
