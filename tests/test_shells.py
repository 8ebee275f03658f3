"""Tests of the MCN, NCN and cw shells' searches: oracles with known answers, invariants, bad
arguments, compilation. Keras behaviour and export: test_shell_export.py; what the evaluation asks
of a shell and the registry: test_shell_registry.py."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from helpers import (
    assert_in_ball_and_box,
    linear_model,
    nearest_centre_model,
    nearest_centre_weights,
    np_logits,
    np_softmax,
)
from manifold_tf.data import synthetic_arrays, synthetic_manifold
from manifold_tf.shells import CarliniWagnerShell, MCNShell, NCNShell, cw_shell

SHAPE = (32, 32, 3)
D = int(np.prod(SHAPE))


class CentreBumps(keras.layers.Layer):
    """A nearest-centre classifier that is confident only near the class centres (a "good" model).

    ``Z_c = height * exp(-ms_c / (2 sigma^2)) + bias_c`` with ``ms_c`` the mean squared pixel
    distance to ``mu_c``: near a centre its class wins by a wide margin; far from every centre all
    bumps vanish and the biases decide, with low confidence (class 0 has the largest bias).
    """

    def __init__(self, centres, sigma, height=10.0, default_bias=2.0, **kwargs):
        super().__init__(**kwargs)
        self.centres = tf.constant(np.asarray(centres).reshape(len(centres), -1), tf.float32)
        self.sigma, self.height = float(sigma), float(height)
        self.bias = tf.constant([default_bias] + [0.0] * (len(centres) - 1), tf.float32)

    def call(self, x):
        z = tf.reshape(x, [tf.shape(x)[0], -1])
        ms = (
            tf.reduce_sum(z**2, 1, keepdims=True)
            - 2.0 * z @ tf.transpose(self.centres)
            + tf.reduce_sum(self.centres**2, 1)[None]
        ) / D
        return self.height * tf.exp(-ms / (2.0 * self.sigma**2)) + self.bias


def bumps_base(centres, sigma) -> keras.Model:
    inputs = keras.Input(SHAPE)
    return keras.Model(inputs, CentreBumps(centres, sigma)(inputs))


def two_class_problem(seed=0, n=4):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(0.0, 1e-3, size=(D, 2))
    # |w_0 - w_1| >= 5e-4 per pixel: every pixel's move changes the logits well above float32
    # resolution, so the optimum is unique (a near-zero weight leaves its pixel undetermined).
    kernel[:, 1] = kernel[:, 0] - rng.choice([-1.0, 1.0], D) * rng.uniform(5e-4, 1.5e-3, D)
    bias = rng.normal(0.0, 0.1, size=2)
    x = rng.uniform(0.0, 255.0, size=(n,) + SHAPE).astype(np.float32)
    x[0, :4, :4] = 0.0  # some pixels on the box boundary: the box must clip
    x[1, :4, :4] = 255.0
    return linear_model(SHAPE, kernel, bias), kernel, bias, x


# ------------------------------------------------------------------------------------------------
# Oracles


@pytest.mark.parametrize("optimizer,steps,step_size", [("sign", 4, 4.0), ("adam", 40, 1.0)])
def test_mcn_two_class_linear_matches_closed_form(optimizer, steps, step_size):
    # For 2 classes F_t is increasing in (w_t - w_o).z, so the optimum over the ball and the box is
    # the corner z_t = clip(x + delta * sign(w_t - w_o), 0, 255).
    base, kernel, bias, x = two_class_problem()
    delta = 8.0
    shell = MCNShell(
        base, delta, optimizer=optimizer, steps=steps, step_size=step_size, jit_compile=False
    )
    out = shell.embed(x)
    direction = np.sign(kernel[:, 0] - kernel[:, 1]).reshape(SHAPE)
    z_expected = np.stack(
        [np.clip(x + delta * direction, 0, 255), np.clip(x - delta * direction, 0, 255)], axis=1
    )
    np.testing.assert_allclose(out["z"].numpy(), z_expected, atol=1e-3)
    conf = np.stack(
        [np_softmax(np_logits(z_expected[:, t], kernel, bias))[:, t] for t in (0, 1)], 1
    )
    np.testing.assert_allclose(out["confidences"].numpy(), conf, rtol=1e-4)
    label = conf.argmax(1)
    np.testing.assert_array_equal(out["label"].numpy(), label)
    probs = np_softmax(np_logits(z_expected[np.arange(len(x)), label], kernel, bias))
    np.testing.assert_allclose(out["probabilities"].numpy(), probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(shell(x).numpy(), probs, rtol=1e-4, atol=1e-6)


def _best_log_odds(x, t, kernel, bias, delta):
    """The global maximum of the (concave) log-odds of label t over N(x, delta), by L-BFGS-B."""
    x0 = x.reshape(-1).astype(np.float64)

    def f(z):
        logits = z @ kernel + bias
        others = np.delete(logits, t)
        m = others.max()
        w = np.exp(others - m)
        lse = m + np.log(w.sum())
        g = kernel[:, t] - np.delete(kernel, t, axis=1) @ (w / w.sum())
        return -(logits[t] - lse), -g

    bounds = list(zip(np.maximum(x0 - delta, 0), np.minimum(x0 + delta, 255), strict=True))
    res = scipy.optimize.minimize(
        f, x0, jac=True, method="L-BFGS-B", bounds=bounds, options=dict(maxiter=500)
    )
    return -res.fun


def test_mcn_reaches_the_optimum_of_a_nearest_centre_base():
    # Logits -||x - mu_c||^2 / T are linear in x up to a shared term, so each label's log-odds is
    # concave: the shell's per-label optimum must match an independent solver's global optimum.
    centres, _ = synthetic_manifold(num_classes=4, seed=1)
    x, _ = synthetic_arrays("test", num_examples=2, num_classes=4, seed=1)
    T = 3e4
    base = nearest_centre_model(centres, T)
    kernel, bias = nearest_centre_weights(centres, T)
    delta = 16.0
    shell = MCNShell(base, delta, optimizer="adam", steps=100, step_size=1.0, jit_compile=False)
    got = shell.embed(x)["log_odds"].numpy()
    for i in range(len(x)):
        for t in range(4):
            best = _best_log_odds(x[i], t, kernel, bias, delta)
            start = _best_log_odds(x[i], t, kernel, bias, 0.0)
            found = got[i, t]
            # Within 1% of the improvement available over x (float32 model vs float64 solver).
            assert found >= best - 0.01 * abs(best - start) - 1e-3, (i, t, found, best, start)


def test_nearest_centre_shell_keeps_points_pushed_off_the_manifold_by_less_than_delta():
    # On the synthetic manifold (classes > 96 pixels apart), a push of L-inf size 0.75 * delta in
    # a random off-manifold direction leaves the base right, and the shell as well.
    centres, _ = synthetic_manifold(num_classes=10)
    x, y = synthetic_arrays("test", num_examples=8)
    base = nearest_centre_model(centres, 1e4)
    delta = 16.0
    noise = np.sign(np.random.default_rng(3).uniform(-1, 1, size=x.shape)).astype(np.float32)
    x_off = np.clip(x + 0.75 * delta * noise, 0, 255)
    shell = MCNShell(base, delta, steps=10, jit_compile=False)
    np.testing.assert_array_equal(shell.predict(x_off, verbose=0).argmax(1), y)


@pytest.mark.parametrize("kind", ["mcn", "ncn"])
def test_shell_corrects_low_confidence_errors_off_the_manifold(kind):
    # A base confident only near its class centres (the paper's "good" model): pushing a point
    # 12 pixels straight away from its centre makes the base wrong with low confidence (the
    # default class 0 wins on its bias), but the true class is confident within delta = 16 of the
    # pushed point (the original is there), and no other class is: the shell corrects it.
    centres, _ = synthetic_manifold(num_classes=10)
    x, y = synthetic_arrays("test", num_examples=24)
    keep = y != 0  # class 0 is the base's default answer: not an error to correct
    x, y = x[keep][:8], y[keep][:8]
    base = bumps_base(centres, sigma=6.0)
    away = np.sign(x - centres[y])
    away[away == 0] = 1.0
    x_off = np.clip(x + 12.0 * away, 0, 255)
    base_pred = base.predict(x_off, verbose=0)
    assert (base_pred.argmax(1) == 0).all()
    assert np_softmax(base_pred).max(1).max() < 0.5  # wrong, and unconfident
    if kind == "mcn":
        shell = MCNShell(base, 16.0, steps=10, jit_compile=False)
    else:
        shell = NCNShell(base, 0.9, delta_max=16.0, steps=10, rounds=3, jit_compile=False)
    out = shell.embed(x_off)
    np.testing.assert_array_equal(out["label"].numpy(), y)
    np.testing.assert_array_equal(out["probabilities"].numpy().argmax(1), y)
    if kind == "ncn":
        assert not out["unmet"].numpy().any()
        # The nearest 0.9-confident point of the true class is no farther than the original.
        d = out["distances"].numpy()[np.arange(len(y)), y]
        assert (d <= 12.0 + 0.5).all(), d


def test_ncn_two_class_linear_matches_closed_form_distance():
    # F_t >= p  <=>  (w_t - w_o).z + b_t - b_o >= logit(p): a half-space, whose L-inf distance from
    # x is max(0, (logit(p) - m_t(x)) / ||w_t - w_o||_1) when the box does not bind.
    rng = np.random.default_rng(5)
    kernel = rng.normal(0.0, 1e-3, size=(D, 2))
    bias = np.zeros(2)
    x = rng.uniform(100.0, 155.0, size=(3,) + SHAPE).astype(np.float32)
    a = kernel[:, 0] - kernel[:, 1]
    m0 = x.reshape(3, -1) @ a
    bias[0] = -m0.mean()  # points near the boundary: both labels need a short move
    p = 0.8
    logit_p = np.log(p / (1 - p))
    margins = np.stack([m0 + bias[0] - bias[1], -(m0 + bias[0] - bias[1])], 1)
    expected = np.maximum(0.0, (logit_p - margins) / np.abs(a).sum())
    assert expected.max() < 16.0
    shell = NCNShell(
        linear_model(SHAPE, kernel, bias),
        p,
        delta_max=16.0,
        steps=30,
        rounds=3,
        learning_rate=0.02,
        jit_compile=False,
    )
    out = shell.embed(x)
    got = out["distances"].numpy()
    assert out["met"].numpy().all()
    assert (got >= expected - 1e-3).all(), (got, expected)  # nothing nearer is feasible
    np.testing.assert_allclose(got, expected, atol=0.05)
    np.testing.assert_array_equal(out["label"].numpy(), expected.argmin(1))


def test_ncn_flags_points_where_no_label_meets_p():
    _, kernel, _, x = two_class_problem()
    # Margins ~0.1: F stays near 1/2 in the box.
    base = linear_model(SHAPE, kernel * 0.01, np.zeros(2))
    shell = NCNShell(base, 0.9, delta_max=0.5, steps=2, rounds=1, jit_compile=False)
    out = shell.embed(x)
    assert out["unmet"].numpy().all()
    conf = out["confidences"].numpy()
    np.testing.assert_array_equal(out["label"].numpy(), conf.argmax(1))


@pytest.mark.parametrize(
    "make",
    [
        lambda b: MCNShell(b, 0.0, steps=3, jit_compile=False),
        lambda b: MCNShell(b, 0.0, optimizer="adam", steps=3, random_start=True, jit_compile=False),
        lambda b: NCNShell(b, 0.5, delta_max=0.0, steps=2, rounds=1, jit_compile=False),
    ],
)
def test_zero_radius_is_the_base_model(make):
    base, _, _, x = two_class_problem()
    expected = tf.nn.softmax(base(x)).numpy()
    np.testing.assert_array_equal(make(base)(x).numpy(), expected)


def test_zero_radius_is_the_base_model_under_xla():
    base, _, _, x = two_class_problem()
    got = MCNShell(base, 0.0, steps=2, jit_compile=True)(x).numpy()
    expected = tf.nn.softmax(base(x)).numpy()
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_confident_points_are_their_own_nearest_neighbour_under_ncn():
    base, kernel, bias, x = two_class_problem()
    probs = np_softmax(np_logits(x, kernel, bias))
    p = float(probs.max(1).min()) * 0.999  # every point already meets p at its prediction
    out = NCNShell(base, p, steps=2, rounds=1, jit_compile=False).embed(x)
    np.testing.assert_array_equal(out["label"].numpy(), probs.argmax(1))
    assert (out["distances"].numpy()[np.arange(len(x)), probs.argmax(1)] == 0).all()
    np.testing.assert_array_equal(out["probabilities"].numpy(), tf.nn.softmax(base(x)).numpy())


# ------------------------------------------------------------------------------------------------
# The paper's CW machinery


def test_cw_all_labels_stays_in_the_ball_and_scores_by_own_label():
    base, kernel, bias, x = two_class_problem()
    shell = CarliniWagnerShell(
        base, variant="all_labels", delta=8.0, max_iterations=50, const=1.0, jit_compile=False
    )
    out = shell.embed(x)
    z = out["z"].numpy()
    assert_in_ball_and_box(z, np.broadcast_to(x[:, None], z.shape), 8.0, tol=1e-3, dtype=None)
    conf = np.stack([np_softmax(np_logits(z[:, t], kernel, bias))[:, t] for t in (0, 1)], 1)
    np.testing.assert_allclose(out["confidences"].numpy(), conf, rtol=1e-3)
    np.testing.assert_array_equal(out["label"].numpy(), conf.argmax(1))


def test_cw_paper_code_variant_is_one_hot_of_the_most_confident_candidate():
    base, kernel, bias, x = two_class_problem()
    shell = CarliniWagnerShell(base, variant="paper_code", max_iterations=30, jit_compile=False)
    out = shell.embed(x)
    pred = np_logits(x, kernel, bias).argmax(1)
    z = out["z"].numpy()
    # The prediction's own candidate is x itself; failed candidates are x too.
    np.testing.assert_array_equal(z[np.arange(len(x)), pred], x)
    ok = out["cw_success"].numpy()
    assert ok[np.arange(len(x)), pred].all()
    for i, t in zip(*np.nonzero(~ok), strict=True):
        np.testing.assert_array_equal(z[i, t], x[i])
    assert np.abs(z - x[:, None]).max() <= cw_shell.PAPER_CODE_TAU + 0.05
    probs = out["probabilities"].numpy()
    np.testing.assert_array_equal(probs.sum(1), 1.0)
    conf = np.stack([np_softmax(np_logits(z[:, t], kernel, bias)).max(1) for t in (0, 1)], 1)
    best = conf.argmax(1)
    top = np.stack([np_logits(z[:, t], kernel, bias).argmax(1) for t in (0, 1)], 1)
    np.testing.assert_array_equal(probs.argmax(1), top[np.arange(len(x)), best])


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_arguments_raise_with_the_value():
    base, _, _, x = two_class_problem()
    with pytest.raises(ValueError, match="delta.*-1"):
        MCNShell(base, -1.0)
    for p in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=f"p must lie in \\(0, 1\\).*{p}"):
            NCNShell(base, p)
    with pytest.raises(ValueError, match="optimizer.*'sgd'"):
        MCNShell(base, optimizer="sgd")
    with pytest.raises(ValueError, match="variant.*'paper'"):
        CarliniWagnerShell(base, variant="paper")
    with pytest.raises(ValueError, match="optimizer.*'cw'"):
        MCNShell(base, optimizer="cw")  # the CW search is CarliniWagnerShell, not Algorithm 1
    with pytest.raises(ValueError, match="steps.*-3"):
        MCNShell(base, steps=-3)
    with pytest.raises(ValueError, match="delta_max.*-2"):
        NCNShell(base, 0.9, delta_max=-2)


def test_a_base_that_returns_probabilities_is_refused():
    model = keras.Sequential(
        [keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")]
    )
    with pytest.raises(ValueError, match="probabilities"):
        MCNShell(model)
    with pytest.raises(ValueError, match="probabilities"):
        NCNShell(model, 0.9)


def test_wrong_image_batches_are_refused():
    base, _, _, x = two_class_problem()
    shell = MCNShell(base, 4.0, steps=1, jit_compile=False)
    with pytest.raises(ValueError, match="shape"):
        shell.embed(x[0])  # no batch axis
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(28, 28, 3\)"):
        shell.embed(np.zeros((2, 28, 28, 3), np.float32))
    with pytest.raises(ValueError, match="floating"):
        shell.embed(x.astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        shell(x * 2.0)


# ------------------------------------------------------------------------------------------------
# Compilation, determinism, Keras behaviour


def test_embedding_compiles_once_for_all_batch_sizes():
    base, _, _, x = two_class_problem()
    shell = MCNShell(base, 4.0, steps=2, jit_compile=False)
    for n in (1, 3, 4, 3):
        shell.embed(x[:n])
    shell.predict(x, batch_size=2, verbose=0)
    assert shell.embed_function.experimental_get_tracing_count() == 1


def test_xla_and_plain_tensorflow_agree():
    base, _, _, x = two_class_problem()
    a = MCNShell(base, 8.0, steps=5, jit_compile=False).embed(x)
    b = MCNShell(base, 8.0, steps=5, jit_compile=True).embed(x)
    np.testing.assert_array_equal(a["label"].numpy(), b["label"].numpy())
    np.testing.assert_allclose(a["probabilities"].numpy(), b["probabilities"].numpy(), atol=1e-5)


def test_random_start_is_deterministic_under_a_seed():
    base, _, _, x = two_class_problem()

    def run(seed):
        return (
            MCNShell(
                base, 8.0, steps=1, step_size=0.5, random_start=True, seed=seed, jit_compile=False
            )
            .embed(x)["z"]
            .numpy()
        )

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_xla_shell_pads_batches_to_buckets_and_matches_plain_tensorflow():
    init = keras.initializers.RandomNormal(0, 0.01, seed=2)
    base = keras.Sequential(
        [keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(3, kernel_initializer=init)]
    )
    x = np.random.default_rng(0).uniform(0, 255, size=(5, *SHAPE)).astype(np.float32)
    plain = MCNShell(base, 4.0, steps=3, jit_compile=False)
    xla = MCNShell(base, 4.0, steps=3, jit_compile=True)
    for n in (5, 3):  # 5 pads to a bucket of 8, 3 to 4; the outputs are cut back to n rows
        a, b = plain.embed(x[:n]), xla.embed(x[:n])
        assert b["z"].shape[0] == n and b["label"].shape == (n,)
        np.testing.assert_array_equal(a["label"].numpy(), b["label"].numpy())
        np.testing.assert_allclose(
            a["probabilities"].numpy(), b["probabilities"].numpy(), atol=1e-4
        )
    assert xla.embed_function.experimental_get_tracing_count() == 1
