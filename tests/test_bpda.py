"""Tests of the adaptive (BPDA) attack on the shells: invariants, a closed-form oracle, a control."""

from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from manifold_tf import attacks, compiled
from manifold_tf.attacks.bpda import RESULT_KEYS, bpda

bpda_module = importlib.import_module("manifold_tf.attacks.bpda")  # the package exports the function
from manifold_tf.data import synthetic_arrays, synthetic_manifold
from manifold_tf.shells import CarliniWagnerShell, MCNShell, NCNShell

from helpers import (assert_in_ball_and_box, binary_linear_problem, nearest_centre_model,
                     nearest_centre_weights, np_logits, small_conv, uniform_images)

SHAPE = (8, 8, 3)
D = int(np.prod(SHAPE))
TOL = 1e-3  # pixels: float32 rounding of x +- epsilon


@pytest.fixture(scope="module")
def conv():
    base = small_conv()  # 3 classes, Flatten: the prediction varies over the box
    x = uniform_images(6, SHAPE, seed=1)
    shells = {
        "mcn": MCNShell(base, 4.0, steps=2),
        "ncn": NCNShell(base, 0.5, delta_max=4.0, steps=2, rounds=1),
    }
    return base, x, shells


# ------------------------------------------------------------------------------------------------
# Invariants on a small conv base


@pytest.mark.parametrize("kind", ["mcn", "ncn"])
def test_outputs_stay_in_the_ball_and_success_is_the_shells_answer(conv, kind):
    base, x, shells = conv
    shell = shells[kind]
    y = shell.embed(x)["label"].numpy()  # the shell's clean answers: success = the attack moved it
    eps, steps = 3.0, 4
    out = bpda(shell, x, y, epsilon=eps, steps=steps, random_start=True, seed=1)
    assert set(out) == set(RESULT_KEYS)
    assert_in_ball_and_box(out["x_adv"], x, eps)
    # Not vacuous: at this budget the attack fools the shell on some points and not on others.
    assert out["success"].any() and not out["success"].all(), out["success"]
    again = shell.embed(out["x_adv"])["label"].numpy()
    np.testing.assert_array_equal(out["shell_label"], again)
    np.testing.assert_array_equal(out["success"], again != y)
    assert (out["steps_used"][~out["success"]] == steps).all()
    assert (out["steps_used"] <= steps).all() and out["steps_used"].dtype == np.int32
    if kind == "mcn":  # MCN ranks by log-odds: the surrogate is positive exactly when it is wrong
        np.testing.assert_array_equal(out["margin"] > 0, out["success"])
    # Deterministic under a seed; another seed starts elsewhere.
    same = bpda(shell, x, y, epsilon=eps, steps=steps, random_start=True, seed=1)
    for key in out:
        np.testing.assert_array_equal(out[key], same[key])
    other = bpda(shell, x, y, epsilon=eps, steps=steps, random_start=True, seed=2)
    assert not np.array_equal(out["x_adv"], other["x_adv"])
    # Finished rows leave the batch, yet nothing retraces: one trace for every batch size.
    assert shell.embed_function.experimental_get_tracing_count() == 1
    assert list(compiled.tracing_counts(base, "bpda").values()) == [1]


def test_x_init_is_projected_and_a_start_that_already_fools_the_shell_is_kept(conv):
    _, x, shells = conv
    shell = shells["mcn"]
    y = shell.embed(x)["label"].numpy()
    eps = 3.0
    far = np.clip(x + 60.0 * np.sign(np.random.default_rng(2).uniform(-1, 1, x.shape)), 0, 255)
    start = np.clip(far, x - eps, x + eps).astype(np.float32)
    fooled = shell.embed(start)["label"].numpy() != y
    assert fooled.any() and not fooled.all()  # both kinds of start, for the test to mean something
    out = bpda(shell, x, y, epsilon=eps, steps=0, x_init=far.astype(np.float32))
    np.testing.assert_array_equal(out["x_adv"], start)  # steps=0: the projected start, unchanged
    np.testing.assert_array_equal(out["success"], fooled)
    np.testing.assert_array_equal(out["steps_used"], 0)
    out = bpda(shell, x, y, epsilon=eps, steps=3, x_init=far.astype(np.float32))
    np.testing.assert_array_equal(out["x_adv"][fooled], start[fooled])  # a success is never moved
    np.testing.assert_array_equal(out["steps_used"][fooled], 0)
    assert_in_ball_and_box(out["x_adv"], x, eps)


