"""Tests of the strengthened attacks on the shells (bpda_restarts, bpda_targeted, lift): controls
where only an attack on the shell succeeds, a provably robust shell, invariants on every shell."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import (
    assert_in_ball_and_box,
    assert_results_equal,
    nearest_centre_model,
    nearest_centre_weights,
    np_logits,
    small_conv,
    uniform_images,
)
from manifold_tf import attacks, compiled
from manifold_tf.attacks import AttackResult, bpda
from manifold_tf.data import synthetic_arrays, synthetic_manifold
from manifold_tf.shells import CarliniWagnerShell, MCNShell, NCNShell

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
# Control: an attack on the shell finds what a transfer attack on the base cannot


class PocketBase(keras.layers.Layer):
    """Three classes around a grey image ``mu`` with two orthogonal sign directions ``u`` and ``v``.

    ``Z_1 = 10 exp(-ms(x, mu) / 72)``: the true class, a bump at ``mu``.
    ``Z_0 = 8 tanh(0.2 mean(u (x - mu))) + 0.5``: a capped ramp along ``u``; its gradient
    dominates the base's loss at ``x = mu``, and at ``mu + 6u`` it beats the (shrunk) bump: the
    base is fooled.
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
        settings = attacks.PGDSettings(loss=loss, restarts=3)
        res = attacks.pgd(
            base, x, y, epsilon=eps, steps=10, step_size=1.5, settings=settings, seed=0
        )
        x_t = res.x_adv
        assert res.success[0], loss
        assert base(x_t).numpy().argmax() != 1, loss
        assert shell.embed(x_t)["label"].numpy()[0] == 1, loss

    # BPDA ranks the pocket above the ramp by the shell's own scores and steps towards it.
    out = bpda(shell, x, y, epsilon=eps, settings=attacks.BPDASettings(steps=10))
    assert out.success[0] and out.details["shell_label"][0] == 2
    assert_in_ball_and_box(out.x_adv, x, eps)
    assert shell.embed(out.x_adv)["label"].numpy()[0] == 2
    # A failure of the shell, not of the base: the base is right where the shell is fooled.
    assert base(out.x_adv).numpy().argmax() == 1


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
    transfers = [
        attacks.pgd(
            base,
            x,
            y,
            epsilon=eps,
            steps=10,
            step_size=1.0,
            settings=attacks.PGDSettings(loss=loss, random_start=False),
        ).x_adv
        for loss in ("xent", "cw")
    ]
    apgd = attacks.APGDSettings(steps=10, restarts=2)
    transfers.append(attacks.apgd_ce(base, x, y, epsilon=eps, settings=apgd).x_adv)
    for x_t in transfers:
        assert_in_ball_and_box(x_t, x, eps)
        assert shell.embed(x_t)["label"].numpy()[0] == 1

    # Lift: the base's most confident class-2 point within eps + delta, clipped to the eps ball,
    # puts the cliff within delta of x': MCN answers 2 there, though the base is right.
    out = attacks.lift(shell, x, y, epsilon=eps, settings=attacks.LiftSettings(steps=10))
    assert out.success[0] and out.details["shell_label"][0] == 2 and out.details["target"][0] == 2
    # At x the shell ranks the ramp's class 0 above class 2: lifting 0 fails (the ramp is capped
    # and mu stays within delta), the second target breaks it, at x' itself.
    np.testing.assert_array_equal(attacks.target_order(shell, x, y), [[0, 2]])
    assert out.details["run"][0] == 1 and out.details["steps_used"][0] == 0
    assert out.shell_predictions[0] == 3 and out.base_passes[0] == 2 * 10
    assert_in_ball_and_box(out.x_adv, x, eps)
    assert shell.embed(out.x_adv)["label"].numpy()[0] == 2
    assert base(out.x_adv).numpy().argmax() == 1
    # x' is the eps-corner along v: the lifted point mu + (eps + delta) v, clipped.
    np.testing.assert_allclose(out.x_adv.reshape(-1), 127.5 + eps * v, atol=TOL)


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
    for out in (
        attacks.bpda_restarts(
            shell,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(schedule="apgd", steps=5, random_restarts=1),
        ),
        attacks.bpda_targeted(
            shell,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(schedule="apgd", steps=5, num_targets="all"),
        ),
        attacks.lift(
            shell, x, y, epsilon=eps, settings=attacks.LiftSettings(steps=5, bpda_steps=2)
        ),
    ):
        assert not out.success.any()
        assert_in_ball_and_box(out.x_adv, x, eps)
        assert (out.score < 0).all()
    # Not vacuous: beyond the base's own radius (MCN answers as the base, nearly) it falls.
    big = float(min(1.2 * base_radius.max(), 255.0))
    out = attacks.bpda_restarts(
        shell, x, y, epsilon=big, settings=attacks.BPDASettings(schedule="apgd", steps=5)
    )
    assert out.success.all(), (big, base_radius)
    np.testing.assert_array_equal(shell.embed(out.x_adv)["label"].numpy() != y, True)


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
            return attacks.bpda_restarts(
                shell,
                x,
                y,
                settings=attacks.BPDASettings(schedule="apgd", steps=3, random_restarts=1),
                x_init=np.clip(x + 2.0, 0, 255),
                **kwargs,
            )
        if attack == "top_k":
            return attacks.bpda_targeted(
                shell,
                x,
                y,
                settings=attacks.BPDASettings(schedule="apgd", steps=3, num_targets=2),
                **kwargs,
            )
        return attacks.lift(
            shell, x, y, settings=attacks.LiftSettings(steps=4, bpda_steps=2), **kwargs
        )

    out = run()
    assert isinstance(out, AttackResult)
    assert set(out.details) == {"shell_label", "steps_used", "target", "run"}
    assert_in_ball_and_box(out.x_adv, x, eps)
    assert out.success.any(), out  # not vacuous
    fresh = shell.embed(out.x_adv)["label"].numpy()
    np.testing.assert_array_equal(out.details["shell_label"], fresh)
    np.testing.assert_array_equal(out.success, fresh != y)
    np.testing.assert_array_equal(out.score > 0, out.success)  # a margin of the shell's rule
    assert (out.shell_predictions >= 1).all() and (out.base_passes >= 0).all()
    assert ((out.details["target"] == -1) | (out.details["target"] != y)).all()
    # progress: (done, total, standing), done never decreasing, ending at total.
    done, total, standing = np.array(calls).T
    assert (np.diff(done) >= 0).all() and done[-1] == total[-1] and (done <= total).all()
    assert standing[-1] == (~out.success).sum()
    again = run()
    assert_results_equal(out, again)
    # One trace of each compiled piece, whatever the batch sizes met.
    assert list(compiled.tracing_counts(base, "bpda").values()) == [1]
    assert set(compiled.tracing_counts(base, "bpda_lift").values()) <= {1}


