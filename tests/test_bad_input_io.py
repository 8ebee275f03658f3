"""Bad input by the thousand for everything around the attacks (see ``bad_input_cases``).

The statistics (Clopper-Pearson, Wilson, the paired intervals, McNemar, Chebyshev), the flags of
``evaluate.py`` and ``train.py`` (``config_from_flags``, ``parse_budget``, the presets), the data
loaders (a CIFAR-10 batch folder with a corrupted file, ``safe_pickle``), checkpoint loading and
the run store: each case breaks one or two arguments (or one file) of a valid call, and the call
must refuse it with the documented error, naming the argument (or the file, or the flag).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle

import numpy as np
import pytest
from absl import flags
from hypothesis import strategies as st

import bad_input_cases as bic
from manifold_tf import checkpoints, data, safe_pickle
from manifold_tf.cli import evaluate as evaluate_cli
from manifold_tf.cli import flags as config_flags
from manifold_tf.evaluation import config as cfg
from manifold_tf.evaluation import paired_intervals, presets, stats, store
from manifold_tf.evaluation.adaptive_config import parse_budget
from manifold_tf.training import TrainConfig


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    bic.report(request, "test_bad_input_io")


COUNT = bic.bad_int(0)
# For the vectorised intervals: arrays of any shape are counts, so lists are not wrong types.
ARRAY_COUNT = st.one_of(
    st.integers(max_value=-1),
    st.floats(-1e6, 1e6).filter(lambda v: not v.is_integer()),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.none(),
    st.text(max_size=3),
    st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
)
CONF = bic.bad_open_unit()


def case(params: dict, valid: dict):
    """One or two broken arguments of ``params`` (bad values drawn), the rest from ``valid``."""
    return st.lists(st.sampled_from(sorted(params)), min_size=1, max_size=2, unique=True).flatmap(
        lambda broken: st.fixed_dictionaries({b: params[b] for b in broken}).map(
            lambda bad: (broken, {**valid, **bad})
        )
    )


# ------------------------------------------------------------------------------------------------
# Statistics: entry point -> (function, bad values per argument, a valid call)

STATS = {
    "clopper_pearson": (
        stats.clopper_pearson,
        dict(k=COUNT, n=bic.bad_int(1), level=CONF),
        dict(k=3, n=10, level=0.95),
    ),
    "proportion": (
        stats.proportion,
        dict(k=COUNT, n=bic.bad_int(0), level=CONF),
        dict(k=3, n=10, level=0.95),
    ),
    "wilson": (
        stats.wilson,
        dict(k=COUNT, n=bic.bad_int(1), confidence=CONF),
        dict(k=3, n=10, confidence=0.95),
    ),
    "chebyshev_epsilon": (
        stats.chebyshev_epsilon,
        dict(t=bic.bad_int(1), alpha=CONF),
        dict(t=100, alpha=0.9),
    ),
    "mcnemar_exact": (
        stats.mcnemar_exact,
        dict(a_only=COUNT, b_only=COUNT),
        dict(a_only=2, b_only=5),
    ),
    "paired_difference_counts": (
        stats.paired_difference_counts,
        dict(
            a=COUNT,
            b=COUNT,
            c=COUNT,
            d=COUNT,
            method=bic.bad_choice(stats.PAIRED_METHODS),
            confidence=CONF,
        ),
        dict(a=5, b=2, c=1, d=4, method="tango", confidence=0.95),
    ),
    "interval_arrays": (
        paired_intervals.interval_arrays,
        dict(
            a=ARRAY_COUNT,
            b=ARRAY_COUNT,
            method=bic.bad_choice(stats.PAIRED_METHODS),
            confidence=CONF,
        ),
        dict(a=5, b=2, c=1, d=4, method="newcombe", confidence=0.95),
    ),
}


@pytest.mark.parametrize("profile", bic.SIZES)
@pytest.mark.parametrize("entry", sorted(STATS))
def test_stats_refuse_bad_counts(entry, profile):
    fn, params, valid = STATS[entry]

    def check(c):
        broken, kwargs = c
        bic.check_refused(lambda: fn(**kwargs), broken, what=entry)

    bic.run(entry, profile, case(params, valid), check)


def _outcomes(n, kind, where, longer=1):
    """Per-point robust flags that are not a 1-D bool/0-1 array of length ``n``."""
    rng = np.random.default_rng(where)
    ok = rng.random(n) < 0.5
    if kind == "long":
        return np.append(ok, [True] * longer)
    if kind == "2d":
        return ok[:, None]
    if kind == "twos":
        v = ok.astype(int)
        v[where % n] = 2 + where % 5
        return v
    if kind == "nan":
        v = ok.astype(float)
        v[where % n] = np.nan
        return v
    if kind == "fraction":
        return ok + 0.5
    return ok.astype(str)


@pytest.mark.parametrize("profile", bic.SIZES)
def test_paired_difference_refuses_bad_outcomes(profile):
    outcome = st.tuples(
        st.sampled_from(["long", "2d", "twos", "nan", "fraction", "string"]), st.integers(0, 10**6)
    )
    params = dict(
        shell_robust=outcome,
        base_robust=outcome,
        method=bic.bad_choice(stats.PAIRED_METHODS),
        confidence=CONF,
    )

    def check(c):
        broken, kwargs = c
        n = 2 + kwargs.pop("n")
        for longer, name in enumerate(("shell_robust", "base_robust"), 1):
            good = np.arange(n) % 2 == 0
            kwargs[name] = _outcomes(n, *kwargs[name], longer) if name in broken else good
        bic.check_refused(lambda: stats.paired_difference(**kwargs), broken, what="paired")

    valid = dict(shell_robust=None, base_robust=None, method="tango", confidence=0.95)
    strategy = st.tuples(case(params, valid), st.integers(0, 8)).map(
        lambda t: (t[0][0], {**t[0][1], "n": t[1]})
    )
    bic.run("paired_difference", profile, strategy, check)


# ------------------------------------------------------------------------------------------------
# Flags, budgets, presets


@pytest.mark.parametrize("profile", bic.SIZES)
def test_parse_budget_refuses_what_is_not_a_time(profile):
    unit = st.sampled_from(["", "s", "m", "h", " s", "S"])
    not_positive = st.builds(
        lambda v, u: f"{v}{u}", st.sampled_from(["0", "0.0", ".0", "00", "0e3"]), unit
    )
    signed = st.builds(lambda v, u: f"-{v}{u}", st.floats(0, 1e6).map(repr), unit)
    words = st.text(max_size=8).filter(lambda t: not any(ch.isdigit() for ch in t))
    odd = st.builds(
        lambda v, u: f"{v}{u}", st.sampled_from(["nan", "inf", "1e3", "1_0", "1..2"]), unit
    )
    strategy = st.one_of(not_positive, signed, words, odd, st.none(), st.floats(max_value=0))

    def check(text):
        bic.check_refused(lambda: parse_budget(text), ["budget"], errors=(ValueError,))

    bic.run("parse_budget", profile, strategy, check)


@pytest.mark.parametrize("profile", bic.SIZES)
def test_presets_refuse_unknown_names_and_settings(profile):
    sections = [f.name for f in dataclasses.fields(cfg.EvaluationConfig)]
    strategy = st.one_of(
        st.tuples(st.just("name"), st.text(max_size=10).filter(lambda t: t not in presets.PRESETS)),
        st.tuples(
            st.just("setting"),
            st.tuples(
                st.sampled_from(sections), st.text("abcdefgh_", min_size=1, max_size=10)
            ).filter(lambda t: t[1] not in _fields_of(t[0])),
        ),
        st.tuples(st.just("section"), st.tuples(st.sampled_from(sections), st.integers())),
    )

    def check(c):
        kind, value = c
        if kind == "name":
            bic.check_refused(lambda: presets.from_preset(value), ["preset"], errors=(ValueError,))
        elif kind == "setting":
            section, field = value
            if _is_section(section):  # named by its path, "threat.epsilonn"
                over, named = {section: {field: 1}}, f"{section}.{field}"
            else:
                over, named = {field: 1}, field
            bic.check_refused(
                lambda: presets.from_preset("default", over), [named], errors=(ValueError,)
            )
        else:
            section, number = value
            if not _is_section(section):
                section = "threat"
            bic.check_refused(
                lambda: presets.from_preset("default", {section: number}),
                [section],
                errors=(ValueError,),
            )

    bic.run("presets.from_preset", profile, strategy, check)


def _is_section(name):
    f = {f.name: f for f in dataclasses.fields(cfg.EvaluationConfig)}[name]
    return "section" in f.metadata


def _fields_of(name):
    f = {f.name: f for f in dataclasses.fields(cfg.EvaluationConfig)}[name]
    sub = f.metadata.get("section")
    return {g.name for g in dataclasses.fields(sub)} if sub else set()


_BAD_FLAG_TEXT = dict(
    float=st.one_of(
        st.sampled_from(["nan", "inf", "-inf", "abc", "", "1,2", "0x"]),
        st.text("abcxyz;!", min_size=1, max_size=4),
    ),
    integer=st.one_of(
        st.sampled_from(["abc", "1.5", "", "nan", "1e3", "--"]),
        st.floats(-1e6, 1e6).filter(lambda v: not v.is_integer()).map(repr),
    ),
    enum=st.text("abcdefghijklmnopqrstuvwxyz_", max_size=10),
    bool=st.sampled_from(["maybe", "2", "yes!", "ja", "on off", "-1"]),
)


def _settings_with_bad_text(cls, *, tree: bool):
    """``(flag, field name, bad text)`` for the float/int/enum/bool settings of ``cls``."""
    found = []
    rows = (
        [(s.flag, s.path[-1], config_flags._kind(s.owner, s.field)) for s in config_flags.walk(cls)]
        if tree
        else [
            (config_flags.flag_name(f, ""), f.name, config_flags._kind(cls, f))
            for f in config_flags.scalar_fields(cls)
        ]
    )
    for flag, name, kind in rows:
        if kind in _BAD_FLAG_TEXT:
            found.append((flag, name, kind))
    return found


def _bad_flag(rows):
    def draw(row):
        flag, name, kind = row
        text = _BAD_FLAG_TEXT[kind]
        if kind == "enum":
            text = text.filter(lambda t: t not in _choices(flag))
        return text.map(lambda t: (flag, name, t))

    return st.sampled_from(rows).flatmap(draw)


_ENUM_CHOICES: dict = {}


def _choices(flag):
    return _ENUM_CHOICES.get(flag, ())


@pytest.fixture(scope="module")
def evaluate_flags():
    fv = flags.FlagValues()
    evaluate_cli.define_flags(fv)
    for name in fv:
        if isinstance(fv[name], flags.EnumFlag) or hasattr(fv[name].parser, "enum_values"):
            _ENUM_CHOICES[name] = tuple(getattr(fv[name].parser, "enum_values", ()))
    return fv


@pytest.fixture(scope="module")
def train_flags():
    fv = flags.FlagValues()
    config_flags.define(TrainConfig, flag_values=fv)
    for name in fv:
        if hasattr(fv[name].parser, "enum_values"):
            _ENUM_CHOICES[name] = tuple(fv[name].parser.enum_values)
    return fv


def _parse_and_build(fv, argv, build):
    fv.unparse_flags()
    fv(["prog", *argv])
    return build(fv)


def _refuses_flags(fv, rows, extra, build, entry, profile):
    """Cases of one or two bad ``--flag=text``: refused by absl (naming the flag) or by the
    config's checks (a ValueError naming the flag or its setting)."""
    strategy = st.lists(_bad_flag(rows), min_size=1, max_size=2, unique_by=lambda r: r[0])

    def check(bad):
        argv = [f"--{flag}={text}" for flag, _, text in bad] + extra
        broken = [flag for flag, _, _ in bad] + [name for _, name, _ in bad]
        bic.check_refused(
            lambda: _parse_and_build(fv, argv, build),
            broken,
            errors=(ValueError, flags.Error),
            what=f"{entry} {argv}",
        )

    bic.run(entry, profile, strategy, check)