def test_zero_budget_returns_x_and_the_shells_clean_answer(conv):
    _, x, shells = conv
    shell = shells["ncn"]
    label = shell.embed(x)["label"].numpy()
    y = (label + 1) % 3  # wrong on purpose: the shell "fails" at x itself, at step 0
    y[:2] = label[:2]
    out = bpda(shell, x, y, epsilon=0.0, steps=2)
    np.testing.assert_array_equal(out["x_adv"], x)
    np.testing.assert_array_equal(out["success"], label != y)
    np.testing.assert_array_equal(out["steps_used"], np.where(label != y, 0, 2))
    empty = bpda(shell, x[:0], y[:0], epsilon=1.0, steps=2)
    assert empty["x_adv"].shape == (0,) + SHAPE and empty["success"].shape == (0,)


def test_the_surrogate_follows_each_shells_decision_rule():
    # Hand-made scores: 3 labels, y = 0, no model needed.
    y = np.zeros(4, np.int32)
    ar = np.broadcast_to(np.arange(3, dtype=np.int32), (4, 3))
    lo = np.array([[2.0, 1.0, 0.5], [0.5, 1.0, 0.0], [3.0, 2.5, 1.0], [3.0, 1.0, 0.0]])
    # NCN, p = 0.9 (logit 2.197): row 0 neither meets p, row 1 none but lo_1 > lo_0 (wrong),
    # row 2 both 0 and 1 meet p (0 nearer), row 3 only y meets p.
    met = np.array([[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0]], bool)
    dist = np.array([[8, 8, 8], [8, 8, 8], [2.0, 5.0, 8], [1.0, 8, 8]])
    key = np.where(met, 1e12 - dist, lo)
    sc = bpda_module.Scores(ar, key, lo, met, dist, float(np.log(9.0)), key.argmax(1))
    r = bpda_module.surrogate_rows(sc, y)
    np.testing.assert_array_equal(r.up, [1, 1, 1, 1])
    np.testing.assert_array_equal(r.down, [0, 0, 0, 0])
    # Log-odds race while y does not meet p; distance race (scaled gradients) once it does.
    np.testing.assert_array_equal(r.scaled, [False, False, True, True])
    np.testing.assert_allclose(r.margin, [-1.0, 0.5, 2.0 - 5.0, -(np.log(9.0) - 1.0)])
    assert ((r.margin > 0) == (sc.pick != y)).all()
    # Targeted at 2: up is label 2, down the best other label by the rule (row 1: label 1).
    r = bpda_module.surrogate_rows(sc, y, np.full(4, 2, np.int32))
    np.testing.assert_array_equal(r.up, [2, 2, 2, 2])
    np.testing.assert_array_equal(r.down, [0, 1, 0, 0])

    # CW paper_code: slot s was searched for label s, but is scored by its own top label.
    cand = np.array([[0, 0, 1], [0, 0, 0]], np.int32)  # row 1: every candidate's top label is y
    key = np.array([[5.0, 4.0, 3.0], [5.0, 1.0, 2.0]])
    sc = bpda_module.Scores(cand, key, key, None, None, None, np.array([0, 0], np.int32))
    r = bpda_module.surrogate_rows(sc, y[:2])
    # Row 0: the candidate of slot 2 carries the wrong label 1: raise label 1 there, lower y at
    # slot 0. Row 1: no wrong top label anywhere: raise label 1 in slot 1, where y is least sure.
    np.testing.assert_array_equal(r.up, [2, 1])
    np.testing.assert_array_equal(r.up_label, [1, 1])
    np.testing.assert_array_equal(r.down, [0, 0])
    np.testing.assert_array_equal(r.margin, [3.0 - 5.0, -np.inf])


# ------------------------------------------------------------------------------------------------
# Closed-form oracle: a binary linear base


