"""Bad input by the thousand: generated arguments for every public attack, the shells, loaders.

Each generated case either returns a result obeying the contract (right shape, finite, inside the
L-inf ball and the pixel box) or raises ValueError / TypeError naming the problem; any other
exception, a NaN or a hang fails. Models are tiny (``helpers.small_conv``, 8x8x3) and built once.

Default: a few examples per target (the file stays near two minutes on 2 shared cores); the
``slow`` test re-runs every target with many more (``pytest -m slow tests/test_properties.py``).
The number of cases run is printed by the last test (``-s`` shows it).
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import PIXEL_TOL, small_conv
from manifold_tf import attacks, data, shells, validation

SHAPE = (8, 8, 3)
CLASSES = 3
COUNTS: collections.Counter = collections.Counter()  # cases run per target, for the figures
OUTCOMES: collections.Counter = collections.Counter()  # "returned" / "refused"

QUICK = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
MANY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def model():
    return small_conv(seed=0, classes=CLASSES, shape=SHAPE)


@pytest.fixture(scope="module")
def shell(model):
    return shells.MCNShell(model, delta=4.0, steps=2)


def _images(n: int, kind: str, rng: np.random.Generator):
    x = rng.uniform(0.0, 255.0, (max(n, 0), *SHAPE)).astype(np.float32)
    if kind == "valid":
        return x
    # No points: nothing to poison (an empty batch is valid input, and that case is generated too).
    if kind == "nan":
        if x.size:
            x.flat[0] = np.nan
        return x
    if kind == "inf":
        if x.size:
            x.flat[-1] = np.inf
        return x
    if kind == "above":
        return x + 300.0
    if kind == "negative":
        return x - 300.0
    if kind == "int":
        return x.astype(np.int32)
    if kind == "uint8":
        return x.astype(np.uint8)
    if kind == "float64":
        return x.astype(np.float64)
    if kind == "bool":
        return x > 100
    if kind == "rank3":
        return x[0] if len(x) else x.reshape(0, 8, 3)
    if kind == "channels":
        return rng.uniform(0, 255, (max(n, 1), 8, 8, 1)).astype(np.float32)
    if kind == "string":
        return np.array([["a"]] * max(n, 1))
    raise AssertionError(kind)


IMAGE_KINDS = [
    "valid",
    "valid",
    "valid",
    "nan",
    "inf",
    "above",
    "negative",
    "int",
    "uint8",
    "float64",
    "bool",
    "rank3",
    "channels",
    "string",
]
LABEL_KINDS = [
    "valid",
    "valid",
    "valid",
    "out_of_range",
    "negative",
    "float",
    "fractional",
    "wrong_length",
    "2d",
    "nan",
]
BUDGETS = st.one_of(
    st.sampled_from([0.0, 1.0, 4.0, 8.0]),
    st.sampled_from([-1.0, math.nan, math.inf, 1e9, 256.0, -0.0]),
    st.floats(-10, 300, allow_nan=False),
)
STEPS = st.one_of(st.sampled_from([1, 2, 3]), st.sampled_from([0, -1, 2.5, True, False, 1e9]))


def _labels(n: int, kind: str, rng):
    y = rng.integers(0, CLASSES, n)
    return {
        "valid": y,
        "out_of_range": y + CLASSES,
        "negative": y - CLASSES,
        "float": y.astype(np.float32),
        "fractional": y + 0.5,
        "wrong_length": np.append(y, 0),
        "2d": y[:, None],
        "nan": np.full(n, np.nan),
    }[kind]


CASE = st.fixed_dictionaries(
    dict(
        n=st.sampled_from([1, 2, 0]),
        images=st.sampled_from(IMAGE_KINDS),
        labels=st.sampled_from(LABEL_KINDS),
        epsilon=BUDGETS,
        steps=STEPS,
        seed=st.integers(0, 2**16),
    )
)


def _call(name, model, shell, x, y, eps, steps):
    if name == "pgd":
        return attacks.pgd(model, x, y, epsilon=eps, steps=steps, step_size=1.0)
    if name == "apgd_ce":
        return attacks.apgd_ce(model, x, y, epsilon=eps, settings=attacks.APGDSettings(steps=steps))
    if name == "apgd_t":
        settings = attacks.APGDSettings(steps=steps, num_targets=1)
        return attacks.apgd_t(model, x, y, epsilon=eps, settings=settings)
    if name == "high_confidence":
        return attacks.high_confidence(model, x, y, epsilon=eps, steps=steps, step_size=1.0)
    if name == "cw_linf":
        settings = attacks.CWSettings(max_iterations=steps, max_total_iterations=6)
        return attacks.cw_linf(model, x, y, epsilon=eps, settings=settings)
    if name == "square":
        return attacks.square(
            model, x, y, epsilon=eps, settings=attacks.SquareSettings(queries=steps)
        )
    if name == "fab":
        return attacks.fab(model, x, y, epsilon=eps, settings=attacks.FABSettings(steps=steps))
    if name == "fab_t":
        settings = attacks.FABSettings(steps=steps, num_targets=1)
        return attacks.fab_t(model, x, y, epsilon=eps, settings=settings)
    if name == "bpda":
        return attacks.bpda(shell, x, y, epsilon=eps, settings=attacks.BPDASettings(steps=steps))
    if name == "lift":
        return attacks.lift(
            shell, x, y, epsilon=eps, settings=attacks.LiftSettings(num_targets=1, steps=steps)
        )
    raise AssertionError(name)


ATTACKS = [
    "pgd",
    "apgd_ce",
    "apgd_t",
    "high_confidence",
    "cw_linf",
    "square",
    "fab",
    "fab_t",
    "bpda",
    "lift",
]


def _check_attack(name, model, shell, case):
    rng = np.random.default_rng(case["seed"])
    x = _images(case["n"], case["images"], rng)
    y = _labels(case["n"], case["labels"], rng)
    COUNTS[name] += 1
    try:
        out = _call(name, model, shell, x, y, case["epsilon"], case["steps"])
    except (ValueError, TypeError) as e:
        assert str(e), f"{name}: an error without a message"
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["returned"] += 1
    x_in = np.asarray(x, np.float32)
    adv = np.asarray(out.x_adv)
    assert adv.shape == x_in.shape, (name, adv.shape, x_in.shape)
    assert np.isfinite(adv).all(), f"{name} returned NaN/inf for {case}"
    if adv.size:
        assert np.abs(adv - x_in).max() <= case["epsilon"] + PIXEL_TOL, (name, case)
        assert adv.min() >= 0.0 and adv.max() <= 255.0, (name, case)
    assert np.asarray(out.success).shape == (len(x_in),)


def _run(name, model, shell, profile):
    @profile
    @given(case=CASE)
    def check(case):
        _check_attack(name, model, shell, case)

    check()


@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_accept_or_refuse_generated_input(name, model, shell):
    _run(name, model, shell, QUICK)


@pytest.mark.slow
@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_accept_or_refuse_generated_input_many(name, model, shell):
    _run(name, model, shell, MANY)


def test_lift_when_the_shell_is_already_wrong_at_every_point(shell):
    """The minimal failing input hypothesis found (a KeyError, fixed): one point, labelled other
    than the shell's answer at x. Nothing is attacked; x comes back as a success."""
    x = np.random.default_rng(0).uniform(0, 255, (1, *SHAPE)).astype(np.float32)
    answer = int(np.argmax(shell.predict(x, verbose=0), -1)[0])
    res = attacks.lift(
        shell,
        x,
        np.array([(answer + 1) % CLASSES]),
        epsilon=4.0,
        settings=attacks.LiftSettings(num_targets=1, steps=1),
    )
    np.testing.assert_array_equal(res.x_adv, x)
    assert res.success.tolist() == [True] and res.details["shell_label"].tolist() == [answer]