@pytest.mark.parametrize("profile", bic.SIZES)
def test_evaluate_flags_refuse_bad_text(profile, evaluate_flags):
    rows = [r for r in _settings_with_bad_text(cfg.EvaluationConfig, tree=True) if r[0] != "shell"]
    _refuses_flags(
        evaluate_flags,
        rows,
        ["--shell=mcn"],  # the defence mode, where every section's checks run
        lambda fv: evaluate_cli.config_from_flags(fv),
        "evaluate.config_from_flags",
        profile,
    )


@pytest.mark.parametrize("profile", bic.SIZES)
def test_train_flags_refuse_bad_text(profile, train_flags):
    def build(fv):
        config = config_flags.build(TrainConfig, flag_values=fv)
        config.validate()
        return config

    rows = _settings_with_bad_text(TrainConfig, tree=False)
    _refuses_flags(train_flags, rows, [], build, "train flags (TrainConfig)", profile)


# ------------------------------------------------------------------------------------------------
# Data: a CIFAR-10 batch folder with one corrupted file; safe_pickle on corrupted bytes

N_IMAGES = 4


def _batch_bytes(rng, protocol=2) -> bytes:
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in rng.integers(0, 10, N_IMAGES)],
        b"data": rng.integers(0, 256, (N_IMAGES, 3072), dtype=np.uint8),
    }
    return pickle.dumps(batch, protocol=protocol)