def binary_problem():
    """``helpers.binary_linear_problem`` with 8 points of margins +-0.5 and +-1.5 ``eps * |a|_1``.

    Either shell can be fooled in ``N(x, eps)`` exactly when ``|m(x)| < eps |a|_1``, at the corner
    ``x - eps sign(a)`` (``y = 0``); every surrogate's gradient is a multiple of ``-a``.
    """
    ratio = np.array([0.5, 1.5] * 4) * np.repeat([1, -1], 4)  # target m(x) / (eps |a|_1)
    return binary_linear_problem(ratio, eps=6.0, delta=2.0)


def test_mcn_on_a_binary_linear_base_is_broken_exactly_below_the_linear_margin():
    base, x, y, p = binary_problem()
    eps, l1 = p["eps"], p["l1"]
    shell = MCNShell(base, p["delta"], steps=1)
    np.testing.assert_array_equal(shell.embed(x)["label"].numpy(), y)

    out = bpda(shell, x, y, epsilon=eps, steps=3, step_size=eps)
    breakable = np.abs(p["ratio"]) < 1.0
    np.testing.assert_array_equal(out["success"], breakable)
    np.testing.assert_array_equal(out["steps_used"], np.where(breakable, 1, 3))
    # Every point ends at its optimal corner: where the attack fails, nothing better exists.
    np.testing.assert_allclose(out["x_adv"], p["corner"], atol=TOL)
    # There (y = 0) m(corner) = (ratio - 1) eps |a|_1 and the surrogate lo_1 - lo_0 is
    # -2 m(corner) = 2 (1 - ratio) eps |a|_1: +eps |a|_1 for ratio 0.5, -eps |a|_1 for 1.5.
    expected = np.where(breakable, 1.0, -1.0) * eps * l1
    np.testing.assert_allclose(out["margin"], expected, rtol=2e-3)
    # Cost accounting: one shell call per iterate visited, two base rows per step taken.
    np.testing.assert_array_equal(out["shell_evals"], out["steps_used"] + 1)
    np.testing.assert_array_equal(out["base_passes"], 2 * out["steps_used"])


@pytest.mark.parametrize("variant", ["apgd", "targeted", "targeted_apgd", "restarts", "top_k",
                                     "lift", "lift_bpda", "eot_random_start", "ncn"])
def test_every_variant_meets_the_binary_linear_oracle(variant):
    # The same exact condition for every attack: broken iff |m(x)| < eps |a|_1, at the corner.
    base, x, y, p = binary_problem()
    eps, delta = p["eps"], p["delta"]
    breakable = np.abs(p["ratio"]) < 1.0
    shell = MCNShell(base, delta, steps=1)
    if variant == "eot_random_start":
        # One signed step of 2.5 delta from anywhere in N(x', delta) ends at the same corner: the
        # random shell answers as the deterministic one, so the oracle still holds.
        shell = MCNShell(base, delta, steps=1, random_start=True, seed=5)
    elif variant == "ncn":
        shell = NCNShell(base, 0.9, delta_max=16.0, steps=20, rounds=3)
    np.testing.assert_array_equal(shell.embed(x)["label"].numpy(), y)
    run = dict(
        apgd=lambda: bpda(shell, x, y, epsilon=eps, steps=3, schedule="apgd"),
        targeted=lambda: bpda(shell, x, y, epsilon=eps, steps=3, step_size=eps, target=1 - y),
        targeted_apgd=lambda: bpda(shell, x, y, epsilon=eps, steps=3, target=1 - y,
                                   schedule="apgd"),
        restarts=lambda: attacks.bpda_restarts(shell, x, y, epsilon=eps, steps=3,
                                               random_restarts=2, seed=4),
        top_k=lambda: attacks.bpda_targeted(shell, x, y, epsilon=eps, steps=3, num_targets="all"),
        lift=lambda: attacks.lift(shell, x, y, epsilon=eps, steps=3),
        lift_bpda=lambda: attacks.lift(shell, x, y, epsilon=eps, steps=3, bpda_steps=2),
        eot_random_start=lambda: bpda(shell, x, y, epsilon=eps, steps=3, schedule="apgd",
                                      eot_samples=2, seed=1),
        ncn=lambda: bpda(shell, x, y, epsilon=eps, steps=3, schedule="apgd"),
    )[variant]
    out = run()
    np.testing.assert_array_equal(out["success"], breakable)
    np.testing.assert_array_equal(shell.embed(out["x_adv"])["label"].numpy() != y, breakable)
    # Sign steps of >= eps (APGD's first is 2 eps; lift's base ascent ends at the corner of the
    # eps + delta ball, whose clip is the eps corner) reach the corner at once and stay there.
    np.testing.assert_allclose(out["x_adv"], p["corner"], atol=TOL)
    if variant != "ncn":  # MCN's margin lo_1 - lo_0 at the corner, as in the test above
        expected = np.where(breakable, 1.0, -1.0) * eps * p["l1"]
        np.testing.assert_allclose(out["margin"], expected, rtol=2e-3)
    if variant in ("apgd", "targeted", "targeted_apgd", "ncn"):
        np.testing.assert_array_equal(out["steps_used"], np.where(breakable, 1, 3))
    if variant == "eot_random_start":  # each step: the shell, then two EOT copies; 2 rows each
        used = out["steps_used"]
        np.testing.assert_array_equal(out["shell_evals"], used + 1 + 2 * used)
        np.testing.assert_array_equal(out["base_passes"], 2 * 2 * used)
    if variant == "lift":  # one shell call at x, then per target one base ascent and one check
        np.testing.assert_array_equal(out["shell_evals"], 2)
        np.testing.assert_array_equal(out["base_passes"], 3)
        np.testing.assert_array_equal(out["target"], 1 - y)


