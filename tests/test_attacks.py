"""Attacks against oracles: closed-form optima of linear models, invariants, bad inputs."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import linear_model
from manifold_tf import attacks
from manifold_tf.cw_search import cw_inner, from_tanh_space, to_tanh_space

SHAPE = (4, 4, 3)
DIM = int(np.prod(SHAPE))
TOL = 1e-3  # pixels: float32 rounding of x +- epsilon near 255


@pytest.fixture(scope="module")
def binary():
    """A 2-class linear model, images with some pixels at the box edges, labels = predictions."""
    rng = np.random.default_rng(0)
    w = rng.normal(0.0, 0.01, size=(DIM, 2))
    model = linear_model(SHAPE, w, np.zeros(2))
    x = rng.uniform(20.0, 235.0, size=(6,) + SHAPE).astype(np.float32)
    x[:, 0, 0, :] = 0.0  # on the box: the optimum must be clipped there
    x[:, 1, 1, :] = 255.0
    y = np.argmax(model(x).numpy(), axis=1).astype(np.int32)
    return model, w, x, y


def corner(x, w, source, target, delta):
    """The maximiser of ``Z_t - Z_s`` (and of ``F_t`` for 2 classes) over ``N(x, delta)``."""
    d = np.sign(w[:, target] - w[:, source]).reshape(SHAPE)
    return np.clip(x + delta * d, 0.0, 255.0)


# The conv net of these tests: 4 classes, pixels / 255, global average pooling.
small_conv = functools.partial(
    helpers.small_conv, classes=4, scale=1.0 / 255.0, offset=0.0, pooling="average"
)


@pytest.fixture(scope="module")
def conv():
    model = small_conv()
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 255.0, size=(5, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=5).astype(np.int32)
    return model, x, y


# Shape, ball and box (the dtype is not checked here).
assert_in_ball = functools.partial(helpers.assert_in_ball_and_box, tol=TOL, dtype=None)


# ---- closed-form oracles (linear models) ---------------------------------------------------


def test_high_confidence_reaches_linear_optimum(binary):
    model, w, x, y = binary
    delta = 8.0
    res = attacks.high_confidence(model, x, y, epsilon=delta, steps=10, step_size=2.0)
    x_best, conf, label = res.x_adv, res.details["confidence"], res.details["label"]
    np.testing.assert_array_equal(res.score, conf)
    np.testing.assert_array_equal(res.base_passes, 1 * 10)  # (K - 1) * steps
    for i in range(len(x)):
        z = corner(x[i], w, y[i], 1 - y[i], delta)
        assert int(label[i]) == 1 - y[i]
        np.testing.assert_allclose(x_best[i], z, atol=TOL)
        expected = tf.nn.softmax(model(z[None]))[0, 1 - y[i]].numpy()
        assert abs(float(conf[i]) - expected) < 1e-3


@pytest.mark.parametrize("loss", ["xent", "cw"])
def test_targeted_pgd_reaches_linear_optimum(binary, loss):
    model, w, x, y = binary
    delta = 6.0
    target = (1 - y).astype(np.int32)
    res = attacks.pgd(
        model,
        x,
        target,
        epsilon=delta,
        steps=12,
        step_size=1.5,
        settings=attacks.PGDSettings(loss=loss, targeted=True, random_start=True),
        seed=3,
    )
    x_adv = res.x_adv
    # success = the goal (here: classified as the target) at x_adv, by the model itself.
    np.testing.assert_array_equal(res.success, np.argmax(model(x_adv).numpy(), 1) == target)
    np.testing.assert_array_equal(res.base_passes, 12)
    for i in range(len(x)):
        np.testing.assert_allclose(x_adv[i], corner(x[i], w, y[i], target[i], delta), atol=TOL)


def test_cw_linf_close_to_minimal_distance():
    """Binary linear classifier, x far from the box: the minimal L-inf flip is
    margin / ||w_diff||_1."""
    rng = np.random.default_rng(2)
    w = rng.normal(0.0, 0.01, size=(DIM, 2))
    model = linear_model(SHAPE, w, np.zeros(2))
    x = rng.uniform(100.0, 155.0, size=(4,) + SHAPE).astype(np.float32)
    logits = model(x).numpy()
    y = np.argmax(logits, axis=1).astype(np.int32)
    w_diff = w[:, 0] - w[:, 1]
    r_star = np.abs(logits[:, 0] - logits[:, 1]) / np.abs(w_diff).sum()
    assert r_star.max() < 40.0  # the optimum stays inside the box
    settings = attacks.CWSettings(max_iterations=150)
    out = attacks.cw_linf(model, x, y, epsilon=255.0, settings=settings)
    dist = out.details["distance"]
    assert out.success.all()
    np.testing.assert_array_equal(out.score, -dist)
    np.testing.assert_array_equal(out.base_passes, out.details["iterations"])
    assert (out.details["iterations"] > 0).all() and out.shell_predictions.sum() == 0
    # Tau shrinks by 0.9 after each success and the penalty is soft: within a factor ~1/0.9^2.
    assert np.all(dist >= r_star - TOL), (dist, r_star)
    assert np.all(dist <= r_star / 0.88), (dist, r_star)  # measured: 1.06-1.08 x optimal
    assert np.all(np.argmax(model(out.x_adv).numpy(), axis=1) != y)
    # With a budget below the optimum nothing can succeed and x comes back unchanged.
    low = attacks.cw_linf(model, x, y, epsilon=0.9 * float(r_star.min()), settings=settings)
    assert not low.success.any()
    np.testing.assert_array_equal(low.x_adv, x)
    assert settings.max_iterations == 150 and settings.learning_rate == 5e-3


def test_cw_schedule_on_the_running_rows_only_is_the_same_search():
    # Compaction (the model sees only the rows still running) must not change any row's search:
    # rows are independent, so every output of the schedule is the same with and without it,
    # on points that finish at very different iterations (some never).
    from manifold_tf.cw_search import CW_CPU, cw_schedule

    model = helpers.small_conv(seed=4, classes=3, shape=(8, 8, 3))
    x = helpers.uniform_images(6, (8, 8, 3), seed=5)
    y = tf.constant(np.argmax(model(x).numpy(), axis=1), tf.int32)
    settings = CW_CPU.replace(max_iterations=6, largest_const=2.0, stop_within_epsilon=True)
    outs = {
        compact: tf.function(
            lambda xs, ys, c=compact: cw_schedule(
                model, xs, ys, epsilon=6.0, settings=settings, compact=c
            )
        )(tf.constant(x), y)
        for compact in (False, True)
    }
    its = outs[False]["iterations"].numpy()
    assert len(set(its.tolist())) > 1  # the rows finish at different iterations
    for key, value in outs[False].items():
        np.testing.assert_allclose(outs[True][key].numpy(), value.numpy(), rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(outs[True]["iterations"].numpy(), its)
    np.testing.assert_array_equal(outs[True]["within"].numpy(), outs[False]["within"].numpy())
    # Through the attack (compiled with static shapes), one point and several: the loop's
    # variables keep their shapes although the model sees a dynamic batch.
    for n in (1, 3):
        out = attacks.cw_linf(model, x[:n], y.numpy()[:n], epsilon=6.0, settings=settings)
        np.testing.assert_array_equal(out.details["iterations"], its[:n])


def test_cw_inner_targeted_fixed_tau(binary):
    model, _, x, y = binary
    target = tf.constant(1 - y, tf.int32)
    xt = tf.constant(x)
    fn = tf.function(
        lambda: cw_inner(
            model,
            xt,
            target,
            to_tanh_space(xt),
            tau=255.0,
            const=tf.fill([len(x)], 1e-5),
            max_iterations=500,
            targeted=True,
        )
    )
    x_new, ok = fn()
    assert ok.numpy().all()
    assert np.all(np.argmax(model(x_new).numpy(), axis=1) == target.numpy())
    assert x_new.numpy().min() > 0.0 and x_new.numpy().max() < 255.0


def test_tanh_space_round_trip():
    x = tf.constant([[0.0, 1.0, 127.5, 254.0, 255.0]])
    np.testing.assert_allclose(from_tanh_space(to_tanh_space(x)).numpy(), x.numpy(), atol=1e-3)


# ---- invariants on a small conv model ----------------------------------------------------


def test_outputs_inside_ball_and_box(conv):
    model, x, y = conv
    eps = 8.0
    pgd = functools.partial(attacks.pgd, model, x, y, epsilon=eps, steps=5, step_size=3.0)
    assert_in_ball(pgd(settings=attacks.PGDSettings(restarts=2)).x_adv, x, eps)
    assert_in_ball(pgd(settings=attacks.PGDSettings(loss="cw")).x_adv, x, eps)
    for opt in ("sign", "adam"):
        res = attacks.high_confidence(
            model, x, y, epsilon=eps, steps=4, step_size=2.0, optimizer=opt, random_start=True
        )
        conf, label = res.details["confidence"], res.details["label"]
        assert_in_ball(res.x_adv, x, eps)
        assert np.all((conf >= 0) & (conf <= 1)) and np.all(label != y)
    cw = attacks.CWSettings(max_iterations=5, largest_const=1e-3)
    out = attacks.cw_linf(model, x, y, epsilon=eps, settings=cw)
    assert_in_ball(out.x_adv, x, eps)


def test_zero_budget_returns_x(conv):
    model, x, y = conv
    out = attacks.pgd(model, x, y, epsilon=0.0, steps=3, step_size=1.0)
    np.testing.assert_array_equal(out.x_adv, x)
    res = attacks.high_confidence(model, x, y, epsilon=0.0, steps=2, step_size=1.0)
    np.testing.assert_array_equal(res.x_adv, x)


def test_high_confidence_label_matches_confidence(conv):
    model, x, y = conv
    res = attacks.high_confidence(model, x, y, epsilon=4.0, steps=3, step_size=2.0)
    x_best, conf, label = res.x_adv, res.details["confidence"], res.details["label"]
    probs = tf.nn.softmax(model(x_best)).numpy()
    np.testing.assert_allclose(probs[np.arange(len(x)), label], conf, atol=1e-5)
    # success: that wrong label is the model's top label at x_best (misclassified there).
    np.testing.assert_array_equal(res.success, probs.argmax(axis=1) == label)
    probs[np.arange(len(x)), y] = -1.0
    np.testing.assert_allclose(probs.max(axis=1), conf, atol=1e-5)


def test_deterministic_under_seed(conv):
    model, x, y = conv
    kw = dict(epsilon=8.0, steps=2, step_size=1.0, settings=attacks.PGDSettings(random_start=True))
    a = attacks.pgd(model, x, y, seed=7, **kw).x_adv
    b = attacks.pgd(model, x, y, seed=7, **kw).x_adv
    c = attacks.pgd(model, x, y, seed=8, **kw).x_adv
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_restarts_keep_successes(conv):
    model, x, y = conv
    kw = dict(epsilon=12.0, steps=3, step_size=4.0, seed=1)
    one = attacks.pgd(model, x, y, settings=attacks.PGDSettings(restarts=1), **kw)
    many = attacks.pgd(model, x, y, settings=attacks.PGDSettings(restarts=4), **kw)
    ok_one = np.argmax(model(one.x_adv).numpy(), 1) != y
    ok_many = np.argmax(model(many.x_adv).numpy(), 1) != y
    np.testing.assert_array_equal(one.success, ok_one)
    np.testing.assert_array_equal(many.success, ok_many)
    assert np.all(ok_many[ok_one])
    np.testing.assert_array_equal(many.base_passes, 4 * 3)  # restarts * steps


def test_no_retracing_on_repeated_calls():
    model = small_conv(seed=3)
    rng = np.random.default_rng(0)
    for i in range(3):
        x = rng.uniform(0, 255, size=(3, 8, 8, 3)).astype(np.float32)
        y = rng.integers(0, 4, size=3).astype(np.int32)
        attacks.pgd(model, x, y, epsilon=4.0 + i, steps=2, step_size=1.0 + i, seed=i)
        attacks.high_confidence(model, x, y, epsilon=4.0 + i, steps=2, step_size=1.0, seed=i)
        cw = attacks.CWSettings(max_iterations=2, largest_const=1e-4)  # equal settings, one trace
        attacks.cw_linf(model, x, y, epsilon=4.0 + i, settings=cw)
    counts = attacks.tracing_counts(model)
    assert len(counts) == 3 and all(c == 1 for c in counts.values()), counts


# ---- bad inputs ---------------------------------------------------------------------------


def test_bad_inputs_raise(conv):
    model, x, y = conv
    with pytest.raises(ValueError, match="epsilon"):
        attacks.pgd(model, x, y, epsilon=-1.0, steps=1, step_size=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        attacks.high_confidence(model, x, y, epsilon=-0.5, steps=1, step_size=1.0)
    with pytest.raises(ValueError, match="shape"):
        attacks.pgd(model, x[0], y, epsilon=1.0, steps=1, step_size=1.0)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        attacks.pgd(model, x, np.full(5, 4, np.int32), epsilon=1.0, steps=1, step_size=1.0)
    with pytest.raises(ValueError, match=r"shape \[5\]"):
        attacks.cw_linf(model, x, y[:3], epsilon=1.0)
    with pytest.raises(ValueError, match="pixel values"):
        attacks.pgd(model, x / 255.0 - 0.5, y, epsilon=1.0, steps=1, step_size=1.0)
    with pytest.raises(ValueError, match="loss"):
        attacks.PGDSettings(loss="l2")
    with pytest.raises(ValueError, match="const"):
        attacks.CWSettings(initial_const=30.0)


def test_cw_settings_validate_and_key_the_compiled_search():
    s = attacks.CWSettings(max_iterations=np.int64(7), learning_rate=1, targeted=1)
    assert (s.max_iterations, s.learning_rate, s.targeted) == (7, 1.0, True)
    assert type(s.max_iterations) is int and type(s.learning_rate) is float
    assert s == attacks.CWSettings(max_iterations=7, learning_rate=1.0, targeted=True)
    assert hash(s) == hash(attacks.CWSettings(max_iterations=7, learning_rate=1.0, targeted=True))
    assert attacks.CW_PAPER == attacks.CWSettings() and attacks.CW_PAPER.max_iterations == 1000
    assert attacks.CW_CPU == attacks.CW_PAPER.replace(max_iterations=100)
    # What reports record: the five knobs an evaluation sets, in this order and these types.
    assert list(attacks.CW_CPU.recorded().items()) == [
        ("max_iterations", 100),
        ("stop_within_epsilon", False),
        ("learning_rate", 5e-3),
        ("initial_const", 1e-5),
        ("largest_const", 20.0),
    ]
    for field, bad in (
        ("max_iterations", 0),
        ("learning_rate", 0.0),
        ("initial_const", "1"),
        ("const_factor", 1.0),
        ("largest_const", 1e-6),
        ("initial_tau", 300.0),
        ("decrease_factor", 1.0),
        ("min_tau", -1.0),
        ("max_total_iterations", 0),
    ):
        with pytest.raises(ValueError, match=field):
            attacks.CWSettings(**{field: bad})
    with pytest.raises(ValueError, match="max_iterations"):
        attacks.CW_CPU.replace(max_iterations=2.5)


def test_pgd_settings_validate():
    s = attacks.PGDSettings(loss="cw", random_start=0, restarts=np.int64(3), targeted=1)
    assert (s.loss, s.random_start, s.restarts, s.targeted) == ("cw", False, 3, True)
    assert s == attacks.PGDSettings(loss="cw", random_start=False, restarts=3, targeted=True)
    with pytest.raises(ValueError, match="restarts"):
        attacks.PGDSettings(restarts=0)
    with pytest.raises(ValueError, match="loss"):
        attacks.PGDSettings(loss="hinge")


def test_settings_must_be_the_dataclass(conv):
    model, x, y = conv
    with pytest.raises(TypeError, match="CWSettings"):
        attacks.cw_linf(model, x, y, epsilon=1.0, settings=dict(max_iterations=2))
    with pytest.raises(TypeError, match="PGDSettings"):
        attacks.pgd(model, x, y, epsilon=1.0, steps=1, step_size=1.0, settings=dict(restarts=2))


def test_probability_model_is_rejected(conv):
    model, x, y = conv
    probs = keras.Model(model.input, keras.layers.Softmax()(model.output))
    with pytest.raises(ValueError, match="probabilities"):
        attacks.pgd(probs, x, y, epsilon=1.0, steps=1, step_size=1.0)
    with pytest.raises(ValueError, match="probabilities"):
        attacks.cw_linf(probs, x, y, epsilon=1.0)


def test_cache_does_not_keep_the_model_alive(conv):
    import gc
    import weakref

    _, x, y = conv
    model = small_conv(seed=5)
    attacks.pgd(model, x, y, epsilon=2.0, steps=1, step_size=1.0)
    assert len(attacks.tracing_counts(model)) == 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
