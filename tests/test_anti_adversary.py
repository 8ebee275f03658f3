"""The anti-adversary layer (Alfarra et al. 2022) as a shell: oracles on linear models (for two
classes the anti-adversarial steps reach the corner sign(w_yhat - w_j) of the ball, the point of
largest margin for the predicted label; for more classes one step by hand), the pseudo-label is
F(x)'s, what the evaluation asks of it, Keras I/O, and BPDA on it.

Tiny shapes: 4x4x3 images (pixels 0..255), a linear base.
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
from manifold_tf.shells import SHELLS, AntiAdversaryShell
from manifold_tf.shells.anti_adversary import ANTI_STEP_SIZE, ANTI_STEPS

# The module (manifold_tf.attacks.bpda, the name, is the attack function).
bpda = importlib.import_module("manifold_tf.attacks.bpda")

SHAPE = (4, 4, 3)
D = int(np.prod(SHAPE))


def problem(classes, seed=0, n=6, low=40.0, high=215.0):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(0.0, 0.02, size=(D, classes))
    bias = rng.normal(0.0, 0.5, size=classes)
    x = rng.uniform(low, high, size=(n,) + SHAPE).astype(np.float32)
    return linear_model(SHAPE, kernel, bias), kernel, bias, x


def test_two_classes_reach_the_corner_of_largest_predicted_margin():
    base, kernel, bias, x = problem(2)
    steps, alpha = 2, 7.0
    shell = AntiAdversaryShell(base, steps=steps, step_size=alpha)
    out = shell.embed(x)
    y_hat = np_logits(x, kernel, bias).argmax(1)
    np.testing.assert_array_equal(out["pseudo_label"].numpy(), y_hat)
    # d/dz log F_yhat = (1 - F_yhat)(w_yhat - w_j): every step is alpha sign(w_yhat - w_j), so K
    # steps reach x + K alpha sign(w_yhat - w_j), the maximiser of the margin over N(x, K alpha).
    w = kernel[:, 0] - kernel[:, 1]
    direction = np.where(y_hat[:, None] == 0, np.sign(w)[None], -np.sign(w)[None])
    corner = x + steps * alpha * direction.reshape(x.shape)
    np.testing.assert_allclose(out["point"].numpy(), corner, atol=1e-4)
    margin = lambda z: np.take_along_axis(  # noqa: E731
        np_logits(z, kernel, bias) @ np.array([[1.0, -1.0], [-1.0, 1.0]]), y_hat[:, None], 1
    )[:, 0]
    rng = np.random.default_rng(1)
    for _ in range(20):  # no point of the ball is more confident in y_hat than the corner
        other = x + rng.uniform(-1, 1, size=x.shape) * steps * alpha
        assert (margin(other) <= margin(out["point"].numpy()) + 1e-6).all()
    # The answer is F there, and the label never changes (the margin only grows).
    probs = np_softmax(np_logits(out["point"].numpy(), kernel, bias))
    np.testing.assert_allclose(shell.predict(x, verbose=0), probs, atol=1e-5)
    assert (probs.argmax(1) == y_hat).all()


def test_one_step_with_more_classes_is_the_hand_computed_step():
    base, kernel, bias, x = problem(5, seed=2)
    shell = AntiAdversaryShell(base, steps=1, step_size=3.0)
    y_hat = np_logits(x, kernel, bias).argmax(1)
    # d/dx log F_yhat = (1 - F_yhat) (w_yhat - sum_{j != yhat} q_j w_j), q the softmax over the
    # other labels: its sign, without the factor that rounds to 0 at these margins.
    logits = np_logits(x, kernel, bias)
    others = np.where(np.eye(5)[y_hat] > 0, -np.inf, logits)
    q = np_softmax(others)
    grad = ((np.eye(5)[y_hat] - q) @ kernel.T).reshape(x.shape)
    assert np.abs(grad).min() > 1e-8
    np.testing.assert_allclose(shell.embed(x)["point"].numpy(), x + 3.0 * np.sign(grad), atol=1e-4)


def test_radius_and_box_bound_the_steps():
    base, _, _, x = problem(3, seed=3, low=0.0, high=255.0)
    shell = AntiAdversaryShell(base, steps=3, step_size=5.0, radius=6.0)
    assert shell.search_radius == 6.0
    assert_in_ball_and_box(shell.embed(x)["point"].numpy(), x, 6.0)
    free = AntiAdversaryShell(base, steps=3, step_size=5.0)
    assert free.search_radius == 15.0
    assert_in_ball_and_box(free.embed(x)["point"].numpy(), x, 15.0)
    none = AntiAdversaryShell(base, steps=0)
    np.testing.assert_array_equal(none.embed(x)["point"].numpy(), x)


def test_what_the_evaluation_asks_of_it_and_the_authors_defaults():
    base, _, _, x = problem(3)
    shell = AntiAdversaryShell(base, steps=4, step_size=2.0)
    assert SHELLS["anti_adversary"] is AntiAdversaryShell and shell.kind == "anti_adversary"
    assert shell.passes_per_prediction() == 4 and shell.rows_per_image == 1
    assert not shell.is_random and shell.with_seed(5) is shell
    sc = shell.scores(shell.embed(x))
    np.testing.assert_array_equal(sc.pick, shell.predict(x, verbose=0).argmax(1))
    default = AntiAdversaryShell(base)  # the authors' CIFAR-10 command: --k 2 --alpha 0.15
    assert (default.steps, default.step_size, default.radius) == (2, 0.15 * 255, None)
    assert (ANTI_STEPS, ANTI_STEP_SIZE) == (2, pytest.approx(38.25))
    assert (ShellConfig().anti_steps, ShellConfig().anti_step_size) == (2, pytest.approx(38.25))


def test_built_from_the_evaluation_settings_by_name():
    base, _, _, _ = problem(3)
    cfg = ShellConfig(kind="anti_adversary", anti_steps=3, anti_step_size=4.0, anti_radius=10.0)
    shell = cfg.build(base, ThreatConfig(), seed=9)
    assert isinstance(shell, AntiAdversaryShell)
    assert (shell.steps, shell.step_size, shell.radius) == (3, 4.0, 10.0)
    assert shell.settings() == dict(
        shell="anti_adversary",
        steps=3,
        step_size=4.0,
        radius=10.0,
        search_radius=10.0,
        jit_compile=False,
    )
    built = shells.build("anti_adversary", base, ShellConfig(), delta=8.0, p=0.9)
    assert built.radius is None and built.search_radius == pytest.approx(76.5)


def test_keras_round_trips_and_export(tmp_path):
    base, _, _, x = problem(3)
    shell = AntiAdversaryShell(base, steps=2, step_size=4.0, radius=5.0)
    clone = assert_config_round_trip(shell)
    assert clone.settings() == shell.settings()
    assert_saving_round_trip(shell, x, tmp_path, atol=1e-5)
    shell.export(str(tmp_path / "export"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(
        loaded.serve(tf.constant(x)).numpy(), shell.predict(x, verbose=0), atol=1e-5
    )
    emb = loaded.embed(tf.constant(x))
    np.testing.assert_array_equal(emb["pseudo_label"].numpy(), shell.embed(x)["pseudo_label"])


def test_bpda_breaks_the_anti_adversary_on_a_linear_base():
    # Two classes: the shell only adds margin to the label F(x) predicts, so BPDA must first
    # cross the base's boundary by more than K alpha; with a budget far above that it does.
    base, kernel, bias, x = problem(2, seed=4)
    shell = AntiAdversaryShell(base, steps=2, step_size=2.0)
    y = shell.predict(x, verbose=0).argmax(1)
    rows = bpda.surrogate_rows(shell.scores(shell.embed(x)), y.astype(np.int64))
    assert (rows.down_label == y).all() and (rows.up_label == 1 - y).all()
    res = bpda.bpda(shell, x, y, epsilon=80.0, settings=bpda.BPDASettings(steps=10))
    assert res.success.all()
    assert_in_ball_and_box(res.x_adv, x, 80.0)
    assert (shell.predict(res.x_adv, verbose=0).argmax(1) != y).all()
