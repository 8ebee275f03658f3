"""A random defence is judged by k fresh predictions per point (issue 23, part 3).

The oracle: a shell that answers right with a known probability ``q`` per fresh draw, independently
across seeds (a coin keyed by its seed and the input, :mod:`manifold_tf.seeds`), around a base that
is right everywhere and has no gradient. The suite cannot move ``x`` (CW on that base finds
nothing), so a point is robust in run ``j`` exactly when run ``j``'s coin is right: the worst of
``k`` runs is right with probability ``q^k`` and the mean over the runs is ``q``. A deterministic
shell predicts once whatever ``k`` says, and its record and verdict equal ``k = 1``'s.

Tiny shapes: 8x8x3 images (pixels 0..255), 3 classes.
"""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import small_conv, uniform_images
from manifold_tf import seeds
from manifold_tf.attacks import CWSettings
from manifold_tf.evaluation import adaptive, adaptive_report, random_draws
from manifold_tf.evaluation.config import AdaptiveConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.store import RunStore
from manifold_tf.shells import FactorShell, MCNShell

SHAPE = (8, 8, 3)
C = 3


@keras.saving.register_keras_serializable(package="tests")
class CornerLabel(keras.layers.Layer):
    """Logits ``10 * one_hot(round(x[:, 0, 0, 0] / 80))``, no gradient: right everywhere on
    images whose corner pixel is ``80 * label``, within any budget below 40 pixels."""

    def call(self, x):
        label = tf.cast(tf.stop_gradient(tf.round(x[:, 0, 0, 0] / 80.0)), tf.int32)
        return 10.0 * tf.one_hot(tf.clip_by_value(label, 0, C - 1), C)


def LabelInCorner() -> keras.Model:  # noqa: N802 (a model, named like one)
    inp = keras.Input(SHAPE)
    return keras.Model(inp, CornerLabel()(inp))


@keras.saving.register_keras_serializable(package="tests")
class CoinShell(FactorShell):
    """Answers the base's label with probability ``q``, else the next label: a coin per (seed,
    input), so every fresh seed is an independent draw and a point draws alike in any batch."""

    def __init__(self, base, q: float = 0.5, *, seed: int = 0, **kwargs):
        self.q, self.seed = float(q), int(seed)
        kwargs.setdefault("jit_compile", False)
        super().__init__(base, **kwargs)

    def get_config(self):
        return {**super().get_config(), "q": self.q, "seed": self.seed}

    def settings(self):
        return dict(shell="coin", q=self.q, seed=self.seed)

    def passes_per_prediction(self):
        return 1

    @property
    def search_radius(self):
        return 0.0

    @property
    def rows_per_image(self):
        return 1

    @property
    def is_random(self):
        return True

    def with_seed(self, seed):
        return self._replace(seed=seed)

    def _logits(self, z):
        f = tf.argmax(self.base(z, training=False), axis=-1, output_type=tf.int32)
        u = seeds.tf_uniform_rows(seeds.tf_input_keys(z, self.seed, "coin"), [1])[:, 0]
        return 10.0 * tf.one_hot(tf.where(u < self.q, f, (f + 1) % C), C)

    def _embed_graph(self, x):
        return self._at_point(x)


@pytest.fixture(scope="module")
def corner_base():
    """One base for the module: its compiled CW attack is traced once."""
    return LabelInCorner()


def corner_data(n: int, seed: int = 0):
    x = uniform_images(n, SHAPE, seed=seed)
    y = np.random.default_rng(seed + 1).integers(0, C, n)
    x[:, 0, 0, 0] = 80.0 * y
    return x, y.astype(np.int64)


def _run(shell, base, x, y, store, **suite):
    suite = dict(dict(shell_attacks=("transfer_cw",), base_attacks=(), sanity_points=0), **suite)
    cfg = AdaptiveConfig(num_points=len(x), budget=None, **suite)
    run = adaptive.run_adaptive(
        base,
        shell,
        x,
        y,
        cfg,
        RunContext(
            store=store,
            epsilon=4.0,
            cw_settings=CWSettings(max_iterations=2),
            seed=0,
            batch_points=100,
        ),
    )
    return run, adaptive_report.write_adaptive_report(run, x, store)


def within(rate: float, p: float, n: int, sds: float = 4.5) -> bool:
    """``rate`` is within ``sds`` binomial standard deviations of ``p`` over ``n`` trials."""
    return abs(rate - p) <= sds * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("q, k", [(0.7, 4), (0.9, 5)])
