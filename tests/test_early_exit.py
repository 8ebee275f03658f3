"""Nothing spent on decided points: APGD and FAB let a broken point leave at a checkpoint.

Oracles: an uninterrupted run (``early_exit=False``, AutoAttack's way) on the same points, the
closed-form reach of a linear model, the clean-logit ranking of APGD-T's targets, and a fresh
prediction of the model.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import (
    assert_in_ball_and_box,
    assert_same_across_batches,
    linear_model,
    uniform_images,
)
from manifold_tf import attacks, compiled, projected
from manifold_tf.attacks.common import checkpoint_stops, predicted_wrong

SHAPE = (8, 8, 3)
DIM = int(np.prod(SHAPE))

small_conv = functools.partial(
    helpers.small_conv, classes=10, scale=1.0 / 64.0, offset=-2.0, filters=8, shape=SHAPE
)


@pytest.fixture(scope="module")
def conv():
    model = small_conv(seed=1)
    x = uniform_images(24, SHAPE, seed=3)
    y = np.argmax(model(x).numpy(), axis=1).astype(np.int32)
    return model, x, y


def test_stops_are_apgds_checkpoints_and_end_at_the_last_step():
    assert checkpoint_stops(100, True) == [22, 41, 57, 70, 80, 87, 93, 99, 100]
    assert checkpoint_stops(100, False) == [100]
    assert checkpoint_stops(3, True)[-1] == 3 and checkpoint_stops(0, False) == []


def test_a_segmented_run_with_rows_dropped_equals_one_uninterrupted_run():
    # Rows peak at different interior points (the step halvings matter); one row's success is
    # "component 0 beyond x + 4", so the successful-point bookkeeping is carried too.
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(20, 230, (5, 2, 2, 3)).astype(np.float32))
    c = tf.constant(rng.uniform(-7, 7, (5, 2, 2, 3)).astype(np.float32))

    def objective(z):
        f = -tf.reduce_sum(tf.square(z - x[: tf.shape(z)[0]] - c[: tf.shape(z)[0]]), [1, 2, 3])
        return f, (z - x[: tf.shape(z)[0]])[:, 0, 0, 0] > 4.0

    z0 = projected.random_start(x, 8.0, tf.constant([3, 4]))
    whole = projected.apgd_ascent(objective, x, z0, radius=8.0, steps=100)

    keep = tf.constant([0, 1, 2])  # rows 3, 4 leave at iteration 41; the objective slices rows
    state = projected.apgd_start(x, z0, 8.0)
    state = projected.apgd_iterate(objective, x, state, radius=8.0, steps=100, stop=22)
    state = projected.apgd_iterate(objective, x, state, radius=8.0, steps=100, stop=41)
    state = state.take(keep)
    xk = tf.gather(x, keep)
    state = projected.apgd_iterate(objective, xk, state, radius=8.0, steps=100)
    parts = projected.apgd_finish(objective, xk, state)
    assert int(state.i) == 100
    for full, part in zip(whole, parts, strict=True):
        np.testing.assert_array_equal(tf.gather(full, keep).numpy(), part.numpy())


def test_a_point_broken_early_pays_only_up_to_its_checkpoint():
    """Two classes, a linear model: a point breaks iff its margin is below the reach
    ``eps * ||w_y - w_t||_1``, and the first step (2 * eps, signed) reaches the corner, so a
    breakable point is misclassified from iteration 1 on and leaves at the first checkpoint."""
    rng = np.random.default_rng(1)
    w = rng.normal(0.0, 0.01, size=(DIM, 2))
    model = linear_model(SHAPE, w)
    eps, steps = 8.0, 20
    diff = w[:, 0] - w[:, 1]
    reach = eps * np.abs(diff).sum()
    ratios = np.array([0.1, 0.5, 0.9, 1.5, 3.0, 5.0])
    signs = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    x = rng.uniform(100.0, 155.0, size=(6, DIM))
    x = x + ((signs * ratios * reach - x @ diff) / np.abs(diff).sum())[:, None] * np.sign(diff)
    x = x.reshape((6,) + SHAPE).astype(np.float32)
    y = np.where(signs > 0, 0, 1).astype(np.int32)
    breakable = ratios < 1.0
    on = attacks.apgd_ce(model, x, y, epsilon=eps, settings=attacks.APGDSettings(steps=steps))
    off_settings = attacks.APGDSettings(steps=steps, early_exit=False)
    off = attacks.apgd_ce(model, x, y, epsilon=eps, settings=off_settings)
    first = projected.apgd_checkpoints(steps)[1]
    assert first == math.ceil(0.22 * steps) < steps
    np.testing.assert_array_equal(on.success, breakable)
    np.testing.assert_array_equal(off.success, breakable)
    np.testing.assert_array_equal(on.base_passes, np.where(breakable, first, steps))
    np.testing.assert_array_equal(off.base_passes, steps)
    np.testing.assert_array_equal(on.success, predicted_wrong(model, on.x_adv, y))
    np.testing.assert_array_equal(on.x_adv[~breakable], off.x_adv[~breakable])


@pytest.mark.parametrize(
    "name, kw",
    [
        ("apgd_ce", dict(epsilon=3.0, steps=12, restarts=2)),
        ("apgd_t", dict(epsilon=2.0, steps=12, num_targets=3)),
    ],
)
def test_apgd_breaks_the_same_points_and_the_others_end_as_without_early_exit(conv, name, kw):
    model, x, y = conv
    epsilon, knobs = kw["epsilon"], {k: v for k, v in kw.items() if k != "epsilon"}
    on_settings = attacks.APGDSettings(**knobs)
    off_settings = attacks.APGDSettings(early_exit=False, **knobs)
    on = getattr(attacks, name)(model, x, y, epsilon=epsilon, settings=on_settings, seed=2)
    off = getattr(attacks, name)(model, x, y, epsilon=epsilon, settings=off_settings, seed=2)
    ok = on.success
    assert 0 < ok.sum() < len(x), ok  # both paths run
    np.testing.assert_array_equal(ok, off.success)
    np.testing.assert_array_equal(ok, predicted_wrong(model, on.x_adv, y))
    assert_in_ball_and_box(on.x_adv, x, kw["epsilon"])
    # Broken by the same run (restart or target), at no more cost; some points for less.
    np.testing.assert_array_equal(on.details["run"], off.details["run"])
    np.testing.assert_array_equal(on.details["target"], off.details["target"])
    assert (on.base_passes <= off.base_passes).all()
    assert (on.base_passes[ok] < off.base_passes[ok]).any()
    # Never broken: the same iterates (up to the batch's float rounding: the points broken leave
    # the batch), the same points, every step paid.
    for field in ("x_adv", "score", "base_passes"):
        assert_same_across_batches(getattr(on, field)[~ok], getattr(off, field)[~ok], field)


def test_apgd_t_tries_targets_in_the_models_order_and_stops_at_the_first_success(conv):
    model, x, y = conv
    steps, num_targets = 12, 4
    settings = attacks.APGDSettings(steps=steps, num_targets=num_targets)
    res = attacks.apgd_t(model, x, y, epsilon=2.0, settings=settings, seed=5)
    clean = model(x).numpy()
    order = np.argsort(-clean, axis=1, kind="stable")
    ranked = order[order != y[:, None]].reshape(len(x), -1)  # wrong labels, highest logit first
    ok = res.success
    assert ok.any() and (~ok).any()
    # A broken point ran the targets before its breaking one in full, that one in part (or in
    # full when it broke in the last segment), and nothing after.
    runs = -(-res.base_passes[ok] // steps)  # targets tried
    assert (runs >= 1).all() and (runs <= num_targets).all()
    np.testing.assert_array_equal(res.details["target"][ok], ranked[ok, runs - 1])
    np.testing.assert_array_equal(res.details["run"][ok], runs - 1)
    np.testing.assert_array_equal(res.base_passes[~ok], num_targets * steps)


def test_fab_with_early_exit_breaks_the_same_points_for_less(conv):
    model, x, y = conv
    kw = dict(epsilon=2.0, seed=1)
    on_settings = attacks.FABSettings(steps=12, num_targets=3, early_exit=True)
    # FAB's default: the whole run (the smallest norm)
    off_settings = attacks.FABSettings(steps=12, num_targets=3)
    on = attacks.fab_t(model, x, y, settings=on_settings, **kw)
    off = attacks.fab_t(model, x, y, settings=off_settings, **kw)
    ok = on.success
    assert 0 < ok.sum() < len(x), ok
    np.testing.assert_array_equal(ok, off.success)
    np.testing.assert_array_equal(ok, predicted_wrong(model, on.x_adv, y))
    assert_in_ball_and_box(on.x_adv, x, kw["epsilon"])
    assert (on.base_passes <= off.base_passes).all()
    assert (on.base_passes[ok] < off.base_passes[ok]).any()
    assert (on.details["norm"][ok] <= kw["epsilon"]).all()
    # A point kept longer can only have found a smaller norm.
    assert (off.details["norm"][ok] <= on.details["norm"][ok]).all()
    # Never broken: every step paid; the iterates agree up to float rounding (the projection's
    # Newton loop runs until every row of the batch has converged).
    np.testing.assert_array_equal(on.base_passes[~ok], off.base_passes[~ok])
    np.testing.assert_allclose(on.x_adv[~ok], off.x_adv[~ok], atol=1e-3)


def test_one_trace_per_setting_for_every_batch_size_and_segment():
    model = small_conv(seed=6)
    for n, eps in ((7, 3.0), (4, 2.0)):
        x = uniform_images(n, SHAPE, seed=n)
        y = np.argmax(model(x).numpy(), axis=1).astype(np.int32)
        apgd = attacks.APGDSettings(steps=10, num_targets=2)
        attacks.apgd_ce(model, x, y, epsilon=eps, settings=apgd, seed=n)
        attacks.apgd_t(model, x, y, epsilon=eps, settings=apgd, seed=n)
        fab = attacks.FABSettings(steps=10, num_targets=2, early_exit=True)
        attacks.fab_t(model, x, y, epsilon=eps, settings=fab)
    counts = {
        k: c
        for kind in ("apgd", "apgd_finish", "fab", "fab_finish")
        for k, c in compiled.tracing_counts(model, kind).items()
    }
    assert len(counts) == 6 and all(c == 1 for c in counts.values()), counts