# ------------------------------------------------------------------------------------------------
# Control: an attack on the shell finds what a transfer attack on the base cannot


class PocketBase(keras.layers.Layer):
    """Three classes around a grey image ``mu`` with two orthogonal sign directions ``u`` and ``v``.

    ``Z_1 = 10 exp(-ms(x, mu) / 72)``: the true class, a bump at ``mu``.
    ``Z_0 = 8 tanh(0.2 mean(u (x - mu))) + 0.5``: a capped ramp along ``u``; its gradient dominates
    the base's loss at ``x = mu``, and at ``mu + 6u`` it beats the (shrunk) bump: the base is fooled.
    ``Z_2 = 25 exp(-ms(x, mu + 14v) / 40)``: a narrow, very confident pocket 14 pixels along ``v``:
    invisible to the base at ``mu`` (``Z_2 = 0.2``) but within the shell's reach once ``x'`` moves
    a little along ``v``.
    ``ms`` is the mean squared pixel difference.
    """

    def __init__(self, u, v, **kwargs):
        super().__init__(**kwargs)
        self.u = tf.constant(u, tf.float32)
        self.mu = tf.constant(np.full(D, 127.5), tf.float32)
        self.mu2 = tf.constant(127.5 + 14.0 * v, tf.float32)

    def call(self, x):
        z = tf.reshape(x, [-1, D])
        ramp = 8.0 * tf.tanh(0.2 * tf.reduce_mean((z - self.mu) * self.u, 1)) + 0.5
        bump = 10.0 * tf.exp(-tf.reduce_mean((z - self.mu) ** 2, 1) / 72.0)
        pocket = 25.0 * tf.exp(-tf.reduce_mean((z - self.mu2) ** 2, 1) / 40.0)
        return tf.stack([ramp, bump, pocket], 1)


