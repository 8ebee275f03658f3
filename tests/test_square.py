"""Tests of the Square attack: invariants, query accounting, a linear oracle, a shell, bad input."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from helpers import (
    assert_in_ball_and_box,
    binary_linear_problem,
    linear_model,
    small_conv,
    uniform_images,
)
from manifold_tf import attacks
from manifold_tf.attacks.square import p_schedule, square
from manifold_tf.shells import MCNShell

SHAPE = (8, 8, 3)
D = int(np.prod(SHAPE))
TOL = 1e-3  # pixels: float32 rounding of x +- epsilon


def predict(model, x) -> np.ndarray:
    return np.asarray(model(x, training=False)).argmax(axis=1)


@pytest.fixture(scope="module")
def conv():
    base = small_conv()  # 3 classes, Flatten: the prediction varies over the box
    x = uniform_images(8, SHAPE, seed=1)
    x[:, :2] = 0.0  # rows at the edges of the box: the clip to [0, 255] must bind
    x[:, 2, :, 0] = 1.0
    x[:, -2:] = 255.0
    x[:, -3, :, 1] = 254.0
    return base, x, predict(base, x)


# ------------------------------------------------------------------------------------------------
# Invariants on a small conv net


def test_outputs_stay_in_the_ball_and_success_is_the_models_answer(conv):
    base, x, y = conv
    eps, budget = 12.0, 60
    out = square(base, x, y, epsilon=eps, settings=attacks.SquareSettings(queries=budget), seed=3)
    assert isinstance(out, attacks.AttackResult)
    assert set(out.details) == {"queries", "margin"}
    queries, margin = out.details["queries"], out.details["margin"]
    assert_in_ball_and_box(out.x_adv, x, eps)
    # Not vacuous: at this budget some points fall and others stand.
    assert out.success.any() and not out.success.all(), out.success
    # Verified: the model itself is wrong exactly where success is reported.
    np.testing.assert_array_equal(out.success, predict(base, out.x_adv) != y)
    assert (margin[out.success] <= 0).all() and (margin[~out.success] >= 0).all()
    np.testing.assert_array_equal(out.score, -margin)
    assert queries.dtype == np.int32 and out.success.dtype == bool
    assert (queries >= 2).all() and (queries <= budget).all()
    assert (queries[~out.success] == budget).all()  # a standing point used everything
    # A base model: queries are forward passes, neither shell predictions nor base_passes.
    assert out.cost == {"base_passes": 0, "shell_predictions": 0}
    # Deterministic under a seed; another seed searches elsewhere.
    same = square(base, x, y, epsilon=eps, settings=attacks.SquareSettings(queries=budget), seed=3)
    for field in ("x_adv", "success", "base_passes", "shell_predictions", "score"):
        np.testing.assert_array_equal(getattr(out, field), getattr(same, field))
    for key in out.details:
        np.testing.assert_array_equal(out.details[key], same.details[key])
    other = square(base, x, y, epsilon=eps, settings=attacks.SquareSettings(queries=budget), seed=4)
    assert not np.array_equal(out.x_adv, other.x_adv)
    # Points that shrink away from the batch do not retrace the compiled forward pass.
    assert [v for k, v in attacks.tracing_counts(base).items() if k[0] == "square"] == [1]


def test_points_that_succeed_stop_being_queried_and_batches_are_bounded(conv):
    base, x, y = conv
    calls = []

    def counted(z):  # any callable: rows seen per call
        calls.append(int(z.shape[0]))
        return base(z, training=False)

    out = square(
        counted, x, y, epsilon=12.0, settings=attacks.SquareSettings(queries=40, batch_size=3)
    )
    # Every query counted once, plus the final verification of every point.
    assert sum(calls) == out.details["queries"].sum() + len(x)
    assert max(calls) <= 3
    # The rows of one round shrink as points succeed: fewer rows than points x rounds.
    assert out.success.any() and sum(calls) < 41 * len(x)
    np.testing.assert_array_equal(out.success, predict(base, out.x_adv) != y)
    seen = []
    square(
        base,
        x,
        y,
        epsilon=12.0,
        settings=attacks.SquareSettings(queries=10),
        progress=lambda q, left: seen.append((q, left)),
    )
    assert [q for q, _ in seen] == list(range(2, 11))[: len(seen)]
    assert all(0 <= left <= len(x) for _, left in seen)


def test_zero_budget_returns_x_and_succeeds_only_where_x_is_already_wrong(conv):
    base, x, label = conv
    y = (label + 1) % 3
    y[:3] = label[:3]
    out = square(base, x, y, epsilon=0.0, settings=attacks.SquareSettings(queries=50))
    np.testing.assert_array_equal(out.x_adv, x)
    np.testing.assert_array_equal(out.success, label != y)
    np.testing.assert_array_equal(out.details["queries"], 1)
    # With a budget, a point already wrong at x costs one query and stays at x.
    out = square(base, x, y, epsilon=8.0, settings=attacks.SquareSettings(queries=20))
    np.testing.assert_array_equal(out.x_adv[3:], x[3:])
    np.testing.assert_array_equal(out.details["queries"][3:], 1)
    assert out.success[3:].all()
    empty = square(base, x[:0], y[:0], epsilon=1.0)
    assert empty.x_adv.shape == (0,) + SHAPE and empty.details["queries"].shape == (0,)
    assert len(empty) == 0 and empty.success.shape == (0,)


def test_p_schedule_halves_at_the_papers_iterations_rescaled_to_the_budget():
    assert [p_schedule(0.8, i, 10000) for i in (0, 10, 11, 50, 51, 8000, 8001, 9999)] == [
        0.8,
        0.8,
        0.4,
        0.4,
        0.2,
        0.8 / 256,
        0.8 / 512,
        0.8 / 512,
    ]
    # A 1000-query run passes the same steps ten times sooner.
    assert [p_schedule(0.8, i, 1000) for i in (1, 2, 5, 6, 999)] == [0.8, 0.4, 0.4, 0.2, 0.8 / 512]


# ------------------------------------------------------------------------------------------------
# Closed-form oracle: a 3-class linear model


def test_on_a_linear_model_success_matches_the_certified_margin():
    # Logits W.x + b. Against target t the margin m_t(x) = (w_y - w_t).x + b_y - b_t falls in
    # N(x, eps) at most by eps*|w_y - w_t|_1, reached at a corner inside the box (the box never
    # binds here). So R = min_t m_t / (eps |w_y - w_t|_1) certifies: R > 1 no attack can succeed,
    # R < 1 the corner breaks the point.
    rng = np.random.default_rng(0)
    kernel = rng.normal(0.0, 0.01, (D, 3)).astype(np.float32)
    eps = 4.0
    flat = rng.uniform(eps + 1.0, 255.0 - eps - 1.0, (24, D)).astype(np.float32)
    bias = -(flat @ kernel).mean(axis=0)
    model = linear_model(SHAPE, kernel, bias)
    x = flat.reshape((-1,) + SHAPE)
    logits = np.asarray(model(x)).astype(np.float64)
    y = logits.argmax(axis=1)
    k = kernel.astype(np.float64)
    rows = np.arange(len(x))
    ratio = np.full(len(x), np.inf)  # R
    floor = np.full(len(x), np.inf)  # min_t m_t - eps |w_y - w_t|_1: the lowest margin in the ball
    for t in range(3):
        other = y != t
        l1 = np.abs(k[:, y] - k[:, [t]]).sum(axis=0)
        m = logits[rows, y] - logits[:, t]
        ratio[other] = np.minimum(ratio, m / (eps * np.maximum(l1, 1e-12)))[other]
        floor[other] = np.minimum(floor, m - eps * l1)[other]
    weak, robust = ratio < 0.75, ratio > 1.0
    assert weak.sum() >= 5 and robust.sum() >= 5  # both kinds, for the test to mean something

    out = square(model, x, y, epsilon=eps, settings=attacks.SquareSettings(queries=1000), seed=0)
    assert_in_ball_and_box(out.x_adv, x, eps)
    assert out.success[weak].all(), ratio[weak & ~out.success]
    assert not out.success[robust].any()
    np.testing.assert_array_equal(out.success, predict(model, out.x_adv) != y)
    # Nothing beats the closed form: the margin left at x_adv is never below the ball's minimum.
    assert (out.details["margin"] >= floor - 1e-3).all()


# ------------------------------------------------------------------------------------------------
# A shell (probabilities) around a binary linear base


def test_square_breaks_an_mcn_shell_exactly_where_the_linear_base_allows():
    # As in test_bpda: with logits W.x + b and a = w0 - w1, MCN_delta on this base answers the
    # base's label sign(m(x')), m = a.x + b0 - b1, away from the box. So the shell can be fooled in
    # N(x, eps) exactly when |m(x)| < eps |a|_1.
    ratio = np.array([0.5, 1.5, 0.3]).repeat(2) * np.tile([1, -1], 3)  # m(x) / (eps |a|_1)
    base, x, y, p = binary_linear_problem(ratio, eps=6.0, delta=2.0)  # the box never binds
    eps = p["eps"]
    np.testing.assert_array_equal(y, ratio < 0)
    shell = MCNShell(base, p["delta"], steps=1)
    np.testing.assert_array_equal(predict(shell, x), y)

    out = square(
        shell,
        x,
        y,
        epsilon=eps,
        settings=attacks.SquareSettings(queries=300, output="probabilities"),
    )
    assert_in_ball_and_box(out.x_adv, x, eps)
    np.testing.assert_array_equal(out.success, np.abs(ratio) < 1.0)
    np.testing.assert_array_equal(out.success, predict(shell, out.x_adv) != y)
    assert (out.details["queries"] <= 300).all()
    # On a shell every query is a shell prediction (the final verification is not counted).
    np.testing.assert_array_equal(out.shell_predictions, out.details["queries"])
    np.testing.assert_array_equal(out.base_passes, 0)


def test_square_through_per_point_label_slots_is_square_through_the_shell_when_slots_cover_all(
    conv,
):
    # A proxy searching some labels (issue 22) is queried on each point's own slots. With every
    # label in the slots (in another order per point) its answers are the shell's, so the attack
    # must be the same draw for draw: slots follow the points through every query subset.
    base, x, _ = conv
    shell = MCNShell(base, 2.0, steps=2)
    y = predict(shell, x)
    slots = np.stack([np.roll(np.arange(3), k) for k in range(len(x))]).astype(np.int32)
    seed = np.arange(len(x)) + 5
    plain = square(
        shell,
        x,
        y,
        epsilon=64.0,
        settings=attacks.SquareSettings(queries=12, output="probabilities"),
        seed=seed,
    )
    slotted = square(
        shell,
        x,
        y,
        epsilon=64.0,
        settings=attacks.SquareSettings(queries=12, output="probabilities"),
        seed=seed,
        slots=slots,
    )
    assert plain.success.any() and not plain.success.all()  # the queries decide something
    np.testing.assert_array_equal(slotted.x_adv, plain.x_adv)
    np.testing.assert_array_equal(slotted.success, plain.success)
    np.testing.assert_array_equal(slotted.details["queries"], plain.details["queries"])
    # Restricted to y and one wrong label, a point can be fooled only by that label's search.
    two = np.stack([y, (y + 1) % 3], axis=1).astype(np.int32)
    out = square(
        shell,
        x,
        y,
        epsilon=64.0,
        settings=attacks.SquareSettings(queries=12, output="probabilities"),
        seed=seed,
        slots=two,
    )
    fooled = out.success
    np.testing.assert_array_equal(predict(shell, out.x_adv)[fooled] != y[fooled], True)
    with pytest.raises(ValueError, match=r"slots must be int labels \[N=8"):
        square(
            shell,
            x,
            y,
            epsilon=1.0,
            settings=attacks.SquareSettings(output="probabilities"),
            slots=two[:3],
        )
    with pytest.raises(ValueError, match="embed_labels.*Functional|embed_labels.*Model"):
        square(base, x, y, epsilon=1.0, slots=two)


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_naming_the_problem(conv):
    base, x, y = conv
    with pytest.raises(ValueError, match="epsilon.*-1"):
        square(base, x, y, epsilon=-1.0)
    with pytest.raises(ValueError, match="epsilon.*pixel range"):
        square(base, x, y, epsilon=300.0)
    with pytest.raises(ValueError, match="queries.*0"):
        square(base, x, y, epsilon=1.0, settings=attacks.SquareSettings(queries=0))
    with pytest.raises(ValueError, match="queries.*2.5"):
        square(base, x, y, epsilon=1.0, settings=attacks.SquareSettings(queries=2.5))
    with pytest.raises(ValueError, match="p_init.*1.5"):
        square(base, x, y, epsilon=1.0, settings=attacks.SquareSettings(p_init=1.5))
    with pytest.raises(ValueError, match="p_init.*0"):
        square(base, x, y, epsilon=1.0, settings=attacks.SquareSettings(p_init=0.0))
    with pytest.raises(ValueError, match="output.*softmax"):
        square(base, x, y, epsilon=1.0, settings=attacks.SquareSettings(output="softmax"))
    with pytest.raises(ValueError, match="batch_size.*0"):
        square(base, x, y, epsilon=1.0, settings=attacks.SquareSettings(batch_size=0))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        square(base, x, np.full(len(x), 3), epsilon=1.0)
    with pytest.raises(ValueError, match=r"shape \[8\]"):
        square(base, x, y[:4], epsilon=1.0)
    with pytest.raises(ValueError, match=r"pixel values in \[0, 255\]"):
        square(base, x / 255.0 - 0.5, y, epsilon=1.0)
    with pytest.raises(ValueError, match="batch, height, width"):
        square(base, x[0], y, epsilon=1.0)
    # Logits vs probabilities, as in AutoAttack's checks: the wrong kind is refused.
    softmax = keras.Sequential([base, keras.layers.Softmax()])
    with pytest.raises(ValueError, match="output='probabilities'"):
        square(softmax, x, y, epsilon=1.0)
    with pytest.raises(ValueError, match="output='logits'"):
        square(base, x, y, epsilon=1.0, settings=attacks.SquareSettings(output="probabilities"))


def test_square_settings_hold_normalised_values_and_are_frozen():
    s = attacks.SquareSettings(queries=12.0, p_init=1, batch_size=np.int64(4))
    assert (s.queries, s.p_init, s.batch_size, s.output) == (12, 1.0, 4, "logits")
    assert type(s.queries) is int and type(s.p_init) is float and type(s.batch_size) is int
    assert attacks.SquareSettings() == attacks.SquareSettings(queries=1000, p_init=0.8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.queries = 3
