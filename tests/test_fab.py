"""FAB (Croce & Hein 2020), L-inf: the box-aware projection against a linear program, closed-form
minimal perturbations of linear models (box free and box binding), invariants on a small conv net,
compilation and bad inputs. Units: pixels (0..255)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import linprog

import helpers
from helpers import assert_in_ball_and_box, linear_model, uniform_images
from manifold_tf import compiled
from manifold_tf.attacks.fab import FABSettings, fab, fab_t, project_linf_hyperplane

SHAPE = (4, 4, 3)
DIM = int(np.prod(SHAPE))
CLOSE = 1.01  # FAB's best norm over the minimal one, at most (measured: 1.0052 after 100 steps)

small_conv = functools.partial(
    helpers.small_conv, classes=10, scale=1.0 / 64.0, offset=-2.0, filters=8, shape=SHAPE
)


def float64_weights(model):
    kernel, bias = model.layers[-1].get_weights()
    return kernel.astype(np.float64), bias.astype(np.float64)


def lp_min_norm(x, a, c):
    """The smallest ``|d|_inf`` with ``a . (x + d) + c >= 0`` and ``x + d`` in [0, 255]: variables
    ``(d [D], lam)``, ``-lam <= d_i <= lam``. ``None`` when infeasible."""
    d = len(x)
    cost = np.r_[np.zeros(d), 1.0]
    eye = np.eye(d)
    a_ub = np.block(
        [[eye, -np.ones((d, 1))], [-eye, -np.ones((d, 1))], [-a[None], np.zeros((1, 1))]]
    )
    b_ub = np.r_[np.zeros(2 * d), a @ x + c]
    bounds = [(-xi, 255.0 - xi) for xi in x] + [(0, None)]
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    return res.x[-1] if res.status == 0 else None


# ---- the box-aware projection ---------------------------------------------------------------


def test_projection_is_the_linear_programs_minimum_and_a_corner_when_out_of_reach():
    rng = np.random.default_rng(0)
    m, d = 24, 30
    t = rng.uniform(0.0, 255.0, (m, d))
    faces = rng.random((m, d))
    t[faces < 0.2], t[faces > 0.8] = 0.0, 255.0  # coordinates that can move one way only
    t[:, 3] = rng.uniform(250.0, 255.0, m)  # and some with a little room
    w = rng.normal(size=(m, d))
    w[:, :2] = 0.0  # flat coordinates never move
    reach = np.abs(w) * np.where(w > 0, 255.0 - t, t)  # the largest w . d each way
    r = rng.uniform(0.05, 1.2, m) * reach.sum(1) * rng.choice([-1.0, 1.0], m)
    r[-1] = 0.0
    got = (
        project_linf_hyperplane(
            tf.constant(t, tf.float32), tf.constant(w, tf.float32), tf.constant(r, tf.float32)
        )
        .numpy()
        .astype(np.float64)
    )
    assert np.all(got[:, :2] == 0.0)
    assert np.all(t + got >= -1e-4) and np.all(t + got <= 255.0 + 1e-4)
    for i in range(m):
        # w . (t + d) = w . t + r: as an inequality in the direction of r.
        s = np.sign(r[i]) if r[i] else 1.0
        lam = lp_min_norm(t[i], s * w[i], -s * (w[i] @ t[i] + r[i]))
        if lam is None:  # out of reach: the far corner in the direction of r
            corner = np.where(s * w[i] > 0, 255.0 - t[i], -t[i]) * (w[i] != 0)
            np.testing.assert_allclose(got[i], corner, atol=1e-3)
            continue
        np.testing.assert_allclose(w[i] @ got[i], r[i], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(np.abs(got[i]).max(), lam, rtol=1e-4, atol=1e-4)
    assert np.any(
        [
            lp_min_norm(t[i], np.sign(r[i]) * w[i], -np.sign(r[i]) * (w[i] @ t[i] + r[i])) is None
            for i in range(m - 1)
        ]
    )  # the corner case was exercised


# ---- closed-form oracles on linear models ---------------------------------------------------


@pytest.fixture(scope="module")
def linear():
    """Four classes, logits ``W x + b``, points 60 pixels from the box: the minimal perturbation to
    label ``t`` is ``(Z_y - Z_t) / ||w_y - w_t||_1`` (at most ~40 pixels here, the box never
    binds)."""
    rng = np.random.default_rng(0)
    model = linear_model(SHAPE, rng.normal(0.0, 0.05, (DIM, 4)), rng.normal(0.0, 1.0, 4))
    x = rng.uniform(60.0, 195.0, (8,) + SHAPE).astype(np.float32)
    kernel, bias = float64_weights(model)
    z = x.reshape(len(x), -1).astype(np.float64) @ kernel + bias
    y = z.argmax(1).astype(np.int32)
    to = np.array(
        [
            [
                (z[i, y[i]] - z[i, t]) / np.abs(kernel[:, y[i]] - kernel[:, t]).sum()
                if t != y[i]
                else np.inf
                for t in range(4)
            ]
            for i in range(len(x))
        ]
    )
    assert to.min(1).max() < 60.0
    return model, x, y, z, to


def test_untargeted_finds_the_nearest_boundary(linear):
    model, x, y, _, to = linear
    res = fab(model, x, y, epsilon=60.0)
    ratio = res.details["norm"] / to.min(1)
    assert np.all(ratio >= 1.0 - 1e-5) and np.all(ratio <= CLOSE), ratio
    assert res.success.all()
    np.testing.assert_allclose(res.score, -res.details["norm"])
    np.testing.assert_array_equal(res.details["target"], -1)
    np.testing.assert_array_equal(res.base_passes, 100 * 4)  # the Jacobian: K gradients per step
    dist = np.abs(res.x_adv - x).reshape(len(x), -1).max(1)
    np.testing.assert_allclose(dist, res.details["norm"], rtol=1e-6)


def test_targeted_reaches_the_boundary_of_each_target(linear):
    model, x, y, z, to = linear
    order = np.argsort(-z, axis=1, kind="stable")
    t = order[:, 1]  # FAB-T's first target: the highest wrong clean logit
    res = fab_t(model, x, y, epsilon=60.0, settings=FABSettings(num_targets=1))
    ratio = res.details["norm"] / to[np.arange(len(x)), t]
    assert np.all(ratio >= 1.0 - 1e-5) and np.all(ratio <= CLOSE), ratio
    np.testing.assert_array_equal(res.details["target"], t)
    np.testing.assert_array_equal(res.base_passes, 100)  # one gradient per step
    # All three targets on points out of every target's reach: each run takes part.
    res = fab_t(model, x, y, epsilon=1.0, settings=FABSettings(num_targets=3, steps=100))
    assert not res.success.any()
    np.testing.assert_array_equal(res.base_passes, 300)
    # The kept run is the one of the smallest norm (the nearest of the three targets).
    near = np.min([to[np.arange(len(x)), order[:, j + 1]] for j in range(3)], axis=0)
    ratio = res.details["norm"] / near
    assert np.all(ratio >= 1.0 - 1e-5) and np.all(ratio <= CLOSE), ratio
    assert_in_ball_and_box(res.x_adv, x, 1.0)


@pytest.mark.parametrize("targeted", [False, True])
def test_success_iff_epsilon_above_the_minimal_norm(linear, targeted):
    model, x, y, _, to = linear
    x, y, best = x[:2], y[:2], to.min(1)[:2]
    for i in range(2):
        above = fab(
            model,
            x[i : i + 1],
            y[i : i + 1],
            epsilon=best[i] * 1.02,
            settings=FABSettings(num_targets=3),
            targeted=targeted,
        )
        below = fab(
            model,
            x[i : i + 1],
            y[i : i + 1],
            epsilon=best[i] * 0.98,
            settings=FABSettings(num_targets=3),
            targeted=targeted,
        )
        assert above.success[0] and not below.success[0], (above.details, below.details)
        assert_in_ball_and_box(below.x_adv, x[i : i + 1], best[i] * 0.98)


def test_box_constraint_binds_and_the_linear_programs_minimum_is_found():
    """Two classes, ``a = w_1 - w_0``: a third of the coordinates sit at the face of the box that
    ``sign(a)`` points to (they cannot move), a third have 1-5 pixels of room; the minimum norm,
    ~12 pixels, then differs from ``|Z_0 - Z_1| / ||a||_1`` and is read off a linear program."""
    rng = np.random.default_rng(3)
    kernel = rng.normal(0.0, 0.05, (DIM, 2)).astype(np.float32)
    a = kernel[:, 1].astype(np.float64) - kernel[:, 0]
    n = 4
    x = rng.uniform(60.0, 195.0, (n, DIM))
    group = np.arange(DIM) % 3
    face = np.where(a > 0, 255.0, 0.0)
    x[:, group == 0] = face[group == 0]
    room = rng.uniform(1.0, 5.0, (n, DIM))
    near = np.where(a > 0, 255.0 - room, room)
    x[:, group == 1] = near[:, group == 1]
    # Z_0 - Z_1 = c - a . x must equal margin (the reach at 12 pixels): the bias c sets it on
    # average, the free coordinates, moved against sign(a), for each point.
    free = group == 2
    margin = 12.0 * np.abs(a[free]).sum() + (np.abs(a) * room)[:, group == 1].sum(1)
    c = np.float32(np.mean(margin + x @ a))
    shift = (margin + x @ a - c) / np.abs(a[free]).sum()
    x[:, free] -= shift[:, None] * np.sign(a[free])
    assert x[:, free].min() > 20.0 and x[:, free].max() < 235.0
    x = x.astype(np.float32)
    model = linear_model(SHAPE, kernel, np.array([c, 0.0]))
    y = np.zeros(n, np.int32)
    assert np.all(np.argmax(model(x.reshape((n,) + SHAPE)).numpy(), 1) == 0)
    xd = x.astype(np.float64)
    lam = np.array([lp_min_norm(xd[i], a, -float(c)) for i in range(n)])
    free_formula = (c - xd @ a) / np.abs(a).sum()
    assert np.all(lam > 1.2 * free_formula)  # the box binds
    np.testing.assert_allclose(lam, 12.0, rtol=1e-3)
    for targeted in (False, True):
        res = fab(
            model,
            x.reshape((n,) + SHAPE),
            y,
            epsilon=30.0,
            settings=FABSettings(num_targets=1),
            targeted=targeted,
        )
        ratio = res.details["norm"] / lam
        assert np.all(ratio >= 1.0 - 1e-4) and np.all(ratio <= CLOSE), ratio
        assert res.success.all()
        assert_in_ball_and_box(res.x_adv, x.reshape((n,) + SHAPE), 30.0)


# ---- invariants on a small conv net ---------------------------------------------------------


@pytest.fixture(scope="module")
def conv():
    model = small_conv(seed=1)
    x = uniform_images(12, SHAPE, seed=2)
    y = np.argmax(model(x).numpy(), axis=1).astype(np.int32)
    y[:2] = (y[:2] + 1) % 10  # two points misclassified at x
    return model, x, y


def predicted_wrong(model, x_adv, y):
    return np.argmax(model(x_adv).numpy(), axis=1) != y


@pytest.mark.parametrize("targeted", [False, True])
def test_outputs_in_ball_and_box_and_success_is_a_fresh_prediction(conv, targeted):
    model, x, y = conv
    eps = 4.0
    settings = FABSettings(steps=10, restarts=2, num_targets=2)
    res = fab(model, x, y, epsilon=eps, settings=settings, targeted=targeted)
    assert_in_ball_and_box(res.x_adv, x, eps)
    np.testing.assert_array_equal(res.success, predicted_wrong(model, res.x_adv, y))
    assert 0 < res.success[2:].sum() < 10  # some points broken, some not: both paths run
    # Misclassified at x: successes at x, free.
    np.testing.assert_array_equal(res.x_adv[:2], x[:2])
    assert res.success[:2].all() and np.all(res.base_passes[:2] == 0)
    np.testing.assert_array_equal(res.details["norm"][:2], 0.0)
    ok = res.success[2:]
    assert np.all(res.details["norm"][2:][ok] <= eps)
    assert np.all(res.details["norm"][2:][~ok] > eps)
    # A broken point never runs again: it paid for fewer runs than one never broken.
    per_run = 10 * (1 if targeted else 10)
    assert set(np.unique(res.base_passes[2:])) <= {per_run * k for k in range(1, 5)}
    assert res.base_passes[2:][~ok].min() == res.base_passes.max()


def test_zero_budget_returns_x_and_empty_batch(conv):
    model, x, y = conv
    res = fab(model, x, y, epsilon=0.0, settings=FABSettings(steps=5))
    np.testing.assert_array_equal(res.x_adv, x)
    np.testing.assert_array_equal(res.success, predicted_wrong(model, x, y))
    assert res.cost["base_passes"] == 0
    empty = fab_t(model, x[:0], y[:0], epsilon=4.0, settings=FABSettings(steps=5, num_targets=2))
    assert len(empty) == 0 and empty.x_adv.shape == (0,) + SHAPE
    assert empty.details["norm"].shape == (0,)


def test_deterministic_under_seed(conv):
    model, x, y = conv
    kw = dict(epsilon=2.0, settings=FABSettings(steps=5, restarts=3))  # restarts: random starts
    a = fab(model, x, y, seed=5, **kw)
    b = fab(model, x, y, seed=5, **kw)
    np.testing.assert_array_equal(a.x_adv, b.x_adv)
    np.testing.assert_array_equal(a.details["norm"], b.details["norm"])


def test_restarts_start_at_seeded_random_points_and_survive_a_zero_gradient():
    """The label is pixel (0, 0, 0), cast to int: the gradient is zero everywhere, so the run from
    ``x`` never moves and only a random start (``x + eps / 2 * u / |u|_inf``) can cross to label
    0 or 2; which points cross, and at what norm, depends on the seed."""
    model = helpers.LabelInPixel()
    x = uniform_images(16, SHAPE, seed=0)
    x[:, 0, 0, 0] = 1.5
    y = np.ones(16, np.int32)
    first = fab(model, x, y, epsilon=4.0, settings=FABSettings(steps=3, restarts=1))
    assert not first.success.any() and np.all(np.isinf(first.details["norm"]))
    np.testing.assert_array_equal(first.x_adv, x)
    three = FABSettings(steps=3, restarts=3)
    runs = [fab(model, x, y, epsilon=4.0, settings=three, seed=s) for s in (1, 1, 2)]
    assert runs[0].success.any() and np.all(runs[0].details["run"][runs[0].success] > 0)
    np.testing.assert_array_equal(runs[0].x_adv, runs[1].x_adv)
    assert not np.array_equal(runs[0].details["norm"], runs[2].details["norm"])
    np.testing.assert_array_equal(runs[2].success, predicted_wrong(model, runs[2].x_adv, y))
    assert_in_ball_and_box(runs[2].x_adv, x, 4.0)


def test_compiled_once_per_setting_for_every_batch_size():
    model = small_conv(seed=4)
    for n in (3, 7):
        x = uniform_images(n, SHAPE, seed=n)
        y = np.argmax(model(x).numpy(), axis=1).astype(np.int32)
        fab(model, x, y, epsilon=3.0, settings=FABSettings(steps=3, restarts=2), seed=n)
        fab_t(model, x, y, epsilon=3.0, settings=FABSettings(steps=3, num_targets=3), seed=n)
    counts = compiled.tracing_counts(model, "fab")
    assert len(counts) == 2 and all(c == 1 for c in counts.values()), counts


def test_bad_inputs_raise(conv):
    model, x, y = conv
    with pytest.raises(ValueError, match="num_targets must be <= num_classes - 1 = 9"):
        fab_t(model, x, y, epsilon=1.0, settings=FABSettings(num_targets=10))
    with pytest.raises(ValueError, match="eta"):
        fab(model, x, y, epsilon=1.0, settings=FABSettings(eta=0.5))
    with pytest.raises(ValueError, match="beta"):
        fab(model, x, y, epsilon=1.0, settings=FABSettings(beta=0.0))
    with pytest.raises(ValueError, match="steps"):
        fab(model, x, y, epsilon=1.0, settings=FABSettings(steps=-1))
    with pytest.raises(ValueError, match="restarts"):
        fab(model, x, y, epsilon=1.0, settings=FABSettings(restarts=0))
    with pytest.raises(ValueError, match="epsilon"):
        fab(model, x, y, epsilon=-1.0)
    with pytest.raises(ValueError, match="pixel values"):
        fab(model, x / 255.0 - 0.5, y, epsilon=1.0)


@pytest.mark.parametrize(
    "field, bad",
    [
        ("steps", -1),
        ("restarts", 0),
        ("num_targets", 0),
        ("alpha_max", 1.5),
        ("alpha_max", float("nan")),
        ("eta", 0.5),
        ("beta", 0.0),
        ("beta", 1.1),
    ],
)
def test_settings_refuse_bad_values_naming_the_field(field, bad):
    with pytest.raises(ValueError, match=field):
        FABSettings(**{field: bad})


def test_settings_are_normalised_frozen_and_hashable():
    s = FABSettings(steps=np.int64(4), alpha_max=np.float32(0.25), eta=1, early_exit=1)
    assert (s.steps, s.alpha_max, s.eta, s.early_exit) == (4, 0.25, 1.0, True)
    assert type(s.steps) is int and type(s.alpha_max) is float and type(s.early_exit) is bool
    assert hash(s) == hash(FABSettings(steps=4, alpha_max=0.25, eta=1.0, early_exit=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.beta = 0.5
