"""Tests of the shared projected-optimisation core on objectives with known maximisers."""

import numpy as np
import pytest
import tensorflow as tf

from manifold_tf.projected import project, projected_ascent, random_start


def _linear_problem(seed=0, n=3):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.uniform(20, 235, (n, 4, 4, 3)).astype(np.float32))
    w = tf.constant(rng.normal(size=(n, 4, 4, 3)).astype(np.float32))

    def objective(z):
        return tf.reduce_sum(w * z, axis=[1, 2, 3])

    return x, w, objective


@pytest.mark.parametrize("optimizer, steps, step_size", [("sign", 3, 4.0), ("adam", 200, 1.0)])
def test_linear_objective_reaches_the_corner_of_the_ball(optimizer, steps, step_size):
    x, w, objective = _linear_problem()
    z, f = projected_ascent(
        objective, x, x, radius=8.0, steps=steps, step_size=step_size, optimizer=optimizer
    )
    expected = np.clip(x + 8.0 * np.sign(w), 0, 255)
    np.testing.assert_allclose(z.numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(f.numpy(), objective(tf.constant(expected)).numpy(), rtol=1e-5)


def test_box_clipping_binds_near_the_pixel_range():
    x = tf.constant(np.full((1, 2, 2, 1), 252.0, np.float32))

    def objective(z):
        return tf.reduce_sum(z, axis=[1, 2, 3])

    z, _ = projected_ascent(objective, x, x, radius=8.0, steps=5, step_size=2.0)
    np.testing.assert_array_equal(z.numpy(), 255.0)


def test_best_iterate_is_kept_when_the_last_one_is_worse():
    # Peaked at x + 1: sign steps of 3 oscillate between x and x + 3, ending at x + 3.
    x = tf.zeros((1, 1, 1, 1)) + 100.0

    def objective(z):
        return -tf.reduce_sum(tf.square(z - x - 1.0), axis=[1, 2, 3])

    z_best, f_best = projected_ascent(objective, x, x, radius=8.0, steps=3, step_size=3.0)
    z_last, _ = projected_ascent(
        objective, x, x, radius=8.0, steps=3, step_size=3.0, return_best=False
    )
    # The start (distance 1) beats every later iterate.
    assert float(f_best[0]) == pytest.approx(-1.0)
    assert float(z_best[0, 0, 0, 0]) == 100.0
    assert float(z_last[0, 0, 0, 0]) == 103.0


def test_per_example_radius_and_random_start_stay_inside():
    x, _, _ = _linear_problem(n=2)
    radius = tf.constant([1.0, 5.0])[:, None, None, None]
    z = random_start(x, radius, tf.constant([1, 2]))
    dist = tf.reduce_max(tf.abs(z - x), axis=[1, 2, 3]).numpy()
    assert dist[0] <= 1.0 and dist[1] <= 5.0 and dist[1] > 1.0
    np.testing.assert_array_equal(random_start(x, radius, tf.constant([1, 2])).numpy(), z.numpy())
    np.testing.assert_array_equal(
        project(x + 100.0, x, radius).numpy(), np.clip(x + radius, 0, 255)
    )


def test_runs_inside_a_compiled_function_with_xla():
    x, w, objective = _linear_problem()
    fn = tf.function(
        lambda x: projected_ascent(objective, x, x, radius=2.0, steps=2, step_size=1.0)[0],
        jit_compile=True,
    )
    np.testing.assert_allclose(fn(x).numpy(), np.clip(x + 2.0 * np.sign(w), 0, 255), atol=1e-4)


def test_bad_optimizer_is_rejected():
    x, _, objective = _linear_problem()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        projected_ascent(objective, x, x, radius=1.0, steps=1, step_size=1.0, optimizer="lbfgs")


@pytest.mark.parametrize("optimizer", ["sign", "adam"])
def test_unrolled_steps_give_the_while_loop_result(optimizer):
    # A non-linear objective, so the iterates depend on every step's gradient.
    x, w, _ = _linear_problem(seed=3)

    def objective(z):
        return tf.reduce_sum(tf.sin(z / 7.0) * w, axis=[1, 2, 3])

    kwargs = dict(radius=6.0, steps=7, step_size=1.5, optimizer=optimizer)
    z_loop, f_loop = projected_ascent(objective, x, x, **kwargs)
    z_unrolled, f_unrolled = projected_ascent(objective, x, x, unroll=True, **kwargs)
    np.testing.assert_allclose(z_unrolled.numpy(), z_loop.numpy(), atol=1e-5)
    np.testing.assert_allclose(f_unrolled.numpy(), f_loop.numpy(), rtol=1e-6)
    assert float(tf.reduce_max(tf.abs(z_loop - x))) > 1.0  # it moved


def test_adam_constants_validate_and_default_to_tf_v1s():
    from manifold_tf.projected import ADAM, AdamConstants

    assert (ADAM.beta1, ADAM.beta2, ADAM.epsilon) == (0.9, 0.999, 1e-8)
    for field, bad in (("beta1", 1.0), ("beta2", -0.1), ("epsilon", 0.0)):
        with pytest.raises(ValueError, match=field):
            AdamConstants(**{field: bad})
    # Other constants reach the Adam steps: a larger epsilon shrinks the first step.
    x = tf.zeros([1, 4])

    def objective(z):
        return tf.reduce_sum(z * tf.constant([[1.0, -2.0, 3.0, 0.5]]), axis=1)

    kwargs = dict(radius=100.0, steps=1, step_size=1.0, optimizer="adam", return_best=False)
    z_default, _ = projected_ascent(objective, x, x + 50.0, **kwargs)
    z_damped, _ = projected_ascent(
        objective, x, x + 50.0, adam=AdamConstants(epsilon=1.0), **kwargs
    )
    assert np.all(np.abs(z_damped.numpy() - 50.0) < np.abs(z_default.numpy() - 50.0))