class _Crafted:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but a global a batch never names


def _corrupt(kind: str, where: int, value: int, protocol: int) -> bytes:
    """A batch file that is not an original: truncated, a crafted global, wrong content ..."""
    rng = np.random.default_rng(where)
    good = _batch_bytes(rng, protocol)
    labels = [int(v) for v in rng.integers(0, 10, N_IMAGES)]
    pixels = rng.integers(0, 256, (N_IMAGES, 3072), dtype=np.uint8)
    if kind == "truncated":
        return good[: where % len(good)]
    if kind == "garbage":
        return rng.integers(0, 256, 1 + where % 200, dtype=np.uint8).tobytes()
    if kind == "crafted":
        return pickle.dumps({b"data": _Crafted(), b"labels": labels}, protocol=protocol)
    if kind == "not_a_dict":
        return pickle.dumps([pixels, labels], protocol=protocol)
    if kind == "missing_key":
        return pickle.dumps({b"data": pixels}, protocol=protocol)
    if kind == "labels_out_of_range":
        labels[where % N_IMAGES] = 10 + value
        return pickle.dumps({b"data": pixels, b"labels": labels}, protocol=protocol)
    if kind == "labels_negative":
        labels[where % N_IMAGES] = -1 - value
        return pickle.dumps({b"data": pixels, b"labels": labels}, protocol=protocol)
    if kind == "pixels_float":
        return pickle.dumps(
            {b"data": pixels.astype(np.float32) + 0.5, b"labels": labels}, protocol=protocol
        )
    if kind == "pixels_wide":
        return pickle.dumps(
            {b"data": pixels.astype(np.int32) + 256, b"labels": labels}, protocol=protocol
        )
    if kind == "wrong_row":
        return pickle.dumps(
            {b"data": pixels[:, : 1 + where % 3071], b"labels": labels}, protocol=protocol
        )
    if kind == "label_count":
        return pickle.dumps({b"data": pixels, b"labels": labels[:-1]}, protocol=protocol)
    raise AssertionError(kind)