def test_bad_inputs_of_the_strengthened_attacks_raise_naming_the_problem(conv):
    base, x, shells = conv
    shell = shells["mcn"]
    y = np.zeros(len(x), np.int32)
    with pytest.raises(ValueError, match=r"target must differ from y.*\[0, 1\]"):
        bpda(shell, x, y, epsilon=1.0, target=np.array([0, 0, 1, 2, 1, 2], np.int32))
    with pytest.raises(ValueError, match=r"target must lie in 0\.\.2"):
        bpda(shell, x, y, epsilon=1.0, target=np.full(len(x), 5, np.int32))
    with pytest.raises(ValueError, match="schedule.*'adam'"):
        bpda(shell, x, y, epsilon=1.0, settings=attacks.BPDASettings(schedule="adam"))
    with pytest.raises(ValueError, match="step_size is for schedule='sign'.*0.5"):
        bpda(
            shell, x, y, epsilon=1.0, settings=attacks.BPDASettings(schedule="apgd", step_size=0.5)
        )
    with pytest.raises(ValueError, match="eot_samples.*-1"):
        bpda(shell, x, y, epsilon=1.0, settings=attacks.BPDASettings(eot_samples=-1))
    with pytest.raises(ValueError, match="progress must be a callable.*int"):
        bpda(shell, x, y, epsilon=1.0, progress=3)
    with pytest.raises(ValueError, match=r"num_targets must be 'all' or 1\.\.2.*5"):
        attacks.bpda_targeted(
            shell, x, y, epsilon=1.0, settings=attacks.BPDASettings(schedule="apgd", num_targets=5)
        )
    with pytest.raises(ValueError, match="num_targets.*'some'"):
        attacks.bpda_targeted(
            shell,
            x,
            y,
            epsilon=1.0,
            settings=attacks.BPDASettings(schedule="apgd", num_targets="some"),
        )
    with pytest.raises(ValueError, match="no start"):
        attacks.bpda_restarts(
            shell, x, y, epsilon=1.0, settings=attacks.BPDASettings(schedule="apgd", from_x=False)
        )
    with pytest.raises(ValueError, match="random_restarts.*-2"):
        attacks.bpda_restarts(
            shell,
            x,
            y,
            epsilon=1.0,
            settings=attacks.BPDASettings(schedule="apgd", random_restarts=-2),
        )
    with pytest.raises(ValueError, match=r"x_init must have shape \(6, 8, 8, 3\)"):
        attacks.bpda_restarts(shell, x, y, epsilon=1.0, x_init=x[:2])
    with pytest.raises(ValueError, match="epsilon \\+ delta.*exceeds the pixel range"):
        attacks.lift(shell, x, y, epsilon=250.0, settings=attacks.LiftSettings(delta=10.0))
    with pytest.raises(ValueError, match="delta.*-1"):
        attacks.lift(shell, x, y, epsilon=1.0, settings=attacks.LiftSettings(delta=-1.0))
    with pytest.raises(ValueError, match="bpda_steps.*1.5"):
        attacks.lift(shell, x, y, epsilon=1.0, settings=attacks.LiftSettings(bpda_steps=1.5))
    with pytest.raises(ValueError, match="must be a model shell.*got Functional"):
        attacks.lift(base, x, y, epsilon=1.0)
    with pytest.raises(ValueError, match=r"pixel values in \[0, 255\]"):
        attacks.bpda_targeted(shell, x / 255.0 - 0.5, y, epsilon=1.0)


