"""Hedge (Wu et al. 2021) as a shell: oracles on a linear model (the objective and its gradient in
closed form, one step and K steps by hand), the answer is F at the point reached, randomness,
what the evaluation asks of it, Keras I/O, and BPDA on it.

Tiny shapes: 4x4x3 images (pixels 0..255), 4 classes, a linear base.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import tensorflow as tf

from helpers import (
    assert_config_round_trip,
    assert_in_ball_and_box,
    assert_saving_round_trip,
    linear_model,
    np_logits,
    np_softmax,
)
from manifold_tf import shells
from manifold_tf.evaluation.config import ShellConfig, ThreatConfig
from manifold_tf.shells import SHELLS, HedgeShell
from manifold_tf.shells.hedge import HEDGE_STEP_SIZE, HEDGE_STEPS, hedge_objective

# The module (manifold_tf.attacks.bpda, the name, is the attack function).
bpda = importlib.import_module("manifold_tf.attacks.bpda")

SHAPE = (4, 4, 3)
D = int(np.prod(SHAPE))
K = 4


def problem(seed=0, n=5):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(0.0, 0.02, size=(D, K))
    bias = rng.normal(0.0, 0.5, size=K)
    # Away from the box (radius <= 20): no clipping, so the steps are the closed form's.
    x = rng.uniform(40.0, 215.0, size=(n,) + SHAPE).astype(np.float32)
    return linear_model(SHAPE, kernel, bias), kernel, bias, x


def np_hedge_gradient(x, kernel, bias):
    """d/dx sum_k CE(F(x), k) = W (K softmax(Z) - 1) for Z = x W + b (rows of x flattened)."""
    p = np_softmax(np_logits(x, kernel, bias))
    return ((K * p - 1.0) @ kernel.T).reshape(x.shape)


def np_hedge(x, kernel, bias, *, steps, step_size, radius):
    z = x.astype(np.float64)
    for _ in range(steps):
        z = z + step_size * np.sign(np_hedge_gradient(z, kernel, bias))
        z = np.clip(np.clip(z, x - radius, x + radius), 0.0, 255.0)
    return z


def test_objective_is_the_sum_of_every_label_s_cross_entropy():
    logits = np.random.default_rng(1).normal(0, 3, size=(6, K))
    want = -np.log(np_softmax(logits)).sum(1)  # sum_k CE(F, k) = -sum_k log F_k
    got = hedge_objective(tf.constant(logits, tf.float32)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # And its closed form, C logsumexp(Z) - sum_k Z_k.
    lse = np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(got, K * lse - logits.sum(1), rtol=1e-5)


def test_one_step_is_the_hand_computed_signed_step_and_the_answer_is_f_there():
    base, kernel, bias, x = problem()
    shell = HedgeShell(base, 20.0, steps=1, step_size=3.0, random_start=False)
    out = shell.embed(x)
    g = np_hedge_gradient(x.astype(np.float64), kernel, bias)
    assert np.abs(g).min() > 1e-6  # every pixel's sign is determined
    np.testing.assert_allclose(out["point"].numpy(), x + 3.0 * np.sign(g), atol=1e-4)
    # The answer is F at the point reached, and z's slots all hold that point (BPDA's rows).
    probs = np_softmax(np_logits(out["point"].numpy(), kernel, bias))
    np.testing.assert_allclose(out["probabilities"].numpy(), probs, atol=1e-5)
    np.testing.assert_allclose(shell.predict(x, verbose=0), probs, atol=1e-5)
    np.testing.assert_array_equal(out["z"].numpy(), np.repeat(out["point"].numpy()[:, None], K, 1))
    lo = np.log(probs) - np.log1p(-probs)
    np.testing.assert_allclose(out["log_odds"].numpy(), lo, rtol=1e-4, atol=1e-4)


def test_k_steps_match_the_projected_numpy_ascent_and_raise_the_objective():
    base, kernel, bias, x = problem(seed=2)
    shell = HedgeShell(base, 6.0, steps=5, step_size=2.0, random_start=False)
    out = shell.embed(x)
    want = np_hedge(x, kernel, bias, steps=5, step_size=2.0, radius=6.0)
    np.testing.assert_allclose(out["point"].numpy(), want, atol=1e-3)
    assert_in_ball_and_box(out["point"].numpy(), x, 6.0)
    before = hedge_objective(tf.constant(np_logits(x, kernel, bias), tf.float32)).numpy()
    assert (out["objective"].numpy() > before).all()


def test_radius_zero_or_no_steps_answers_the_base_at_x():
    base, kernel, bias, x = problem(seed=3)
    probs = np_softmax(np_logits(x, kernel, bias))
    for shell in (
        HedgeShell(base, 0.0, random_start=True),
        HedgeShell(base, 8.0, steps=0, random_start=False),
    ):
        np.testing.assert_allclose(shell.predict(x, verbose=0), probs, atol=1e-5)


def test_random_start_is_seeded_and_declared():
    base, _, _, x = problem(seed=4)
    shell = HedgeShell(base, 8.0, steps=2, step_size=2.0, random_start=True, seed=1)
    assert shell.is_random
    a, b = shell.embed(x)["point"].numpy(), shell.embed(x)["point"].numpy()
    np.testing.assert_array_equal(a, b)  # same seed, same draw
    other = shell.with_seed(7)
    assert other is not shell and other.seed == 7 and other.base is shell.base
    assert not np.array_equal(other.embed(x)["point"].numpy(), a)
    assert_in_ball_and_box(other.embed(x)["point"].numpy(), x, 8.0)
    fixed = HedgeShell(base, 8.0, random_start=False)
    assert not fixed.is_random and fixed.with_seed(3) is fixed


def test_what_the_evaluation_asks_of_hedge():
    base, _, _, x = problem()
    shell = HedgeShell(base, 8.0, steps=7, random_start=False)
    assert SHELLS["hedge"] is HedgeShell and shell.kind == "hedge"
    assert shell.passes_per_prediction() == 7 and shell.rows_per_image == 1
    assert shell.search_radius == 8.0
    sc = shell.scores(shell.embed(x))
    np.testing.assert_array_equal(sc.pick, shell.predict(x, verbose=0).argmax(1))
    # The defaults are the authors' (HedgeDefense: 20 steps of 0.007, random start).
    default = HedgeShell(base)
    assert (default.steps, default.step_size, default.random_start) == (20, 0.007 * 255, True)
    assert (HEDGE_STEPS, HEDGE_STEP_SIZE) == (20, pytest.approx(1.785))


def test_built_from_the_evaluation_settings_by_name():
    base, _, _, _ = problem()
    cfg = ShellConfig(kind="hedge", hedge_steps=3, hedge_step_size=1.5, hedge_random_start=False)
    shell = cfg.build(base, ThreatConfig(delta=5.0), seed=4)
    assert isinstance(shell, HedgeShell)
    assert (shell.delta, shell.steps, shell.step_size, shell.random_start, shell.seed) == (
        5.0,
        3,
        1.5,
        False,
        4,
    )
    assert shell.settings() == dict(
        shell="hedge",
        delta=5.0,
        steps=3,
        step_size=1.5,
        random_start=False,
        seed=4,
        jit_compile=False,
    )
    assert isinstance(shells.build("hedge", base, ShellConfig(), delta=8.0, p=0.9), HedgeShell)
    assert ShellConfig().hedge_steps == HEDGE_STEPS
    assert ShellConfig().hedge_step_size == pytest.approx(HEDGE_STEP_SIZE)


def test_keras_round_trips_and_export(tmp_path):
    base, _, _, x = problem()
    shell = HedgeShell(base, 6.0, steps=3, step_size=2.0, random_start=True, seed=2)
    clone = assert_config_round_trip(shell)
    assert clone.settings() == shell.settings()
    assert_saving_round_trip(shell, x, tmp_path, atol=1e-5)
    shell.export(str(tmp_path / "export"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(
        loaded.serve(tf.constant(x)).numpy(), shell.predict(x, verbose=0), atol=1e-5
    )


def test_bpda_attacks_hedge_through_f_at_its_point():
    base, kernel, bias, x = problem(seed=5, n=6)
    shell = HedgeShell(base, 4.0, steps=2, step_size=2.0, random_start=False)
    y = shell.predict(x, verbose=0).argmax(1)
    # The surrogate's rows are the shell's own point: the gradient BPDA ascends is F's at z*.
    out = shell.embed(x)
    rows = bpda.surrogate_rows(shell.scores(out), y.astype(np.int64))
    assert (rows.down_label == y).all() and (rows.up_label != y).all()
    # A linear base is broken at a large budget (the shell's 4-px hedge cannot undo 60 px).
    res = bpda.bpda(shell, x, y, epsilon=60.0, settings=bpda.BPDASettings(steps=10))
    assert res.success.all()
    assert_in_ball_and_box(res.x_adv, x, 60.0)
    assert (shell.predict(res.x_adv, verbose=0).argmax(1) != y).all()
    # The default BPDA approximation is the identity (no pass).
    g = np.ones_like(x)
    assert shell.bpda_vjp(x, g) is g
