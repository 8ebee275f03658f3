"""The contract every attack keeps, checked on one table of attacks (as foolbox's test suite does).

Each row is ``(name, attack)`` with ``attack(model, x, y, epsilon, seed) -> AttackResult``: the
attacks on a base model run on a tiny conv net (8x8x3 images, 4 classes), the attacks on a shell
on a tiny MCN shell around it. For every row:

- it returns an :class:`AttackResult` of ``N`` rows;
- ``x_adv`` lies in ``N(x, epsilon)`` and in the pixel box (1e-3 pixels of float32 rounding);
- ``epsilon = 0`` returns ``x`` exactly, and reports success only where ``x`` itself is wrong;
- the same seed gives the same result;
- an empty batch gives an empty result;
- the reported success is a fresh prediction: the model's (or shell's) argmax at ``x_adv`` is
  not ``y``;
- costs are non-negative; an attack on a shell pays at least one shell prediction per point, an
  attack on a base model none.

Every attack runs a few steps only: this file is about the contract, not about strength.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from helpers import PIXEL_TOL, assert_in_ball_and_box, assert_results_equal, small_conv
from manifold_tf import attacks
from manifold_tf.shells import MCNShell

SHAPE = (8, 8, 3)
CLASSES = 4
N = 6
EPS = 6.0


def _fab(name: str):
    """``attacks.fab`` / ``attacks.fab_t`` (or from their module), ``None`` when not there."""
    fn = getattr(attacks, name, None)
    if callable(fn):
        return fn
    try:
        return getattr(importlib.import_module("manifold_tf.attacks.fab"), name)
    except (ImportError, AttributeError):
        return None


def _row(name, fn, on_shell=False, missing=None):
    marks = [pytest.mark.skip(reason=missing)] if missing else []
    return pytest.param(name, fn, on_shell, id=name, marks=marks)


def with_known_bugs(rows, bugs: dict, raises=None):
    """``rows`` with a strict xfail (raising ``raises``, if given) on the rows named in ``bugs``
    (name -> reason)."""
    return [
        pytest.param(
            *r.values,
            id=r.id,
            marks=list(r.marks)
            + (
                [pytest.mark.xfail(strict=True, reason=bugs[r.id], raises=raises)]
                if r.id in bugs
                else []
            ),
        )
        for r in rows
    ]


FAB, FAB_T = _fab("fab"), _fab("fab_t")
NO_FAB = "manifold_tf.attacks.fab is not there (yet): FAB's rows are skipped"

ROWS = [
    _row(
        "pgd",
        lambda m, x, y, eps, seed: attacks.pgd(
            m,
            x,
            y,
            epsilon=eps,
            steps=2,
            step_size=2.0,
            settings=attacks.PGDSettings(restarts=2),
            seed=seed,
        ),
    ),
    # (Targeted pgd and cw_linf are left out: their y are the targets, and their success is
    # reaching the target, not misclassification.)
    _row(
        "apgd_ce",
        lambda m, x, y, eps, seed: attacks.apgd_ce(
            m, x, y, epsilon=eps, settings=attacks.APGDSettings(steps=2, restarts=2), seed=seed
        ),
    ),
    _row(
        "apgd_dlr",
        lambda m, x, y, eps, seed: attacks.apgd_dlr(
            m, x, y, epsilon=eps, settings=attacks.APGDSettings(steps=2), seed=seed
        ),
    ),
    _row(
        "apgd_t",
        lambda m, x, y, eps, seed: attacks.apgd_t(
            m, x, y, epsilon=eps, settings=attacks.APGDSettings(steps=2, num_targets=2), seed=seed
        ),
    ),
    _row(
        "high_confidence",
        lambda m, x, y, eps, seed: attacks.high_confidence(
            m, x, y, epsilon=eps, steps=2, step_size=2.0, random_start=True, seed=seed
        ),
    ),
    _row(
        "cw_linf",
        lambda m, x, y, eps, seed: attacks.cw_linf(
            m,
            x,
            y,
            epsilon=eps,
            settings=attacks.CWSettings(
                max_iterations=3, largest_const=1e-3, max_total_iterations=40
            ),
        ),
    ),
    _row(
        "square",
        lambda m, x, y, eps, seed: attacks.square(
            m, x, y, epsilon=eps, settings=attacks.SquareSettings(queries=5), seed=seed
        ),
    ),
    _row(
        "fab",
        lambda m, x, y, eps, seed: FAB(
            m, x, y, epsilon=eps, settings=attacks.FABSettings(steps=2, restarts=2), seed=seed
        ),
        missing=FAB is None and NO_FAB,
    ),
    _row(
        "fab_t",
        lambda m, x, y, eps, seed: FAB_T(
            m, x, y, epsilon=eps, settings=attacks.FABSettings(steps=2, num_targets=2), seed=seed
        ),
        missing=FAB_T is None and NO_FAB,
    ),
    # On a shell.
    _row(
        "bpda",
        lambda s, x, y, eps, seed: attacks.bpda(
            s,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(steps=2, random_start=True),
            seed=seed,
        ),
        on_shell=True,
    ),
    _row(
        "bpda_targeted_run",
        lambda s, x, y, eps, seed: attacks.bpda(
            s,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(steps=2, schedule="apgd"),
            target=(y + 1) % CLASSES,
            seed=seed,
        ),
        on_shell=True,
    ),
    _row(
        "bpda_restarts",
        lambda s, x, y, eps, seed: attacks.bpda_restarts(
            s,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(schedule="apgd", steps=1, random_restarts=1),
            seed=seed,
        ),
        on_shell=True,
    ),
    _row(
        "bpda_targeted",
        lambda s, x, y, eps, seed: attacks.bpda_targeted(
            s,
            x,
            y,
            epsilon=eps,
            settings=attacks.BPDASettings(schedule="apgd", steps=1, num_targets=2),
            seed=seed,
        ),
        on_shell=True,
    ),
    _row(
        "lift",
        lambda s, x, y, eps, seed: attacks.lift(
            s,
            x,
            y,
            epsilon=eps,
            settings=attacks.LiftSettings(steps=2, num_targets=2, bpda_steps=1),
            seed=seed,
        ),
        on_shell=True,
    ),
    _row(
        "square_on_shell",
        lambda s, x, y, eps, seed: attacks.square(
            s,
            x,
            y,
            epsilon=eps,
            settings=attacks.SquareSettings(queries=4, output="probabilities"),
            seed=seed,
        ),
        on_shell=True,
    ),
]


@pytest.fixture(scope="module")
def setting():
    """The base, its shell, ``x`` (some pixels on the box edges) and labels ``y``: the base's own
    labels, except two points it gets wrong at ``x``."""
    base = small_conv(seed=0, classes=CLASSES)
    shell = MCNShell(base, delta=4.0, steps=2)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 255.0, (N,) + SHAPE).astype(np.float32)
    x[:, 0] = 0.0  # the box binds: x - eps leaves it
    x[:, -1] = 255.0
    models = dict(base=base, shell=shell)
    labels = {}
    for kind, model in models.items():
        y = predict(model, x)
        y[:2] = (y[:2] + 1) % CLASSES
        labels[kind] = y.astype(np.int32)
    return models, x, labels, {}


def predict(model, x) -> np.ndarray:
    """A fresh prediction: the argmax of the base's logits or of the shell's probabilities."""
    return np.argmax(np.asarray(model(x, training=False)), axis=-1)


def outcome(setting, name, attack, on_shell, eps=EPS, seed=0, n=N):
    """``(model, x, y, result)`` of one row, computed once per module."""
    models, x, labels, cache = setting
    kind = "shell" if on_shell else "base"
    model, x, y = models[kind], x[:n], labels[kind][:n]
    key = (name, eps, seed, n)
    if key not in cache:
        cache[key] = attack(model, x, y, eps, seed)
    return model, x, y, cache[key]


@pytest.mark.parametrize("name, attack, on_shell", ROWS)
def test_one_result_of_n_rows_inside_the_ball_and_the_box(setting, name, attack, on_shell):
    _, x, _, res = outcome(setting, name, attack, on_shell)
    assert isinstance(res, attacks.AttackResult), type(res)
    assert len(res) == N
    assert res.x_adv.dtype == np.float32 and res.success.dtype == bool
    for field in ("success", "base_passes", "shell_predictions", "score"):
        assert getattr(res, field).shape == (N,), field
    assert all(v.shape[:1] == (N,) for v in res.details.values()), res.details
    assert_in_ball_and_box(res.x_adv, x, EPS, tol=PIXEL_TOL)


@pytest.mark.parametrize("name, attack, on_shell", ROWS)
def test_reported_success_is_a_fresh_prediction(setting, name, attack, on_shell):
    model, _, y, res = outcome(setting, name, attack, on_shell)
    np.testing.assert_array_equal(res.success, predict(model, res.x_adv) != y)
    # The two points wrong at x are successes (found at x, or elsewhere).
    assert res.success[:2].all(), res.success


@pytest.mark.parametrize("name, attack, on_shell", ROWS)
def test_costs_are_non_negative_and_shell_attacks_pay_shell_predictions(
    setting, name, attack, on_shell
):
    _, _, _, res = outcome(setting, name, attack, on_shell)
    assert (res.base_passes >= 0).all() and (res.shell_predictions >= 0).all()
    cost = res.cost
    assert cost == {
        "base_passes": int(res.base_passes.sum()),
        "shell_predictions": int(res.shell_predictions.sum()),
    }
    if on_shell:
        assert (res.shell_predictions >= 1).all(), res.shell_predictions
    else:
        assert cost["shell_predictions"] == 0, cost
        # Points the base gets right at x are attacked (square counts queries, not passes).
        if name != "square":
            assert (res.base_passes[2:] > 0).all(), res.base_passes


@pytest.mark.parametrize("name, attack, on_shell", ROWS)
def test_same_seed_same_result(setting, name, attack, on_shell):
    model, x, y, first = outcome(setting, name, attack, on_shell, seed=0)
    again = attack(model, x, y, EPS, 0)
    assert_results_equal(first, again)


@pytest.mark.parametrize("name, attack, on_shell", with_known_bugs(ROWS, {}, raises=AssertionError))
def test_zero_budget_returns_x_and_succeeds_only_where_x_is_wrong(setting, name, attack, on_shell):
    model, x, y, res = outcome(setting, name, attack, on_shell, eps=0.0)
    assert len(res) == N
    np.testing.assert_array_equal(res.x_adv, x)
    np.testing.assert_array_equal(res.success, predict(model, x) != y)


@pytest.mark.parametrize("name, attack, on_shell", ROWS)
def test_an_empty_batch_gives_an_empty_result(name, attack, on_shell):
    # A new model, which no attack has seen yet (attacks on a base model check its outputs once).
    base = small_conv(seed=1, classes=CLASSES)
    model = MCNShell(base, delta=4.0, steps=2) if on_shell else base
    res = attack(model, np.zeros((0,) + SHAPE, np.float32), np.zeros(0, np.int32), EPS, 0)
    assert isinstance(res, attacks.AttackResult)
    assert len(res) == 0 and res.x_adv.shape == (0,) + SHAPE and res.success.shape == (0,)
    assert res.cost == {"base_passes": 0, "shell_predictions": 0}
    assert all(v.shape[:1] == (0,) for v in res.details.values()), res.details