@pytest.mark.parametrize("attack", ["restarts", "top_k", "lift"])
def test_points_the_shell_gets_wrong_at_x_report_its_answer_there(conv, attack):
    _, x, shells = conv
    shell = shells["mcn"]
    label = shell.embed(x)["label"].numpy()
    y = label.copy()
    y[:3] = (label[:3] + 1) % 3  # the shell is wrong at x on the first three points
    if attack == "restarts":
        settings = attacks.BPDASettings(steps=1, schedule="apgd")
        out = attacks.bpda_restarts(shell, x, y, epsilon=2.0, settings=settings)
    elif attack == "top_k":
        settings = attacks.BPDASettings(steps=1, schedule="apgd", num_targets=1)
        out = attacks.bpda_targeted(shell, x, y, epsilon=2.0, settings=settings)
    else:
        settings = attacks.LiftSettings(steps=1, num_targets=1)
        out = attacks.lift(shell, x, y, epsilon=2.0, settings=settings)
    assert out.success[:3].all()
    np.testing.assert_array_equal(out.x_adv[:3], x[:3])
    np.testing.assert_array_equal(out.details["steps_used"][:3], 0)
    fresh = shell.embed(out.x_adv)["label"].numpy()
    np.testing.assert_array_equal(out.details["shell_label"], fresh)
    np.testing.assert_array_equal(out.success, fresh != y)
    np.testing.assert_array_equal(out.score > 0, out.success)  # the shell's (MCN) margin
    if attack != "top_k":  # untargeted runs, or no run (lift at x): no target
        np.testing.assert_array_equal(out.details["target"][:3], -1)


def test_settings_objects_validate_on_construction_naming_the_field(conv):
    """BPDASettings / LiftSettings refuse a bad knob when built (before any attack runs), hold
    normalised values, and are frozen; a chain refuses one run's random start."""
    base, x, shells = conv
    bad_bpda = [
        (dict(steps=-1), "steps.*-1"),
        (dict(schedule="adam"), "schedule.*'adam'"),
        (dict(schedule="apgd", step_size=1.0), "step_size is for schedule='sign'"),
        (dict(step_size=300.0), "step_size.*pixel range"),
        (dict(eot_samples=1.5), "eot_samples.*1.5"),
        (dict(warm_steps=-1), "warm_steps.*-1"),
        (dict(proxy=base), "proxy must be a copy of the shell.*Functional"),
        (dict(random_restarts=-1), "random_restarts.*-1"),
        (dict(num_targets=0), "num_targets.*0"),
        (dict(from_x="yes"), "from_x must be True or False"),
        (dict(random_start=None), "random_start must be True or False"),
    ]
    for kw, match in bad_bpda:
        with pytest.raises(ValueError, match=match):
            attacks.BPDASettings(**kw)
    bad_lift = [
        (dict(delta=-1.0), "delta.*-1"),
        (dict(steps=-2), "steps.*-2"),
        (dict(schedule="adam"), "schedule.*'adam'"),
        (dict(bpda_steps=0.5), "bpda_steps.*0.5"),
        (dict(eot_samples=-1), "eot_samples.*-1"),
        (dict(num_targets="most"), "num_targets.*'most'"),
    ]
    for kw, match in bad_lift:
        with pytest.raises(ValueError, match=match):
            attacks.LiftSettings(**kw)
    s = attacks.BPDASettings(steps=5.0, random_restarts=np.int64(2), num_targets=2.0)
    assert (s.steps, s.random_restarts, s.num_targets) == (5, 2, 2)
    assert all(type(v) is int for v in (s.steps, s.random_restarts, s.num_targets))
    assert attacks.BPDASettings(num_targets="all").num_targets == "all"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3
    assert attacks.LiftSettings(steps=4.0).steps == 4
    y = np.zeros(len(x), np.int32)
    with pytest.raises(ValueError, match="random_start is one run's start.*random_restarts"):
        attacks.bpda_restarts(
            shells["mcn"], x, y, epsilon=1.0, settings=attacks.BPDASettings(random_start=True)
        )
