"""APGD (Croce & Hein 2020): closed-form oracles on linear models, the step-size schedule, the DLR
losses, invariants, compilation and bad inputs."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import assert_in_ball_and_box, linear_model, uniform_images
from manifold_tf import attacks, compiled
from manifold_tf.attacks import AttackResult
from manifold_tf.attacks.apgd import APGDSettings, cross_entropy
from manifold_tf.attacks.runner import run_targets
from manifold_tf.projected import apgd_ascent, apgd_checkpoints, random_start

SHAPE = (8, 8, 3)
DIM = int(np.prod(SHAPE))
TOL = 1e-3  # pixels: float32 rounding of x +- epsilon


# The conv net of these tests: 10 classes spread over uniform noise images.
small_conv = functools.partial(
    helpers.small_conv, classes=10, scale=1.0 / 64.0, offset=-2.0, filters=16
)


def successes(model, x_adv, y) -> np.ndarray:
    return np.argmax(model(x_adv).numpy(), axis=1) != y


@pytest.fixture(scope="module")
def conv():
    model = small_conv()
    x = uniform_images(64, SHAPE, seed=0)
    y = np.argmax(model(x).numpy(), axis=1).astype(np.int32)
    return model, x, y


# ---- the optimiser: schedule and closed-form optima ----------------------------------------


def test_checkpoints_follow_the_paper():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (Croce & Hein 2020, Section 3.2).
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(50) == [0, 11, 21, 29, 35, 40, 44, 47, 50]
    assert apgd_checkpoints(0) == [0]


def test_ascent_reaches_the_corner_on_a_linear_objective():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (3, 4, 4, 3)).astype(np.float32))  # some corners clip
    w = tf.constant(rng.normal(size=(3, 4, 4, 3)).astype(np.float32))

    def objective(z):
        return tf.reduce_sum(w * z, axis=[1, 2, 3])

    z, f = apgd_ascent(objective, x, random_start(x, 8.0, tf.constant([1, 2])), radius=8.0, steps=5)
    expected = np.clip(x + 8.0 * np.sign(w), 0, 255)
    np.testing.assert_allclose(z.numpy(), expected, atol=TOL)
    np.testing.assert_allclose(f.numpy(), objective(tf.constant(expected)).numpy(), rtol=1e-5)


def test_step_halving_converges_to_an_interior_maximum():
    # Peaked at x + c inside the ball: a fixed step of 2 * radius = 16 would bounce between the
    # faces of the ball; the halvings (8 checkpoints in 100 steps: eta down to 16 / 2^8) must not.
    x = tf.fill([2, 1, 1, 3], 100.0)
    c = tf.constant([[1.3, -2.7, 5.1], [0.2, 7.5, -6.1]])[:, None, None, :]

    def objective(z):
        return -tf.reduce_sum(tf.square(z - x - c), axis=[1, 2, 3])

    z, f = apgd_ascent(objective, x, x, radius=8.0, steps=100)
    np.testing.assert_allclose(z.numpy(), (x + c).numpy(), atol=0.1)
    np.testing.assert_allclose(f.numpy(), objective(z).numpy())
    # One run without checkpoints (steps=3 has none before the end) stays on a face of the ball.
    z3, _ = apgd_ascent(objective, x, x, radius=8.0, steps=3)
    assert np.abs(z3.numpy() - (x + c).numpy()).max() > 0.5


def test_ascent_with_success_prefers_successful_points():
    # Success is "z > x + 4"; the objective peaks at x + 2, so the best successful point is not
    # the best point.
    x = tf.fill([1, 1, 1, 1], 50.0)

    def objective(z):
        return (
            -tf.reduce_sum(tf.square(z - x - 2.0), axis=[1, 2, 3]),
            tf.reduce_min(z - x, axis=[1, 2, 3]) > 4.0,
        )

    z, f, ok = apgd_ascent(objective, x, x, radius=8.0, steps=20)
    assert bool(ok[0]) and float(z[0, 0, 0, 0]) > 54.0
    np.testing.assert_allclose(f.numpy(), objective(z)[0].numpy())


# ---- closed-form oracle on a linear model ---------------------------------------------------


def test_apgd_ce_breaks_exactly_the_points_within_reach_on_a_linear_model():
    """Two classes: the cross-entropy grows with the margin ``Z_t - Z_y``, whose maximum over the
    ball is the corner ``x + eps * sign(w_t - w_y)``; a point breaks iff its margin
    ``Z_y - Z_t < eps * ||w_y - w_t||_1``. Images stay 10 pixels away from the box edges. The
    largest margins (~50 logits) saturate a float32 softmax: with TF's cross-entropy gradient the
    last two points would not reach their corners."""
    rng = np.random.default_rng(1)
    w = rng.normal(0.0, 0.01, size=(DIM, 2))
    model = linear_model(SHAPE, w)
    eps = 8.0
    diff = w[:, 0] - w[:, 1]
    reach = eps * np.abs(diff).sum()  # the largest change of Z_0 - Z_1 inside the ball
    ratios = np.array([0.1, 0.5, 0.9, 0.97, 1.03, 1.1, 1.5, 3.0])  # margin / reach
    signs = np.tile([1.0, -1.0], 4)
    x = rng.uniform(100.0, 155.0, size=(8, DIM))
    # Move each x along sign(diff) to set Z_0 - Z_1 = sign * ratio * reach exactly.
    shift = (signs * ratios * reach - x @ diff) / np.abs(diff).sum()
    x = x + shift[:, None] * np.sign(diff)[None]
    assert x.min() > 10.0 + eps and x.max() < 245.0 - eps, (x.min(), x.max())
    x = x.reshape((8,) + SHAPE).astype(np.float32)
    y = np.where(signs > 0, 0, 1).astype(np.int32)
    np.testing.assert_array_equal(np.argmax(model(x).numpy(), axis=1), y)

    res = attacks.apgd_ce(model, x, y, epsilon=eps, settings=APGDSettings(steps=10), seed=0)
    x_adv = res.x_adv
    np.testing.assert_array_equal(successes(model, x_adv, y), ratios < 1.0)
    np.testing.assert_array_equal(res.success, ratios < 1.0)
    # One run of 10 steps; a broken point leaves at the first checkpoint (3) after its break.
    np.testing.assert_array_equal(res.base_passes, np.where(ratios < 1.0, 3, 10))
    np.testing.assert_array_equal(res.details["run"], 0)
    np.testing.assert_array_equal(res.details["target"], -1)
    for i in range(len(x)):
        toward = np.sign(w[:, 1 - y[i]] - w[:, y[i]]).reshape(SHAPE)
        np.testing.assert_allclose(x_adv[i], np.clip(x[i] + eps * toward, 0, 255), atol=TOL)


# ---- losses --------------------------------------------------------------------------------


def test_cross_entropy_keeps_its_gradient_direction_when_saturated():
    logits = tf.constant([[2.0, -1.0, 0.5], [60.0, 0.0, 1.0], [0.0, 0.0, 90.0]])
    y = tf.constant([0, 0, 2])
    z = logits.numpy().astype(np.float64)
    exact = np.log(np.exp(z).sum(axis=1)) - z[np.arange(3), y.numpy()]
    exact[1] = np.exp(-60.0) + np.exp(-59.0)  # log1p of it, where float64 log(sum exp) rounds
    exact[2] = 2 * np.exp(-90.0)  # below float32's normal range: flushed to 0
    np.testing.assert_allclose(cross_entropy(logits, y).numpy(), exact, rtol=1e-5, atol=1e-37)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        f = cross_entropy(logits, y)
    g = tape.gradient(f, logits).numpy()
    # Row 1: d/dZ = softmax - onehot, tiny but exact (TF's op gives [0, e^-60, e^-59] rounded:
    # the own-class entry 1 - p_y is lost); each row still sums to zero.
    p = np.exp([-60.0, -59.0])
    np.testing.assert_allclose(g[1], [-p.sum(), p[0], p[1]], rtol=1e-4)
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-6)


# ---- DLR losses --------------------------------------------------------------------------------


def test_dlr_losses_match_their_formulas_and_are_shift_and_scale_invariant():
    logits = np.array([[3.0, 1.0, 2.0, 0.0, -1.0], [0.5, 4.0, 1.0, 2.5, 0.0]], np.float32)
    y, t = np.array([0, 0]), np.array([2, 3])
    # Row 0 correct: -(3 - 2) / (3 - 1); row 1 wrong: -(0.5 - 4) / (4 - 1).
    np.testing.assert_allclose(attacks.dlr_loss(logits, y).numpy(), [-0.5, 3.5 / 3.0], rtol=1e-6)
    # Targeted: -(Z_y - Z_t) / (Z_pi1 - (Z_pi3 + Z_pi4) / 2).
    expected = [-(3.0 - 2.0) / (3.0 - 0.5), -(0.5 - 2.5) / (4.0 - 0.75)]
    np.testing.assert_allclose(attacks.dlr_targeted_loss(logits, y, t).numpy(), expected, rtol=1e-6)
    for fn, args in ((attacks.dlr_loss, (y,)), (attacks.dlr_targeted_loss, (y, t))):
        base = fn(logits, *args).numpy()
        np.testing.assert_allclose(fn(7.3 * logits - 11.0, *args).numpy(), base, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 3 classes"):
        attacks.dlr_loss(logits[:, :2], y)
    with pytest.raises(ValueError, match="at least 4 classes"):
        attacks.dlr_targeted_loss(logits[:, :3], y, t)


# ---- strength, invariants, compilation ------------------------------------------------------


def test_apgd_t_is_at_least_as_strong_as_pgd_and_apgd_ce(conv):
    model, x, y = conv
    eps = 2.0  # PGD-20 breaks about half of the points here
    pgd = successes(
        model, attacks.pgd(model, x, y, epsilon=eps, steps=20, step_size=eps / 4).x_adv, y
    )
    ce = successes(
        model, attacks.apgd_ce(model, x, y, epsilon=eps, settings=APGDSettings(steps=20)).x_adv, y
    )
    res = attacks.apgd_t(model, x, y, epsilon=eps, settings=APGDSettings(steps=20))
    t = successes(model, res.x_adv, y)
    np.testing.assert_array_equal(res.success, t)
    assert 0.2 < pgd.mean() < 0.8, pgd.mean()
    assert t.sum() >= pgd.sum() and t.sum() >= ce.sum(), (t.sum(), ce.sum(), pgd.sum())


def test_outputs_inside_ball_and_box_and_zero_budget_returns_x(conv):
    model, x, y = conv
    x, y = x[:6], y[:6]
    for attack in (attacks.apgd_ce, attacks.apgd_dlr, attacks.apgd_t):
        assert_in_ball_and_box(
            attack(model, x, y, epsilon=6.0, settings=APGDSettings(steps=4, restarts=2)).x_adv,
            x,
            6.0,
        )
        np.testing.assert_array_equal(
            attack(model, x, y, epsilon=0.0, settings=APGDSettings(steps=3)).x_adv, x
        )


def test_restarts_and_targets_only_attack_points_still_standing(conv):
    model, x, y = conv
    x, y = x[:16], y.copy()[:16]
    y[:3] = (y[:3] + 1) % 10  # three points misclassified from the start: returned unchanged
    kw = dict(epsilon=1.5, seed=4)
    res_one = attacks.apgd_ce(model, x, y, settings=APGDSettings(steps=6, restarts=1), **kw)
    res_many = attacks.apgd_ce(model, x, y, settings=APGDSettings(steps=6, restarts=3), **kw)
    one, many = res_one.x_adv, res_many.x_adv
    np.testing.assert_array_equal(one[:3], x[:3])
    np.testing.assert_array_equal(many[:3], x[:3])
    # ... as successes at no cost, by no run.
    for res in (res_one, res_many):
        assert res.success[:3].all()
        np.testing.assert_array_equal(res.base_passes[:3], 0)
        np.testing.assert_array_equal(res.details["run"][:3], -1)
        np.testing.assert_array_equal(res.success, successes(model, res.x_adv, y))
    # The first run is the same in both calls, and a broken point is never attacked again.
    broken = successes(model, one, y)
    broken[:3] = False
    assert broken.any()
    np.testing.assert_array_equal(many[broken], one[broken])
    assert np.all(successes(model, many, y)[broken])
    # Broken by the first run: it cost one run, later runs only for the others.
    np.testing.assert_array_equal(res_many.details["run"][broken], 0)
    np.testing.assert_array_equal(res_many.base_passes[broken], res_one.base_passes[broken])
    assert (res_one.base_passes[broken] <= 6).all()
    assert (res_many.base_passes[3:] <= 3 * 6).all()
    np.testing.assert_array_equal(res_many.base_passes[3:][~res_many.success[3:]], 3 * 6)
    res_few = attacks.apgd_t(model, x, y, settings=APGDSettings(steps=6, num_targets=1), **kw)
    res_more = attacks.apgd_t(model, x, y, settings=APGDSettings(steps=6, num_targets=4), **kw)
    few, more = successes(model, res_few.x_adv, y), successes(model, res_more.x_adv, y)
    assert np.all(more[few])
    # The target of the run each point keeps: a wrong label (see below for points not attacked).
    target = res_more.details["target"]
    assert ((target[3:] >= 0) & (target[3:] != y[3:])).all()


@pytest.mark.parametrize("attack", ["apgd_ce", "apgd_t"])
def test_points_misclassified_at_x_report_no_run_and_no_target(conv, attack):
    model, x, y = conv
    x, y = x[:4], y.copy()[:4]
    y[:2] = (y[:2] + 1) % 10  # misclassified from the start: not attacked
    res = getattr(attacks, attack)(model, x, y, epsilon=1.0, settings=APGDSettings(steps=1))
    np.testing.assert_array_equal(res.details["run"][:2], -1)
    np.testing.assert_array_equal(res.details["target"][:2], -1)


def test_deterministic_under_seed(conv):
    model, x, y = conv
    x, y = x[:8], y[:8]
    kw = dict(epsilon=1.0, settings=APGDSettings(steps=3, num_targets=2))
    a = attacks.apgd_t(model, x, y, seed=7, **kw).x_adv
    b = attacks.apgd_t(model, x, y, seed=7, **kw).x_adv
    c = attacks.apgd_t(model, x, y, seed=8, **kw).x_adv
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_compiled_once_per_setting_for_every_batch_size():
    model = small_conv(seed=3)
    rng = np.random.default_rng(0)
    for n, eps in ((5, 2.0), (5, 3.0), (3, 4.0)):  # the standing batch also shrinks per restart
        x = rng.uniform(0, 255, size=(n,) + SHAPE).astype(np.float32)
        y = np.argmax(model(x).numpy(), axis=1).astype(np.int32)
        attacks.apgd_ce(
            model, x, y, epsilon=eps, settings=APGDSettings(steps=3, restarts=2), seed=n
        )
        attacks.apgd_t(
            model, x, y, epsilon=eps, settings=APGDSettings(steps=3, num_targets=3), seed=n
        )
    counts = compiled.tracing_counts(model, "apgd")
    assert len(counts) == 2 and all(c == 1 for c in counts.values()), counts


# ---- bad inputs ---------------------------------------------------------------------------


def test_bad_inputs_raise(conv):
    model, x, y = conv
    x, y = x[:5], y[:5]
    with pytest.raises(ValueError, match="floating-point"):
        attacks.apgd_ce(model, x.astype(np.uint8), y, epsilon=1.0)
    with pytest.raises(ValueError, match="pixel values"):
        attacks.apgd_ce(model, x / 255.0 - 0.5, y, epsilon=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        attacks.apgd_t(model, x, y, epsilon=-1.0)
    with pytest.raises(ValueError, match=r"shape \[5\]"):
        attacks.apgd_ce(model, x, y[:3], epsilon=1.0)
    with pytest.raises(ValueError, match="restarts"):
        attacks.apgd_ce(model, x, y, epsilon=1.0, settings=APGDSettings(restarts=0))
    with pytest.raises(ValueError, match="num_targets"):
        attacks.apgd_t(model, x, y, epsilon=1.0, settings=APGDSettings(num_targets=10))
    three = small_conv(classes=3)
    with pytest.raises(ValueError, match="at least 4 classes"):
        attacks.apgd_t(three, x, np.zeros(5, np.int32), epsilon=1.0)


# ---- the settings object and the targets x restarts runner ------------------------------------


@pytest.mark.parametrize(
    "field, bad",
    [("steps", -1), ("steps", 2.5), ("restarts", 0), ("num_targets", 0), ("num_targets", True)],
)
def test_settings_refuse_bad_values_naming_the_field(field, bad):
    with pytest.raises(ValueError, match=field):
        APGDSettings(**{field: bad})


def test_settings_are_normalised_frozen_and_hashable():
    s = APGDSettings(steps=np.int64(5), restarts=2.0, early_exit=np.bool_(False))
    assert (s.steps, s.restarts, s.early_exit) == (5, 2, False)
    assert type(s.steps) is int and type(s.early_exit) is bool
    assert s == APGDSettings(steps=5, restarts=2, early_exit=False)
    assert hash(s) == hash(APGDSettings(steps=5, restarts=2, early_exit=False))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3


def test_run_targets_runs_every_restart_of_a_target_on_the_points_still_standing():
    # Point 0 (label 1): wrong labels by score 2, 3, 0; point 1 (label 0): 3, 2, 1; point 2 is
    # misclassified at x (label 0, argmax 1): broken before the first run, never attacked.
    clean = np.array([[0.0, 3.0, 2.0, 1.0], [5.0, 0.0, 1.0, 2.0], [1.0, 9.0, 0.0, 0.0]])
    x, y = np.zeros((3, 1, 1, 1), np.float32), np.array([1, 0, 0])
    calls = []

    def attack(xs, ys, idx, target, run):
        calls.append((run.rank, run.restart, run.index, idx.tolist(), target.tolist()))
        ok = (idx == 1) & (run.index == 1)  # the second run breaks point 1
        return AttackResult(xs, ok, base_passes=1, details=dict(target=target))

    def name(run):
        return f"t{run.rank}r{run.restart}"

    suite = run_targets(attack, x, y, clean, num_targets=2, restarts=2, name=name)
    assert calls == [
        (0, 0, 0, [0, 1], [2, 3]),
        (0, 1, 1, [0, 1], [2, 3]),
        (1, 0, 2, [0], [3]),
        (1, 1, 3, [0], [3]),
    ]
    assert list(suite.attempted) == ["t0r0", "t0r1", "t1r0", "t1r1"]
    assert suite.broken_by.tolist() == ["", "t0r1", "clean"]
    np.testing.assert_array_equal(suite.result.base_passes, [4, 2, 0])
    np.testing.assert_array_equal(suite.result.details["target"], [2, 3, -1])
    # Untargeted: one set of runs, target -1; restarts=0: no run at all.
    calls.clear()
    run_targets(attack, x, y, clean, num_targets=None, restarts=2, name=name)
    assert [c[4] for c in calls] == [[-1, -1], [-1, -1]]
    calls.clear()
    none = run_targets(attack, x, y, clean, num_targets=None, restarts=0, name=name).result
    assert calls == []
    np.testing.assert_array_equal(none.details["run"], [-1, -1, -1])
    np.testing.assert_array_equal(none.success, [False, False, True])