CORRUPTIONS = (
    "truncated",
    "garbage",
    "crafted",
    "not_a_dict",
    "missing_key",
    "labels_out_of_range",
    "labels_negative",
    "pixels_float",
    "pixels_wide",
    "wrong_row",
    "label_count",
)
CORRUPT = st.tuples(
    st.sampled_from(CORRUPTIONS),
    st.integers(1, 10**6),
    st.integers(0, 10**6),
    st.sampled_from([2, 4, 5]),
)


@pytest.mark.parametrize("profile", bic.SIZES)
def test_cifar_folder_refuses_corrupt_batches(profile, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    path = folder / "test_batch"

    def check(c):
        kind, where, value, protocol = c
        blob = _corrupt(kind, where, value, protocol)
        if kind == "truncated" and not blob:
            blob = b"\x80"
        path.write_bytes(blob)
        bic.check_refused(
            lambda: data.load_cifar10_arrays("test", str(folder)),
            [str(path)],
            errors=(ValueError,),
            what=kind,
        )

    bic.run("data.load_cifar10_arrays (file)", profile, CORRUPT, check)


@pytest.mark.parametrize("profile", bic.SIZES)
def test_cifar_loader_refuses_bad_arguments(profile, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar_ok")
    (folder / "test_batch").write_bytes(_batch_bytes(np.random.default_rng(0)))
    missing = str(folder / "nowhere")
    strategy = st.one_of(
        st.tuples(
            st.just("split"), st.one_of(st.text(max_size=6), st.none(), st.integers())
        ).filter(lambda t: t[1] not in data.SPLITS),
        st.tuples(
            st.just("data_dir"),
            st.one_of(st.integers(), st.floats(), st.lists(st.integers(), max_size=2)),
        ),
        st.tuples(st.just("missing"), st.text("abc/", max_size=6)),
    )

    def check(c):
        kind, value = c
        if kind == "split":
            call, names, errors = (
                lambda: data.load_cifar10_arrays(value, str(folder)),
                ["split"],
                (ValueError,),
            )
        elif kind == "data_dir":
            call, names, errors = (
                lambda: data.load_cifar10_arrays("test", value),
                ["data_dir"],
                (ValueError, TypeError),
            )
        else:
            where = os.path.join(missing, value)
            call, names, errors = (
                lambda: data.load_cifar10_arrays("test", where),
                [repr(where)[1:-1]],
                (FileNotFoundError,),
            )
        bic.check_refused(call, names, errors=errors, what=f"{kind}={value!r}")

    bic.run("data.load_cifar10_arrays (arguments)", profile, strategy, check)


@pytest.mark.parametrize("profile", bic.SIZES)
def test_safe_pickle_refuses_corrupt_bytes(profile):
    def check(c):
        kind, where, value, protocol = c
        blob = _corrupt(kind, where, value, protocol)
        name = f"<case {where}>"
        if kind in ("truncated", "garbage", "crafted"):
            # The rest are well-formed pickles of the wrong content: data.py's checks, not these.
            bic.check_refused(
                lambda: safe_pickle.loads(blob, path=name), [name], errors=(ValueError,), what=kind
            )
        else:
            assert safe_pickle.loads(blob, path=name) is not None

    strategy = CORRUPT.filter(lambda c: c[0] in ("truncated", "garbage", "crafted"))
    bic.run("safe_pickle.loads", profile, strategy, check)


# ------------------------------------------------------------------------------------------------
# Checkpoints and the run store


@pytest.mark.parametrize("profile", bic.SIZES)
def test_checkpoint_loading_refuses_corrupt_files(profile, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    kinds = st.sampled_from(["keras_bytes", "h5_bytes", "tf1_index", "suffix", "width"])
    strategy = st.tuples(kinds, st.integers(0, 10**6), st.text("abcxyz", max_size=6))

    def check(c):
        kind, where, text = c
        rng = np.random.default_rng(where)
        blob = rng.integers(0, 256, where % 300, dtype=np.uint8).tobytes()
        if kind == "keras_bytes":
            path = folder / f"m{where % 7}.keras"
            path.write_bytes(blob)
            call, names = (lambda: checkpoints.load_model_weights(str(path))), [repr(str(path))]
        elif kind == "h5_bytes":
            path = folder / f"m{where % 7}.weights.h5"
            path.write_bytes(blob)
            call, names = (lambda: checkpoints.load_model_weights(str(path))), [repr(str(path))]
        elif kind == "tf1_index":
            prefix = folder / f"model.ckpt-{where % 7}"
            (folder / f"{prefix.name}.index").write_bytes(blob)
            call, names = (lambda: checkpoints.load_model_weights(str(prefix))), [str(prefix)]
        elif kind == "suffix":
            path = folder / f"m{where % 7}.{text or 'bin'}"
            path.write_bytes(blob)
            call, names = (lambda: checkpoints.load_model_weights(str(path))), [repr(str(path))]
        else:
            call, names = (lambda: checkpoints.load_model_weights("x.keras", width=text)), ["width"]
        bic.check_refused(call, names, errors=(ValueError,), what=kind)

    bic.run("checkpoints.load_model_weights", profile, strategy, check)


@pytest.mark.parametrize("profile", bic.SIZES)
def test_run_store_refuses_corrupt_records(profile, tmp_path_factory):
    run = store.RunStore(str(tmp_path_factory.mktemp("run") / "r"))
    run.save("defence", 0, {"n": 1}, {"adv": np.zeros(3, np.float32)})
    record, array = run._batch("defence", 0), run._batch("defence", 0, "_adv.npy")
    good_record = open(record, "rb").read()
    good_array = open(array, "rb").read()
    strategy = st.tuples(
        st.sampled_from(["record", "array"]), st.integers(0, 10**6), st.integers(0, 255)
    )

    def check(c):
        which, where, value = c
        good, path = (good_record, record) if which == "record" else (good_array, array)
        cut = where % len(good.rstrip())  # cutting the final newline alone breaks nothing
        # A record may also get stray bytes; an array only loses its end (bytes added after the
        # header would shift the values unseen: .npy has no checksum).
        spliced = which == "record" and where % 2
        blob = good[:cut] + bytes([value]) + b"\xff{" + good[cut:] if spliced else good[:cut]
        with open(path, "wb") as f:
            f.write(blob)
        call = (
            (lambda: run.load("defence", 0))
            if which == "record"
            else (lambda: run.load_array("defence", 0, "adv"))
        )
        try:
            bic.check_refused(call, [path], errors=(ValueError,), what=f"{which} {blob[:40]!r}")
        finally:
            with open(path, "wb") as f:
                f.write(good)

    bic.run("RunStore.load / load_array", profile, strategy, check)
    run.close()
