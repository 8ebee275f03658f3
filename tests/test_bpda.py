"""Tests of the adaptive (BPDA) attack on the shells: invariants, a closed-form oracle, a control."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from manifold_tf import attacks, compiled
from manifold_tf.attacks.bpda import bpda
from manifold_tf.shells import MCNShell, NCNShell

SHAPE = (8, 8, 3)
D = int(np.prod(SHAPE))
TOL = 1e-3  # pixels: float32 rounding of x +- epsilon


def small_conv(seed: int = 0) -> keras.Model:
    """A random 3-class conv net whose prediction varies over the box (Flatten, not pooling)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE)
    h = keras.layers.Rescaling(1.0 / 32.0, offset=-4.0)(inp)
    h = keras.layers.Conv2D(4, 3, activation="relu")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(3)(h))


@pytest.fixture(scope="module")
def conv():
    base = small_conv()
    x = np.random.default_rng(1).uniform(0.0, 255.0, size=(6,) + SHAPE).astype(np.float32)
    shells = {
        "mcn": MCNShell(base, 4.0, steps=2),
        "ncn": NCNShell(base, 0.5, delta_max=4.0, steps=2, rounds=1),
    }
    return base, x, shells


def assert_in_ball(x_adv, x, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert np.abs(x_adv - x).max() <= eps + TOL
    assert x_adv.min() >= 0.0 and x_adv.max() <= 255.0


# ------------------------------------------------------------------------------------------------
# Invariants on a small conv base


@pytest.mark.parametrize("kind", ["mcn", "ncn"])
def test_outputs_stay_in_the_ball_and_success_is_the_shells_answer(conv, kind):
    base, x, shells = conv
    shell = shells[kind]
    y = shell.embed(x)["label"].numpy()  # the shell's clean answers: success = the attack moved it
    eps, steps = 3.0, 4
    out = bpda(shell, x, y, epsilon=eps, steps=steps, random_start=True, seed=1)
    assert set(out) == {"x_adv", "success", "shell_label", "steps_used", "margin"}
    assert_in_ball(out["x_adv"], x, eps)
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
    assert_in_ball(out["x_adv"], x, eps)


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


# ------------------------------------------------------------------------------------------------
# Closed-form oracle: a binary linear base


def linear_base(kernel: np.ndarray, bias: np.ndarray) -> keras.Model:
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.layers[-1].set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return model


def test_mcn_on_a_binary_linear_base_is_broken_exactly_below_the_linear_margin():
    # Logits W.x + b, a = w0 - w1, m(x) = Z0 - Z1 = a.x + b0 - b1 (= lo_0 = -lo_1 for 2 classes).
    # Away from the box, MCN_delta scores label 0 by m(x') + delta*|a|_1 and label 1 by
    # -m(x') + delta*|a|_1: its label is the base's, sign(m(x')). So the shell can be fooled in
    # N(x, eps) exactly when |m(x)| < eps*|a|_1, at the corner x - eps*sign(a) (y = 0). BPDA's
    # gradient is -2a here, so one signed step of size eps lands on that corner.
    rng = np.random.default_rng(0)
    w = rng.normal(0.0, 0.01, D)
    a = rng.choice([-1.0, 1.0], D) * rng.uniform(2e-3, 6e-3, D)
    kernel = np.stack([w, w - a], 1).astype(np.float32)
    a = kernel[:, 0].astype(np.float64) - kernel[:, 1]  # the difference the float32 model uses
    l1 = np.abs(a).sum()
    eps, delta = 6.0, 2.0
    raw = rng.uniform(100.0, 155.0, (8, D))
    bias = np.array([-(raw @ a).mean(), 0.0])
    ratio = np.array([0.5, 1.5] * 4) * np.repeat([1, -1], 4)  # target m(x) / (eps |a|_1)
    # Move each point along sign(a) until its margin is the target (a few pixels at most).
    x = raw + ((ratio * eps * l1 - raw @ a - bias[0]) / l1)[:, None] * np.sign(a)
    x = x.reshape((-1,) + SHAPE).astype(np.float32)
    assert x.min() > eps + delta and x.max() < 255.0 - eps - delta  # the box never binds
    m = x.reshape(len(x), -1).astype(np.float64) @ a + bias[0]
    np.testing.assert_allclose(m / (eps * l1), ratio, atol=1e-3)
    y = (m < 0).astype(np.int32)  # the base's (and the shell's) label
    shell = MCNShell(linear_base(kernel, bias), delta, steps=1)
    np.testing.assert_array_equal(shell.embed(x)["label"].numpy(), y)

    out = bpda(shell, x, y, epsilon=eps, steps=3, step_size=eps)
    breakable = np.abs(ratio) < 1.0
    np.testing.assert_array_equal(out["success"], breakable)
    np.testing.assert_array_equal(out["steps_used"], np.where(breakable, 1, 3))
    # Every point ends at its optimal corner: where the attack fails, nothing better exists.
    direction = np.where(y == 0, -1.0, 1.0)[:, None] * np.sign(a)
    corner = x + eps * direction.reshape((-1,) + SHAPE)
    np.testing.assert_allclose(out["x_adv"], corner, atol=TOL)
    # There (y = 0) m(corner) = (ratio - 1) eps |a|_1 and the surrogate lo_1 - lo_0 is
    # -2 m(corner) = 2 (1 - ratio) eps |a|_1: +eps |a|_1 for ratio 0.5, -eps |a|_1 for 1.5.
    expected = np.where(breakable, 1.0, -1.0) * eps * l1
    np.testing.assert_allclose(out["margin"], expected, rtol=2e-3)


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
    assert_in_ball(out["x_adv"], x, eps)
    assert shell.embed(out["x_adv"])["label"].numpy()[0] == 2
    # A failure of the shell, not of the base: the base is right where the shell is fooled.
    assert base(out["x_adv"]).numpy().argmax() == 1


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