@QUICK
@given(n=st.sampled_from([0, 1, 2]), kind=st.sampled_from(IMAGE_KINDS), seed=st.integers(0, 99))
def test_shell_predict_and_embed(shell, n, kind, seed):
    x = _images(n, kind, np.random.default_rng(seed))
    COUNTS["shell"] += 1
    try:
        probs = np.asarray(shell.predict(x, verbose=0))
        embedded = shell.embed(x)
    except (ValueError, TypeError):
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["returned"] += 1
    assert probs.shape == (len(x), CLASSES) and np.isfinite(probs).all()
    assert np.all(probs >= 0) and np.allclose(probs.sum(-1), 1.0, atol=1e-4)
    assert isinstance(embedded, dict)


@QUICK
@given(
    split=st.sampled_from(["train", "test", "valid", ""]),
    num=st.sampled_from([None, 0, 1, 5, -3, 2.5, True]),
    classes=st.sampled_from([10, 2, 1, 0, -1]),
    dim=st.sampled_from([4, 1, 0, -2]),
)
def test_synthetic_loader(split, num, classes, dim):
    COUNTS["loader"] += 1
    try:
        images, labels = data.synthetic_arrays(
            split, num_examples=num, num_classes=classes, manifold_dim=dim
        )
    except (ValueError, TypeError):
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["returned"] += 1
    assert images.shape == (len(labels), 32, 32, 3) and np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 255
    assert labels.min(initial=0) >= 0 and labels.max(initial=0) < classes


@QUICK
@given(
    value=st.one_of(
        st.integers(-5, 5),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
    ),
    minimum=st.sampled_from([0, 1]),
)
def test_validation_functions(value, minimum):
    COUNTS["validation"] += 1
    for check in (
        lambda: validation.check_int(value, "k", minimum=minimum),
        lambda: validation.check_positive(value, "r"),
        lambda: validation.validate_radius(value, "epsilon"),
    ):
        try:
            out = check()
        except (ValueError, TypeError):
            OUTCOMES["refused"] += 1
            continue
        OUTCOMES["returned"] += 1
        assert isinstance(out, (int, float)) and math.isfinite(out)


def test_zz_cases_run():
    """Prints how many generated cases ran (run with ``-s``), for the closing figures."""
    print(f"\nproperty cases run: {sum(COUNTS.values())} {dict(COUNTS)}; outcomes {dict(OUTCOMES)}")
    assert sum(COUNTS.values()) > 0