def test_bpda_fools_a_shell_that_transfer_attacks_on_the_base_do_not():
    rng = np.random.default_rng(0)
    u = rng.choice([-1.0, 1.0], D)
    v = np.where(np.isin(np.arange(D), rng.permutation(D)[: D // 2]), -u, u)
    assert (u * v).sum() == 0  # exactly orthogonal: moving along one leaves the other's term alone
    inp = keras.Input(SHAPE)
    base = keras.Model(inp, PocketBase(u, v)(inp))
    x = np.full((1,) + SHAPE, 127.5, np.float32)
    y = np.array([1], np.int32)
    eps = 6.0
    shell = MCNShell(base, 8.0, steps=10)
    assert base(x).numpy().argmax() == 1 and shell.embed(x)["label"].numpy()[0] == 1

    # Transfer: PGD on the base (both losses, random restarts) goes up the ramp to mu + 6u and
    # fools the base there, but the shell's ball around that point still holds mu: it stays right.
    for loss in ("xent", "cw"):
        x_t = attacks.pgd(base, x, y, epsilon=eps, steps=10, step_size=1.5, loss=loss,
                          restarts=3, seed=0).numpy()
        assert base(x_t).numpy().argmax() != 1, loss
        assert shell.embed(x_t)["label"].numpy()[0] == 1, loss

    # BPDA ranks the pocket above the ramp by the shell's own scores and steps towards it.
    out = bpda(shell, x, y, epsilon=eps, steps=10)
    assert out["success"][0] and out["shell_label"][0] == 2
    assert_in_ball_and_box(out["x_adv"], x, eps)
    assert shell.embed(out["x_adv"])["label"].numpy()[0] == 2
    # A failure of the shell, not of the base: the base is right where the shell is fooled.
    assert base(out["x_adv"]).numpy().argmax() == 1


class CliffBase(keras.layers.Layer):
    """Three classes around a grey image ``mu``, two orthogonal sign directions ``u`` and ``v``.

    ``Z_1 = 10 exp(-ms(x, mu) / 72)``: the true class, a bump at ``mu`` (``ms``: mean squared
    pixel difference). ``Z_0 = 8 tanh(0.2 p_u) + 0.5``: a capped ramp along ``u`` (``p_u`` the mean
    of ``u (x - mu)``, in pixels); its gradient dominates the base's loss at ``mu``.
    ``Z_2 = 16 sigmoid(2 (p_v - s0)) + 0.05 p_v``: a cliff along ``v`` at ``s0 = eps + delta / 2``,
    with a gentle slope that points there: class 2 is confident only beyond ``eps`` (out of the
    base attacker's reach, and of the shell's at ``mu``), within ``eps + delta``.
    """

    def __init__(self, u, v, s0, **kwargs):
        super().__init__(**kwargs)
        self.u, self.v = tf.constant(u, tf.float32), tf.constant(v, tf.float32)
        self.mu, self.s0 = 127.5, float(s0)

    def call(self, x):
        z = tf.reshape(x, [-1, D]) - self.mu
        ramp = 8.0 * tf.tanh(0.2 * tf.reduce_mean(z * self.u, 1)) + 0.5
        bump = 10.0 * tf.exp(-tf.reduce_mean(z**2, 1) / 72.0)
        p_v = tf.reduce_mean(z * self.v, 1)
        cliff = 16.0 * tf.sigmoid(2.0 * (p_v - self.s0)) + 0.05 * p_v
        return tf.stack([ramp, bump, cliff], 1)


def test_lift_breaks_mcn_where_transfer_attacks_from_the_base_do_not():
    rng = np.random.default_rng(0)
    u = rng.choice([-1.0, 1.0], D)
    v = np.where(np.isin(np.arange(D), rng.permutation(D)[: D // 2]), -u, u)
    eps, delta = 4.0, 6.0
    inp = keras.Input(SHAPE)
    base = keras.Model(inp, CliffBase(u, v, s0=eps + delta / 2)(inp))
    x = np.full((1,) + SHAPE, 127.5, np.float32)
    y = np.array([1], np.int32)
    shell = MCNShell(base, delta, steps=10)
    assert base(x).numpy().argmax() == 1 and shell.embed(x)["label"].numpy()[0] == 1

    # Transfer: untargeted attacks on the base go up the ramp (or to random corners); the shell's
    # ball around their x' still holds mu, and the cliff stays out of its reach: it stays right.
    transfers = [attacks.pgd(base, x, y, epsilon=eps, steps=10, step_size=1.0, loss=loss,
                             random_start=False) for loss in ("xent", "cw")]
    transfers.append(attacks.apgd_ce(base, x, y, epsilon=eps, steps=10, restarts=2))
    for x_t in transfers:
        assert_in_ball_and_box(np.asarray(x_t), x, eps)
        assert shell.embed(x_t)["label"].numpy()[0] == 1

    # Lift: the base's most confident class-2 point within eps + delta, clipped to the eps ball,
    # puts the cliff within delta of x': MCN answers 2 there, though the base is right.
    out = attacks.lift(shell, x, y, epsilon=eps, steps=10)
    assert out["success"][0] and out["shell_label"][0] == 2 and out["target"][0] == 2
    # At x the shell ranks the ramp's class 0 above class 2: lifting 0 fails (the ramp is capped
    # and mu stays within delta), the second target breaks it, at x' itself.
    np.testing.assert_array_equal(attacks.target_order(shell, x, y), [[0, 2]])
    assert out["run"][0] == 1 and out["steps_used"][0] == 0
    assert out["shell_evals"][0] == 3 and out["base_passes"][0] == 2 * 10
    assert_in_ball_and_box(out["x_adv"], x, eps)
    assert shell.embed(out["x_adv"])["label"].numpy()[0] == 2
    assert base(out["x_adv"]).numpy().argmax() == 1
    # x' is the eps-corner along v: the lifted point mu + (eps + delta) v, clipped.
    np.testing.assert_allclose(out["x_adv"].reshape(-1), 127.5 + eps * v, atol=TOL)


# ------------------------------------------------------------------------------------------------
# A shell with real robustness: the nearest-centre base on the synthetic manifold


def test_a_provably_robust_shell_is_not_broken_inside_its_radius_but_is_beyond():
    # Logits -||x - mu_c||^2 / T are linear up to a shared term: Z_y - Z_j = m_j(x) + (w_y - w_j).(z
    # - x) with |.| <= r |w_y - w_j|_1 on N(x, r). If every pairwise margin exceeds log(C - 1) on
    # N(x, eps + delta), then lo_y > 0 > lo_t there for every t != y, and MCN_delta (whose points
    # all lie in N(x', delta), inside N(x, eps + delta)) answers y at every x' of N(x, eps),
    # whatever its optimiser does. So eps < min_j (m_j(x) - log(C - 1)) / |w_y - w_j|_1 - delta
    # is a proof, and no verified attack may succeed there.
    c, temperature, delta = 4, 1e4, 8.0
    centres, _ = synthetic_manifold(num_classes=c, seed=1)
    x, y = synthetic_arrays("test", num_examples=4, num_classes=c, seed=1)
    kernel, bias = nearest_centre_weights(centres, temperature)
    base = nearest_centre_model(centres, temperature)
    logits = np_logits(x, kernel, bias)
    radius = np.full(len(x), np.inf)  # the proven radius, and the base's own L-inf radius
    base_radius = np.full(len(x), np.inf)
    for i in range(len(x)):
        for j in set(range(c)) - {y[i]}:
            gap = logits[i, y[i]] - logits[i, j]
            norm = np.abs(kernel[:, y[i]] - kernel[:, j]).sum()
            radius[i] = min(radius[i], (gap - np.log(c - 1)) / norm - delta)
            base_radius[i] = min(base_radius[i], gap / norm)
    assert radius.min() > 4.0, radius  # a radius worth testing
    shell = MCNShell(base, delta, steps=5)
    np.testing.assert_array_equal(shell.embed(x)["label"].numpy(), y)

    eps = 0.95 * radius.min()
    for out in (attacks.bpda_restarts(shell, x, y, epsilon=eps, steps=5, random_restarts=1),
                attacks.bpda_targeted(shell, x, y, epsilon=eps, steps=5, num_targets="all"),
                attacks.lift(shell, x, y, epsilon=eps, steps=5, bpda_steps=2)):
        assert not out["success"].any()
        assert_in_ball_and_box(out["x_adv"], x, eps)
        assert (out["margin"] < 0).all()
    # Not vacuous: beyond the base's own radius (MCN answers as the base, nearly) it falls.
    big = float(min(1.2 * base_radius.max(), 255.0))
    out = attacks.bpda_restarts(shell, x, y, epsilon=big, steps=5)
    assert out["success"].all(), (big, base_radius)
    np.testing.assert_array_equal(shell.embed(out["x_adv"])["label"].numpy() != y, True)


# ------------------------------------------------------------------------------------------------
# Invariants of the strengthened attacks on every shell


@pytest.fixture(scope="module")
def cw_shell(conv):
    base = conv[0]
    return CarliniWagnerShell(base, max_iterations=4)


@pytest.mark.parametrize("kind", ["mcn", "ncn", "cw"])
@pytest.mark.parametrize("attack", ["restarts", "top_k", "lift"])
def test_suite_outputs_are_verified_in_the_ball_and_deterministic(conv, cw_shell, kind, attack):
    base, x, shells = conv
    shell = cw_shell if kind == "cw" else shells[kind]
    y = shell.embed(x)["label"].numpy()
    eps, calls = 3.0, []

    def run():
        kwargs = dict(epsilon=eps, seed=3, progress=lambda *a: calls.append(a))
        if attack == "restarts":
            return attacks.bpda_restarts(shell, x, y, steps=3, x_init=np.clip(x + 2.0, 0, 255),
                                         random_restarts=1, **kwargs)
        if attack == "top_k":
            return attacks.bpda_targeted(shell, x, y, steps=3, num_targets=2, **kwargs)
        return attacks.lift(shell, x, y, steps=4, bpda_steps=2, **kwargs)

    out = run()
    assert set(out) == set(RESULT_KEYS)
    assert_in_ball_and_box(out["x_adv"], x, eps)
    assert out["success"].any(), out  # not vacuous
    fresh = shell.embed(out["x_adv"])["label"].numpy()
    np.testing.assert_array_equal(out["shell_label"], fresh)
    np.testing.assert_array_equal(out["success"], fresh != y)
    np.testing.assert_array_equal(out["margin"] > 0, out["success"])  # a margin of the shell's rule
    assert (out["shell_evals"] >= 1).all() and (out["base_passes"] >= 0).all()
    assert ((out["target"] == -1) | (out["target"] != y)).all()
    # progress: (done, total, standing), done never decreasing, ending at total.
    done, total, standing = np.array(calls).T
    assert (np.diff(done) >= 0).all() and done[-1] == total[-1] and (done <= total).all()
    assert standing[-1] == (~out["success"]).sum()
    again = run()
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])
    # One trace of each compiled piece, whatever the batch sizes met.
    assert list(compiled.tracing_counts(base, "bpda").values()) == [1]
    assert set(compiled.tracing_counts(base, "bpda_lift").values()) <= {1}


def test_eot_on_a_random_start_mcn_shell_verifies_each_success_on_a_fresh_draw(conv):
    # MCN with a random start is random only through its seed (and the batch layout: one point
    # per call here, so a re-evaluation reproduces the attack's check). EOT averages copies with
    # other seeds; the shell's own draw only judges success.
    base, x, _ = conv
    shell = MCNShell(base, 4.0, steps=2, random_start=True, seed=11)
    steps, broken = 4, 0
    for i in range(len(x)):
        xi = x[i:i + 1]
        yi = shell.embed(xi)["label"].numpy()
        out = bpda(shell, xi, yi, epsilon=3.0, steps=steps, schedule="apgd", eot_samples=3)
        assert_in_ball_and_box(out["x_adv"], xi, 3.0)
        fresh = shell.embed(out["x_adv"])["label"].numpy()
        np.testing.assert_array_equal(out["success"], fresh != yi)
        used = out["steps_used"]
        np.testing.assert_array_equal(out["shell_evals"], used + 1 + 3 * used)
        np.testing.assert_array_equal(out["base_passes"], 2 * 3 * used)
        broken += int(out["success"][0])
    assert 0 < broken < len(x)
    # The copies: three other seeds (the same for every call with seed=0), one trace each.
    copies = bpda_module._COPIES[shell]
    assert shell.seed not in copies and len(copies) == 3
    assert all(c.random_start and c.base is base for c in copies.values())
    assert all(c.embed_function.experimental_get_tracing_count() == 1 for c in copies.values())


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_naming_the_problem(conv):
    base, x, shells = conv
    shell = shells["mcn"]
    y = np.zeros(len(x), np.int32)
    with pytest.raises(ValueError, match="embed_function"):
        bpda(base, x, y, epsilon=1.0)
    with pytest.raises(ValueError, match="epsilon.*-1"):
        bpda(shell, x, y, epsilon=-1.0)
    with pytest.raises(ValueError, match="epsilon.*pixel range"):
        bpda(shell, x, y, epsilon=300.0)
    with pytest.raises(ValueError, match="steps.*-1"):
        bpda(shell, x, y, epsilon=1.0, steps=-1)
    with pytest.raises(ValueError, match="steps.*2.5"):
        bpda(shell, x, y, epsilon=1.0, steps=2.5)
    with pytest.raises(ValueError, match="step_size.*-0.5"):
        bpda(shell, x, y, epsilon=1.0, step_size=-0.5)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        bpda(shell, x, np.full(len(x), 3, np.int32), epsilon=1.0)
    with pytest.raises(ValueError, match=r"shape \[6\]"):
        bpda(shell, x, y[:4], epsilon=1.0)
    with pytest.raises(ValueError, match=r"\(8, 8, 3\).*\(32, 32, 3\)"):
        bpda(shell, np.zeros((2, 32, 32, 3), np.float32), y[:2], epsilon=1.0)
    with pytest.raises(ValueError, match=r"pixel values in \[0, 255\]"):
        bpda(shell, x / 255.0 - 0.5, y, epsilon=1.0)
    with pytest.raises(ValueError, match="x_init.*random_start"):
        bpda(shell, x, y, epsilon=1.0, x_init=x, random_start=True)
    with pytest.raises(ValueError, match=r"x_init must have shape \(6, 8, 8, 3\)"):
        bpda(shell, x, y, epsilon=1.0, x_init=x[:2])


def test_bad_inputs_of_the_strengthened_attacks_raise_naming_the_problem(conv):
    base, x, shells = conv
    shell = shells["mcn"]
    y = np.zeros(len(x), np.int32)
    with pytest.raises(ValueError, match=r"target must differ from y.*\[0, 1\]"):
        bpda(shell, x, y, epsilon=1.0, target=np.array([0, 0, 1, 2, 1, 2], np.int32))
    with pytest.raises(ValueError, match=r"target must lie in 0\.\.2"):
        bpda(shell, x, y, epsilon=1.0, target=np.full(len(x), 5, np.int32))
    with pytest.raises(ValueError, match="schedule.*'adam'"):
        bpda(shell, x, y, epsilon=1.0, schedule="adam")
    with pytest.raises(ValueError, match="step_size is for schedule='sign'.*0.5"):
        bpda(shell, x, y, epsilon=1.0, schedule="apgd", step_size=0.5)
    with pytest.raises(ValueError, match="eot_samples.*-1"):
        bpda(shell, x, y, epsilon=1.0, eot_samples=-1)
    with pytest.raises(ValueError, match="progress must be a callable.*int"):
        bpda(shell, x, y, epsilon=1.0, progress=3)
    with pytest.raises(ValueError, match=r"num_targets must be 'all' or 1\.\.2.*5"):
        attacks.bpda_targeted(shell, x, y, epsilon=1.0, num_targets=5)
    with pytest.raises(ValueError, match="num_targets.*'some'"):
        attacks.bpda_targeted(shell, x, y, epsilon=1.0, num_targets="some")
    with pytest.raises(ValueError, match="no start"):
        attacks.bpda_restarts(shell, x, y, epsilon=1.0, from_x=False)
    with pytest.raises(ValueError, match="random_restarts.*-2"):
        attacks.bpda_restarts(shell, x, y, epsilon=1.0, random_restarts=-2)
    with pytest.raises(ValueError, match=r"x_init must have shape \(6, 8, 8, 3\)"):
        attacks.bpda_restarts(shell, x, y, epsilon=1.0, x_init=x[:2])
    with pytest.raises(ValueError, match="epsilon \\+ delta.*exceeds the pixel range"):
        attacks.lift(shell, x, y, epsilon=250.0, delta=10.0)
    with pytest.raises(ValueError, match="delta.*-1"):
        attacks.lift(shell, x, y, epsilon=1.0, delta=-1.0)
    with pytest.raises(ValueError, match="bpda_steps.*1.5"):
        attacks.lift(shell, x, y, epsilon=1.0, bpda_steps=1.5)
    with pytest.raises(ValueError, match="embed_function"):
        attacks.lift(base, x, y, epsilon=1.0)
    with pytest.raises(ValueError, match=r"pixel values in \[0, 255\]"):
        attacks.bpda_targeted(shell, x / 255.0 - 0.5, y, epsilon=1.0)