def test_worst_of_k_is_q_to_the_k_and_the_mean_over_runs_is_q(tmp_path, corner_base, q, k):
    n = 300
    x, y = corner_data(n)
    base = corner_base
    shell = CoinShell(base, q, seed=2)
    store = RunStore(str(tmp_path / "run"))
    run, report = _run(shell, base, x, y, store, random_draws=k)
    v = report["verdict"]
    assert v["n"] == n and v["base"]["robust"]["rate"] == 1.0  # the base cannot be moved
    assert within(v["shell"]["robust"]["rate"], q**k, n)
    assert within(v["shell"]["clean"]["rate"], q**k, n)
    draws = v["shell"]["random_draws"]
    assert draws["k"] == k
    mean = draws["mean_robust"]
    assert within(mean["rate"], q, n * k)  # coins independent across points and runs
    assert mean["ci_low"] <= mean["rate"] <= mean["ci_high"]
    # Each run alone is one fresh draw: right with probability q.
    for p in draws["robust_by_run"]:
        assert within(p["rate"], q, n)
    # Each point's fraction of right runs is Binomial(k, q) / k: check its mean and P(all k).
    fractions = np.array([p["robust"] for p in draws["points"].values()])
    assert len(fractions) == n and set(np.round(fractions * k, 6)) <= set(range(k + 1))
    assert within(float((fractions == 1).mean()), q**k, n)
    # One draw's verdict is not the worst of k: with k > 1 it is strictly lower here.
    assert v["shell"]["by_attack"]["transfer_cw"]["rate"] > v["shell"]["robust"]["rate"]
    # The extra predictions are paid for: (k - 1) at x and (k - 1) at x' per attacked point.
    attacked = sum(
        c == t for r in run.records for c, t in zip(r["shell_clean"], r["labels"], strict=True)
    )
    checks = sum(sum(r["ledger"]["shell_checks"]) for r in run.records)
    assert checks == n + (k - 1) * (n + attacked)
    summary = json.load(open(store.path("summary.json")))
    assert summary["shell"]["random_draws"]["mean_robust"]["rate"] == mean["rate"]
    assert "points" not in summary["shell"]["random_draws"]
    assert f"worst of {k}" in open(store.path("adaptive.md")).read()
    pts = json.load(open(store.path("adaptive.json")))["points"]
    assert all("shell_runs_right" in p for p in pts)


def test_a_random_shell_with_one_draw_is_judged_as_before(tmp_path, corner_base):
    x, y = corner_data(60, seed=3)
    base = corner_base
    run, report = _run(
        CoinShell(base, 0.6, seed=1), base, x, y, RunStore(str(tmp_path / "r")), random_draws=1
    )
    v = report["verdict"]
    assert "random_draws" not in v["shell"]
    assert not any(f in r for r in run.records for f in random_draws.FIELDS)
    robust = sum(b == "" for r in run.records for b in r["shell_broken_by"])
    assert v["shell"]["robust"]["k"] == robust


def _without_times(obj):
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if k not in ("seconds", "suite")}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def test_a_deterministic_shell_is_judged_the_same_whatever_k(tmp_path):
    base = small_conv(seed=1, classes=C, shape=SHAPE)
    shell = MCNShell(base, 4.0, steps=2, jit_compile=False)
    assert not shell.is_random and random_draws.num_draws(shell, AdaptiveConfig()) == 1
    x = uniform_images(12, SHAPE, seed=4)
    y = base(x).numpy().argmax(1).astype(np.int64)
    y[:3] = (y[:3] + 1) % C  # some points wrong at x
    suite = dict(steps=2, lift_steps=2, square_queries=4, shell_attacks=("transfer_cw", "bpda"))
    out = {}
    for k in (1, 5):
        store = RunStore(str(tmp_path / f"k{k}"))
        run, report = _run(shell, base, x, y, store, random_draws=k, **suite)
        out[k] = (run.records, report)
        assert not any(f in r for r in run.records for f in random_draws.FIELDS)
    assert _without_times(out[1][0]) == _without_times(out[5][0])
    assert _without_times(out[1][1]["verdict"]) == _without_times(out[5][1]["verdict"])
    assert out[1][1]["points"] == out[5][1]["points"]


def test_the_mean_over_runs_interval_is_bonferroni_over_clopper_pearson():
    per_run = np.zeros((40, 4), bool)
    per_run[:30, :] = True
    per_run[30:35, 0] = True  # run 0: 35/40, runs 1-3: 30/40
    m = random_draws._mean(per_run)
    assert m["rate"] == pytest.approx((35 + 3 * 30) / 160)
    from manifold_tf.evaluation.stats import clopper_pearson

    lo35, hi35 = clopper_pearson(35, 40, 1 - 0.05 / 4)
    lo30, hi30 = clopper_pearson(30, 40, 1 - 0.05 / 4)
    assert m["ci_low"] == pytest.approx((lo35 + 3 * lo30) / 4)
    assert m["ci_high"] == pytest.approx((hi35 + 3 * hi30) / 4)
    # Wider than a single run's 95% interval: it holds for any dependence between the runs.
    lo, hi = clopper_pearson(30, 40)
    assert m["ci_high"] - m["ci_low"] > hi - lo
