"""Tests of the adaptive (BPDA) attack on the shells: invariants, the surrogate's rule, a
closed-form oracle for every variant, EOT, bad input. The chains and ``lift`` on their own:
``test_bpda_suite.py``."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from helpers import (
    assert_in_ball_and_box,
    assert_results_equal,
    binary_linear_problem,
    small_conv,
    uniform_images,
)
from manifold_tf import attacks, compiled
from manifold_tf.attacks import AttackResult, bpda
from manifold_tf.shells import MCNShell, NCNShell, Scores

# The package exports the function bpda; the module holds the surrogate and the EOT copies.
bpda_module = importlib.import_module("manifold_tf.attacks.bpda")
BPDA_DETAILS = {"shell_label", "steps_used", "target"}

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
# Invariants on a small conv base


@pytest.mark.parametrize("kind", ["mcn", "ncn"])
def test_outputs_stay_in_the_ball_and_success_is_the_shells_answer(conv, kind):
    base, x, shells = conv
    shell = shells[kind]
    y = shell.embed(x)["label"].numpy()  # the shell's clean answers: success = the attack moved it
    eps, steps = 3.0, 4
    out = bpda(
        shell,
        x,
        y,
        epsilon=eps,
        settings=attacks.BPDASettings(steps=steps, random_start=True),
        seed=1,
    )
    assert isinstance(out, AttackResult) and set(out.details) == BPDA_DETAILS
    np.testing.assert_array_equal(out.details["target"], -1)  # untargeted
    assert_in_ball_and_box(out.x_adv, x, eps)
    # Not vacuous: at this budget the attack fools the shell on some points and not on others.
    assert out.success.any() and not out.success.all(), out.success
    again = shell.embed(out.x_adv)["label"].numpy()
    np.testing.assert_array_equal(out.details["shell_label"], again)
    np.testing.assert_array_equal(out.success, again != y)
    assert (out.details["steps_used"][~out.success] == steps).all()
    used = out.details["steps_used"]
    assert (used <= steps).all() and used.dtype == np.int32
    if kind == "mcn":  # MCN ranks by log-odds: the surrogate is positive exactly when it is wrong
        np.testing.assert_array_equal(out.score > 0, out.success)
    # Deterministic under a seed; another seed starts elsewhere.
    same = bpda(
        shell,
        x,
        y,
        epsilon=eps,
        settings=attacks.BPDASettings(steps=steps, random_start=True),
        seed=1,
    )
    assert_results_equal(out, same)
    other = bpda(
        shell,
        x,
        y,
        epsilon=eps,
        settings=attacks.BPDASettings(steps=steps, random_start=True),
        seed=2,
    )
    assert not np.array_equal(out.x_adv, other.x_adv)
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
    out = bpda(
        shell,
        x,
        y,
        epsilon=eps,
        settings=attacks.BPDASettings(steps=0),
        x_init=far.astype(np.float32),
    )
    np.testing.assert_array_equal(out.x_adv, start)  # steps=0: the projected start, unchanged
    np.testing.assert_array_equal(out.success, fooled)
    np.testing.assert_array_equal(out.details["steps_used"], 0)
    out = bpda(
        shell,
        x,
        y,
        epsilon=eps,
        settings=attacks.BPDASettings(steps=3),
        x_init=far.astype(np.float32),
    )
    np.testing.assert_array_equal(out.x_adv[fooled], start[fooled])  # a success is never moved
    np.testing.assert_array_equal(out.details["steps_used"][fooled], 0)
    assert_in_ball_and_box(out.x_adv, x, eps)


def test_zero_budget_returns_x_and_the_shells_clean_answer(conv):
    _, x, shells = conv
    shell = shells["ncn"]
    label = shell.embed(x)["label"].numpy()
    y = (label + 1) % 3  # wrong on purpose: the shell "fails" at x itself, at step 0
    y[:2] = label[:2]
    out = bpda(shell, x, y, epsilon=0.0, settings=attacks.BPDASettings(steps=2))
    np.testing.assert_array_equal(out.x_adv, x)
    np.testing.assert_array_equal(out.success, label != y)
    np.testing.assert_array_equal(out.details["steps_used"], np.where(label != y, 0, 2))
    empty = bpda(shell, x[:0], y[:0], epsilon=1.0, settings=attacks.BPDASettings(steps=2))
    assert empty.x_adv.shape == (0,) + SHAPE and empty.success.shape == (0,)
    assert len(empty) == 0 and set(empty.details) == BPDA_DETAILS


def test_the_surrogate_follows_each_shells_decision_rule():
    # Hand-made scores: 3 labels, y = 0, no model needed.
    y = np.zeros(4, np.int32)
    ar = np.broadcast_to(np.arange(3, dtype=np.int32), (4, 3))
    lo = np.array([[2.0, 1.0, 0.5], [0.5, 1.0, 0.0], [3.0, 2.5, 1.0], [3.0, 1.0, 0.0]])
    # NCN, p = 0.9 (logit 2.197): row 0 neither meets p, row 1 none but lo_1 > lo_0 (wrong),
    # row 2 both 0 and 1 meet p (0 nearer), row 3 only y meets p.
    met = np.array([[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0]], bool)
    dist = np.array([[8, 8, 8], [8, 8, 8], [2.0, 5.0, 8], [1.0, 8, 8]])
    key = np.where(met, 1e12 - dist, lo)
    sc = Scores(ar, key, lo, met, dist, float(np.log(9.0)), key.argmax(1))
    r = bpda_module.surrogate_rows(sc, y)
    np.testing.assert_array_equal(r.up, [1, 1, 1, 1])
    np.testing.assert_array_equal(r.down, [0, 0, 0, 0])
    # Log-odds race while y does not meet p; distance race (scaled gradients) once it does.
    np.testing.assert_array_equal(r.scaled, [False, False, True, True])
    np.testing.assert_allclose(r.margin, [-1.0, 0.5, 2.0 - 5.0, -(np.log(9.0) - 1.0)])
    assert ((r.margin > 0) == (sc.pick != y)).all()
    # Targeted at 2: up is label 2, down the best other label by the rule (row 1: label 1).
    r = bpda_module.surrogate_rows(sc, y, np.full(4, 2, np.int32))
    np.testing.assert_array_equal(r.up, [2, 2, 2, 2])
    np.testing.assert_array_equal(r.down, [0, 1, 0, 0])

    # CW paper_code: slot s was searched for label s, but is scored by its own top label.
    cand = np.array([[0, 0, 1], [0, 0, 0]], np.int32)  # row 1: every candidate's top label is y
    key = np.array([[5.0, 4.0, 3.0], [5.0, 1.0, 2.0]])
    sc = Scores(cand, key, key, None, None, None, np.array([0, 0], np.int32))
    r = bpda_module.surrogate_rows(sc, y[:2])
    # Row 0: the candidate of slot 2 carries the wrong label 1: raise label 1 there, lower y at
    # slot 0. Row 1: no wrong top label anywhere: raise label 1 in slot 1, where y is least sure.
    np.testing.assert_array_equal(r.up, [2, 1])
    np.testing.assert_array_equal(r.up_label, [1, 1])
    np.testing.assert_array_equal(r.down, [0, 0])
    np.testing.assert_array_equal(r.margin, [3.0 - 5.0, -np.inf])


# ------------------------------------------------------------------------------------------------
# Closed-form oracle: a binary linear base


def binary_problem():
    """``helpers.binary_linear_problem`` with 8 points of margins +-0.5 and +-1.5 ``eps * |a|_1``.

    Either shell can be fooled in ``N(x, eps)`` exactly when ``|m(x)| < eps |a|_1``, at the corner
    ``x - eps sign(a)`` (``y = 0``); every surrogate's gradient is a multiple of ``-a``.
    """
    ratio = np.array([0.5, 1.5] * 4) * np.repeat([1, -1], 4)  # target m(x) / (eps |a|_1)
    return binary_linear_problem(ratio, eps=6.0, delta=2.0)


def test_mcn_on_a_binary_linear_base_is_broken_exactly_below_the_linear_margin():
    base, x, y, p = binary_problem()
    eps, l1 = p["eps"], p["l1"]
    shell = MCNShell(base, p["delta"], steps=1)
    np.testing.assert_array_equal(shell.embed(x)["label"].numpy(), y)

    out = bpda(shell, x, y, epsilon=eps, settings=attacks.BPDASettings(steps=3, step_size=eps))
    breakable = np.abs(p["ratio"]) < 1.0
    np.testing.assert_array_equal(out.success, breakable)
    np.testing.assert_array_equal(out.details["steps_used"], np.where(breakable, 1, 3))
    # Every point ends at its optimal corner: where the attack fails, nothing better exists.
    np.testing.assert_allclose(out.x_adv, p["corner"], atol=TOL)
    # There (y = 0) m(corner) = (ratio - 1) eps |a|_1 and the surrogate lo_1 - lo_0 is
    # -2 m(corner) = 2 (1 - ratio) eps |a|_1: +eps |a|_1 for ratio 0.5, -eps |a|_1 for 1.5.
    expected = np.where(breakable, 1.0, -1.0) * eps * l1
    np.testing.assert_allclose(out.score, expected, rtol=2e-3)
    # Cost accounting: one shell call per iterate visited, two base rows per step taken.
    np.testing.assert_array_equal(out.shell_predictions, out.details["steps_used"] + 1)
    np.testing.assert_array_equal(out.base_passes, 2 * out.details["steps_used"])


@pytest.mark.parametrize(
    "variant",
    [
        "apgd",
        "targeted",
        "targeted_apgd",
        "restarts",
        "top_k",
        "lift",
        "lift_bpda",
        "eot_random_start",
        "ncn",
    ],
)
def test_every_variant_meets_the_binary_linear_oracle(variant):
    # The same exact condition for every attack: broken iff |m(x)| < eps |a|_1, at the corner.
    base, x, y, p = binary_problem()
    eps, delta = p["eps"], p["delta"]
    breakable = np.abs(p["ratio"]) < 1.0
    shell = MCNShell(base, delta, steps=1)
    if variant == "eot_random_start":
        # One signed step of 2.5 delta from anywhere in N(x', delta) ends at the same corner: the
        # random shell answers as the deterministic one, so the oracle still holds.
        shell = MCNShell(base, delta, steps=1, random_start=True, seed=5)
    elif variant == "ncn":
        shell = NCNShell(base, 0.9, delta_max=16.0, steps=20, rounds=3)
    np.testing.assert_array_equal(shell.embed(x)["label"].numpy(), y)
    run = dict(
        apgd=lambda: bpda(
            shell, x, y, epsilon=eps, settings=attacks.BPDASettings(steps=3, schedule="apgd")
        ),
        targeted=lambda: bpda(
            shell,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(steps=3, step_size=eps),
            target=1 - y,
        ),
        targeted_apgd=lambda: bpda(
            shell,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(steps=3, schedule="apgd"),
            target=1 - y,
        ),
        restarts=lambda: attacks.bpda_restarts(
            shell,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(schedule="apgd", steps=3, random_restarts=2),
            seed=4,
        ),
        top_k=lambda: attacks.bpda_targeted(
            shell,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(schedule="apgd", steps=3, num_targets="all"),
        ),
        lift=lambda: attacks.lift(shell, x, y, epsilon=eps, settings=attacks.LiftSettings(steps=3)),
        lift_bpda=lambda: attacks.lift(
            shell, x, y, epsilon=eps, settings=attacks.LiftSettings(steps=3, bpda_steps=2)
        ),
        eot_random_start=lambda: bpda(
            shell,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(steps=3, schedule="apgd", eot_samples=2),
            seed=1,
        ),
        ncn=lambda: bpda(
            shell, x, y, epsilon=eps, settings=attacks.BPDASettings(steps=3, schedule="apgd")
        ),
    )[variant]
    out = run()
    np.testing.assert_array_equal(out.success, breakable)
    np.testing.assert_array_equal(shell.embed(out.x_adv)["label"].numpy() != y, breakable)
    # Sign steps of >= eps (APGD's first is 2 eps; lift's base ascent ends at the corner of the
    # eps + delta ball, whose clip is the eps corner) reach the corner at once and stay there.
    np.testing.assert_allclose(out.x_adv, p["corner"], atol=TOL)
    if variant != "ncn":  # MCN's margin lo_1 - lo_0 at the corner, as in the test above
        expected = np.where(breakable, 1.0, -1.0) * eps * p["l1"]
        np.testing.assert_allclose(out.score, expected, rtol=2e-3)
    if variant in ("apgd", "targeted", "targeted_apgd", "ncn"):
        np.testing.assert_array_equal(out.details["steps_used"], np.where(breakable, 1, 3))
    if variant == "eot_random_start":  # each step: the shell, then two EOT copies; 2 rows each
        used = out.details["steps_used"]
        np.testing.assert_array_equal(out.shell_predictions, used + 1 + 2 * used)
        np.testing.assert_array_equal(out.base_passes, 2 * 2 * used)
    if variant == "lift":  # one shell call at x, then per target one base ascent and one check
        np.testing.assert_array_equal(out.shell_predictions, 2)
        np.testing.assert_array_equal(out.base_passes, 3)
        np.testing.assert_array_equal(out.details["target"], 1 - y)


def test_eot_on_a_random_start_mcn_shell_verifies_each_success_on_a_fresh_draw(conv):
    # MCN with a random start is random only through its seed (and the batch layout: one point
    # per call here, so a re-evaluation reproduces the attack's check). EOT averages copies with
    # other seeds; the shell's own draw only judges success.
    base, x, _ = conv
    shell = MCNShell(base, 4.0, steps=2, random_start=True, seed=11)
    steps, broken = 4, 0
    for i in range(len(x)):
        xi = x[i : i + 1]
        yi = shell.embed(xi)["label"].numpy()
        out = bpda(
            shell,
            xi,
            yi,
            epsilon=3.0,
            settings=attacks.BPDASettings(steps=steps, schedule="apgd", eot_samples=3),
        )
        assert_in_ball_and_box(out.x_adv, xi, 3.0)
        fresh = shell.embed(out.x_adv)["label"].numpy()
        np.testing.assert_array_equal(out.success, fresh != yi)
        used = out.details["steps_used"]
        np.testing.assert_array_equal(out.shell_predictions, used + 1 + 3 * used)
        np.testing.assert_array_equal(out.base_passes, 2 * 3 * used)
        broken += int(out.success[0])
    assert 0 < broken < len(x)
    # The copies: three other seeds (the same for every call with seed=0), one trace each.
    copies = bpda_module._COPIES[shell]
    assert shell.seed not in copies and len(copies) == 3
    assert all(c.random_start and c.base is base for c in copies.values())
    assert all(c.embed_function.experimental_get_tracing_count() == 1 for c in copies.values())


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_naming_the_problem(conv):
    base, x, shells = conv
    shell = shells["mcn"]
    y = np.zeros(len(x), np.int32)
    with pytest.raises(ValueError, match="must be a model shell.*got Functional"):
        bpda(base, x, y, epsilon=1.0)
    with pytest.raises(ValueError, match="epsilon.*-1"):
        bpda(shell, x, y, epsilon=-1.0)
    with pytest.raises(ValueError, match="epsilon.*pixel range"):
        bpda(shell, x, y, epsilon=300.0)
    with pytest.raises(ValueError, match="steps.*-1"):
        bpda(shell, x, y, epsilon=1.0, settings=attacks.BPDASettings(steps=-1))
    with pytest.raises(ValueError, match="steps.*2.5"):
        bpda(shell, x, y, epsilon=1.0, settings=attacks.BPDASettings(steps=2.5))
    with pytest.raises(ValueError, match="step_size.*-0.5"):
        bpda(shell, x, y, epsilon=1.0, settings=attacks.BPDASettings(step_size=-0.5))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        bpda(shell, x, np.full(len(x), 3, np.int32), epsilon=1.0)
    with pytest.raises(ValueError, match=r"shape \[6\]"):
        bpda(shell, x, y[:4], epsilon=1.0)
    with pytest.raises(ValueError, match=r"\(8, 8, 3\).*\(32, 32, 3\)"):
        bpda(shell, np.zeros((2, 32, 32, 3), np.float32), y[:2], epsilon=1.0)
    with pytest.raises(ValueError, match=r"pixel values in \[0, 255\]"):
        bpda(shell, x / 255.0 - 0.5, y, epsilon=1.0)
    with pytest.raises(ValueError, match="x_init.*random_start"):
        bpda(shell, x, y, epsilon=1.0, x_init=x, settings=attacks.BPDASettings(random_start=True))
    with pytest.raises(ValueError, match=r"x_init must have shape \(6, 8, 8, 3\)"):
        bpda(shell, x, y, epsilon=1.0, x_init=x[:2])


def test_bpda_applies_the_shells_declared_stand_in_for_its_search():
    """``FactorShell.bpda_vjp`` is called on every step's gradient: a stand-in ``255 - x`` (whose
    vector-Jacobian product is ``-g``) walks the other way, and the identity changes nothing."""
    from helpers import small_conv, uniform_images
    from manifold_tf.shells import MCNShell

    class Mirrored(MCNShell):
        calls = 0

        def bpda_approximation(self, x):
            type(self).calls += 1
            return 255.0 - x

    base = small_conv(seed=4, classes=3, shape=(6, 6, 3))
    x = uniform_images(5, (6, 6, 3), seed=1)
    y = base(x).numpy().argmax(1)
    # one step: the same gradient, mirrored
    kw = dict(epsilon=6.0, settings=attacks.BPDASettings(steps=1, step_size=2.0))
    plain = attacks.bpda(MCNShell(base, 4.0, steps=2), x, y, **kw)
    mirrored = attacks.bpda(Mirrored(base, 4.0, steps=2), x, y, **kw)
    assert Mirrored.calls >= 1
    moved = ~plain.success & ~mirrored.success
    assert moved.any()
    a, b = mirrored.x_adv[moved] - x[moved], plain.x_adv[moved] - x[moved]
    both = (a != 0) & (b != 0)  # not held by the pixel box
    assert both.mean() > 0.9
    np.testing.assert_array_equal(np.sign(a[both]), -np.sign(b[both]))
