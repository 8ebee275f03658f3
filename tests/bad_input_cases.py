"""Generated bad input for the ``test_bad_input_*`` files: strategies, the oracle, the counts.

Every case starts from a valid call of one public entry point and breaks one or two of its
arguments (a wrong shape, dtype, NaN/inf, pixels outside 0..255, labels out of range, a negative or
NaN budget, a wrong type, an unknown name, a corrupt file ...). The oracle: the call raises one of
the entry point's documented errors (ValueError / TypeError unless it says otherwise), and the
message names one of the broken arguments, with no TensorFlow or Keras internals in it. Every case
is refused before any compute, so a case costs milliseconds.

Sizes: the default run draws :data:`QUICK` cases per entry point (``MANIFOLD_TF_BAD_INPUT_CASES``
changes it); the ``slow`` tests draw :data:`MANY` (1,000). Hypothesis runs derandomized, without a
database and without deadlines, through the registered profiles ``bad_input`` and
``bad_input_slow``. Each file prints its cases per entry point when it finishes (shown by pytest
without ``-s``), and each test checks that hypothesis ran the full count (a strategy too small to
give that many distinct cases would stop early and fail).
"""

from __future__ import annotations

import collections
import math
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

QUICK = int(os.environ.get("MANIFOLD_TF_BAD_INPUT_CASES", "20"))
MANY = 1000
for _name, _count in (("bad_input", QUICK), ("bad_input_slow", MANY)):
    settings.register_profile(
        _name,
        max_examples=_count,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

# The default run and the slow one, as a parameter of every entry point's test.
SIZES = [
    pytest.param("bad_input", id="quick"),
    pytest.param("bad_input_slow", id="thousand", marks=pytest.mark.slow),
]

# Text that means an error escaped from inside TensorFlow or a Keras layer instead of a check.
INTERNALS = re.compile(
    r"in user code|Graph execution error|incompatible with the layer|Traceback|"
    r"tensorflow/core|node \w+ defined at"
)

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def names(message: str, name: str) -> bool:
    """``name`` appears in ``message`` as a word (``x`` is not found inside ``x_init``)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) is not None


def check_refused(call, broken: list[str], errors=(ValueError, TypeError), what: str = ""):
    """Runs ``call()`` and checks it raises one of ``errors`` naming one of ``broken``."""
    try:
        call()
    except errors as e:
        message = str(e)
    else:
        raise AssertionError(f"{what}: accepted bad {broken}")
    assert any(names(message, n) for n in broken), f"{what}: {broken} not named in {message!r}"
    assert not INTERNALS.search(message), f"{what}: internal error text in {message!r}"


def run(entry: str, profile: str, strategy, check, file_counts=COUNTS) -> None:
    """Runs ``check(case)`` on every case hypothesis draws from ``strategy`` under ``profile``;
    counts them under ``entry`` and checks the profile's full count ran."""
    ran = 0

    @settings(settings.get_profile(profile))
    @given(case=strategy)
    def body(case):
        nonlocal ran
        ran += 1
        check(case)

    body()
    file_counts["all"][entry] += ran
    wanted = settings.get_profile(profile).max_examples
    assert ran >= wanted, f"{entry}: hypothesis ran {ran} cases of {wanted} (strategy too small?)"


def report(request, title: str) -> None:
    """Prints the cases run per entry point (at the end of a module, past pytest's capture)."""
    counts = COUNTS["all"]
    if not counts:
        return
    width = max(map(len, counts))
    lines = [f"\n{title}: {sum(counts.values())} generated cases, {len(counts)} entry points"]
    lines += [f"  {name:<{width}}  {n:>6}" for name, n in sorted(counts.items())]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    with capture.global_and_fixture_disabled():
        for line in lines:
            if reporter is not None:
                reporter.write_line(line)
            else:  # pragma: no cover - pytest without its terminal (e.g. -p no:terminal)
                print(line)
    counts.clear()


# ------------------------------------------------------------------------------------------------
# Bad values by kind of argument

# Values of the wrong type for any numeric argument.
WRONG_TYPES = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=4),
    st.complex_numbers(max_magnitude=10, allow_nan=False).filter(lambda z: z.imag != 0),
    st.lists(st.floats(0, 8), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
NAN = st.just(math.nan)


def bad_radius():
    """Not a budget in pixels: negative, above 255, NaN/inf, or not a number."""
    return st.one_of(
        st.floats(max_value=-1e-6, allow_nan=False),
        st.floats(min_value=255.001, allow_nan=False),
        NAN,
        WRONG_TYPES,
    )


def bad_int(minimum: int):
    """Not an integer >= ``minimum``: smaller, fractional, NaN/inf, bool or not a number."""
    return st.one_of(
        st.integers(max_value=minimum - 1),
        st.floats(-1e6, 1e6).filter(lambda v: not v.is_integer()),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        WRONG_TYPES,
    )


def bad_positive():
    """Not a finite number > 0."""
    return st.one_of(st.floats(max_value=0.0, allow_nan=False), NAN, st.just(math.inf), WRONG_TYPES)


def bad_open_unit():
    """Not a number in the open interval (0, 1)."""
    return st.one_of(
        st.floats(max_value=0.0, allow_nan=False),
        st.floats(min_value=1.0, allow_nan=False),
        NAN,
        WRONG_TYPES,
    )


def bad_choice(choices):
    """Not one of ``choices``."""
    return st.one_of(
        st.text(max_size=8).filter(lambda s: s not in choices),
        st.none(),
        st.integers(),
        st.floats(allow_nan=False),
    )


def bad_seed():
    """Not an integer."""
    return st.one_of(
        st.floats(allow_nan=True).filter(lambda v: not float(v).is_integer()), WRONG_TYPES
    )


# Images: (kind, a value, a position); made into arrays by :func:`make_images`.
IMAGE_KINDS = (
    "nan",
    "inf",
    "-inf",
    "above",
    "below",
    "int8",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "bool",
    "complex",
    "string",
    "object",
    "rank2",
    "rank3",
    "rank5",
    "channels",
    "height",
    "width",
)


def bad_images(extra=()):
    """A recipe for a batch that is not ``[N, H, W, C]`` float pixels in 0..255."""
    return st.tuples(
        st.sampled_from(IMAGE_KINDS + tuple(extra)),
        st.floats(1e-3, 1e6),
        st.integers(0, 10**6),
    )


def make_images(recipe, n: int, shape: tuple[int, ...], rng: np.random.Generator):
    """The batch ``recipe`` describes, around ``n`` valid images of ``shape`` (``[H, W, C]``)."""
    kind, amount, where = recipe
    x = rng.uniform(0.0, 255.0, (n, *shape)).astype(np.float32)
    i = where % x.size
    if kind in ("nan", "inf", "-inf"):
        x.flat[i] = float(kind)
        return x
    if kind == "above":
        x.flat[i] = 255.0 + amount
        return x
    if kind == "below":
        x.flat[i] = -amount
        return x
    if kind in ("int8", "int32", "int64", "uint8", "uint16"):
        return x.astype(kind)
    if kind == "bool":
        return x > 127
    if kind == "complex":
        return x.astype(np.complex64)
    if kind == "string":
        return x.astype(str)
    if kind == "object":
        return np.array([None] * n, dtype=object)
    if kind == "rank2":
        return x.reshape(n, -1)
    if kind == "rank3":
        return x[0]
    if kind == "rank5":
        return x[None]
    if kind == "empty":
        return x[:0]
    axis = {"height": 1, "width": 2, "channels": 3}[kind]
    wrong = list(x.shape)
    wrong[axis] = shape[axis - 1] + 1 + where % 3
    return rng.uniform(0.0, 255.0, wrong).astype(np.float32)


LABEL_KINDS = ("above", "negative", "float", "fractional", "long", "short", "2d", "nan", "string")


def bad_labels():
    """A recipe for labels that are not ``[N]`` integers in ``0..classes-1``."""
    return st.tuples(st.sampled_from(LABEL_KINDS), st.integers(0, 10**9))


def make_labels(recipe, n: int, classes: int, rng: np.random.Generator):
    kind, k = recipe
    y = rng.integers(0, classes, n)
    if kind == "above":
        y[k % n] = classes + k
        return y
    if kind == "negative":
        y[k % n] = -1 - k
        return y
    if kind == "float":
        return y.astype(np.float32)
    if kind == "fractional":
        return y + 0.5
    if kind == "long":
        return np.append(y, np.zeros(1 + k % 3, y.dtype))
    if kind == "short":
        return y[: -(1 + k % n)] if n > 1 else y[:0]
    if kind == "2d":
        return y[:, None]
    if kind == "nan":
        return np.full(n, np.nan)
    return y.astype(str)
