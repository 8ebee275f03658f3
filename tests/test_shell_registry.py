"""What the evaluation asks of a shell (cost, decision rule, radius, randomness, layout) and the
registry of shells by kind (``register``, ``SHELLS``, ``build``).

Tiny shapes: 8x8x3 images (pixels 0..255), 3 classes, a linear base, a few search steps.
"""

from __future__ import annotations

import types
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import assert_config_round_trip, uniform_images
from manifold_tf import projected, shells
from manifold_tf.shells import (
    SHELLS,
    CarliniWagnerShell,
    FactorShell,
    MCNShell,
    NCNShell,
    Scores,
    answer,
    build,
    cw_shell,
    register,
    registry,
)

SHAPE = (8, 8, 3)
C = 3


def tiny_base() -> keras.Model:
    init = keras.initializers.RandomNormal(0.0, 0.01, seed=4)
    return keras.Sequential(
        [keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(C, kernel_initializer=init)]
    )


@pytest.fixture(scope="module")
def base():
    return tiny_base()


def make(kind: str, base, **overrides) -> FactorShell:
    """One small shell of each kind (and the cw shell's two variants)."""
    if kind == "mcn":
        return MCNShell(base, 5.0, **{"steps": 4, "jit_compile": False, **overrides})
    if kind == "mcn_random":
        return MCNShell(
            base,
            5.0,
            **{"steps": 2, "random_start": True, "seed": 3, "jit_compile": False, **overrides},
        )
    if kind == "ncn":
        return NCNShell(
            base,
            0.6,
            **{"delta_max": 7.0, "steps": 2, "rounds": 3, "jit_compile": False, **overrides},
        )
    variant = "all_labels" if kind == "cw" else "paper_code"
    return CarliniWagnerShell(
        base,
        **{
            "variant": variant,
            "delta": 6.0,
            "max_iterations": 5,
            "jit_compile": False,
            **overrides,
        },
    )


KINDS = ["mcn", "mcn_random", "ncn", "cw", "cw_paper"]


def probed_passes(shell) -> int:
    """evaluation/adaptive.py's attribute probing before issue 16 (the numbers must not change)."""
    c = int(shell.num_classes)
    if hasattr(shell, "rounds"):
        return c * int(shell.steps) * int(shell.rounds)
    if hasattr(shell, "max_iterations"):
        return c * 2 * int(shell.max_iterations)
    return c * int(shell.steps)


def reference_scores(shell, out: dict) -> Scores:
    """attacks/bpda.shell_scores before issue 16 (``shell.scores`` must give the same arrays)."""
    met_key = 1e12
    lo = out["log_odds"].numpy().astype(np.float64)
    m, s = lo.shape
    label = np.broadcast_to(np.arange(s, dtype=np.int32), (m, s))
    key, met, dist, logit_p = lo, None, None, None
    if getattr(shell, "variant", None) == "paper_code" and "candidate_labels" in out:
        label = out["candidate_labels"].numpy().astype(np.int32)
    elif "met" in out and "distances" in out:
        met = out["met"].numpy().astype(bool)
        dist = out["distances"].numpy().astype(np.float64)
        key = np.where(met, met_key - dist, np.clip(lo, -met_key / 2, met_key / 2))
        logit_p = float(np.log(shell.p) - np.log1p(-shell.p))
    return Scores(label, key, lo, met, dist, logit_p, answer(out).astype(np.int32))


# ------------------------------------------------------------------------------------------------
# What the evaluation asks of a shell


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("mcn", C * 4),
        ("mcn_random", C * 2),
        ("ncn", C * 2 * 3),
        ("cw", C * 2 * 5),
        ("cw_paper", C * 2 * 5),
    ],
)
def test_passes_per_prediction(base, kind, expected):
    shell = make(kind, base)
    assert shell.passes_per_prediction() == expected == probed_passes(shell)
    assert shell.rows_per_image == C


@pytest.mark.parametrize(
    "kind, expected",
    [("mcn", 5.0), ("ncn", 7.0), ("cw", 6.0), ("cw_paper", cw_shell.PAPER_CODE_TAU)],
)
def test_search_radius_is_the_ball_searched(base, kind, expected):
    radius = make(kind, base).search_radius
    assert isinstance(radius, float) and radius == expected


@pytest.mark.parametrize("kind", KINDS)
def test_scores_match_the_rule_bpda_used(base, kind):
    shell = make(kind, base)
    x = uniform_images(4, SHAPE, seed=1)
    out = shell.embed(x)
    got, expected = shell.scores(out), reference_scores(shell, out)
    assert isinstance(got, Scores)
    for field in Scores._fields:
        a, b = getattr(got, field), getattr(expected, field)
        if b is None or isinstance(b, float):
            assert a == b, field
        else:
            assert a.dtype == b.dtype and a.shape == b.shape, field
            np.testing.assert_array_equal(a, b, err_msg=field)
    np.testing.assert_array_equal(got.pick, shell.predict(x, verbose=0).argmax(1))
    # Numpy arrays (e.g. a dict masked row by row) give the same scores as tensors.
    as_numpy = shell.scores({k: np.asarray(v) for k, v in out.items()})
    np.testing.assert_array_equal(as_numpy.key, got.key)


def test_ncn_scores_rank_met_labels_by_distance_above_unmet_ones(base):
    shell = make("ncn", base)
    out = dict(
        log_odds=tf.constant([[50.0, -1.0, 0.5]]),
        met=tf.constant([[False, True, True]]),
        distances=tf.constant([[0.0, 3.0, 2.0]]),
        probabilities=tf.constant([[0, 0, 1.0]]),
    )
    sc = shell.scores(out)
    assert sc.key.argmax(1).tolist() == [2]  # met and nearest, though label 0 is most confident
    assert sc.logit_p == pytest.approx(np.log(0.6 / 0.4))


def test_only_a_random_start_mcn_is_random_and_with_seed_redraws_it(base):
    x = uniform_images(2, SHAPE, seed=2)
    shell = make("mcn_random", base)
    assert shell.is_random
    copy = shell.with_seed(11)
    assert type(copy) is MCNShell and copy.seed == 11 and copy.base is shell.base
    drop = ("name", "seed")
    assert {k: v for k, v in copy.get_config().items() if k not in drop} == {
        k: v for k, v in shell.get_config().items() if k not in drop
    }
    assert not np.array_equal(copy.embed(x)["z"].numpy(), shell.embed(x)["z"].numpy())
    np.testing.assert_array_equal(
        shell.with_seed(11).embed(x)["z"].numpy(), copy.embed(x)["z"].numpy()
    )  # the seed decides the draw
    for kind in ("mcn", "ncn", "cw", "cw_paper"):
        deterministic = make(kind, base)
        assert not deterministic.is_random
        assert deterministic.with_seed(11) is deterministic  # nothing to redraw
    with pytest.raises(ValueError, match="seed must be an integer.*1.5"):
        shell.with_seed(1.5)
    with pytest.raises(ValueError, match="seed must be an integer.*True"):
        make("ncn", base).with_seed(True)


@pytest.mark.parametrize("kind", KINDS)
def test_get_config_chains_to_the_factor_shell_and_round_trips(base, kind):
    shell = make(kind, base)
    config = shell.get_config()
    # A shipped shell declares only its own keywords; the base class writes the config.
    assert type(shell).get_config is FactorShell.get_config
    common = {"name", "trainable", "base", "jit_compile"}
    assert set(config) == common | set(shell._shell_config())
    assert {k: config[k] for k in shell._shell_config()} == shell._shell_config()
    clone = assert_config_round_trip(shell)
    x = uniform_images(2, SHAPE, seed=0)
    if not shell.is_random:  # a random start draws per batch layout, the same for the clone
        np.testing.assert_allclose(clone(x).numpy(), shell(x).numpy(), atol=1e-6)


def test_settings_for_reports_are_unchanged(base):
    shell = make("mcn", base)
    assert shell.settings() == dict(
        shell="mcn",
        delta=5.0,
        optimizer="sign",
        steps=4,
        step_size=projected.madry_step_size(5.0, 4),
        random_start=False,
        seed=0,
        jit_compile=False,
    )
    assert make("ncn", base).settings() == dict(
        shell="ncn",
        p=0.6,
        delta_max=7.0,
        steps=2,
        rounds=3,
        alpha=1.0,
        alpha_factor=10.0,
        learning_rate=0.05,
        jit_compile=False,
    )
    assert make("cw", base).settings() == dict(
        shell="cw",
        variant="all_labels",
        max_iterations=5,
        learning_rate=5e-3,
        delta=6.0,
        const=0.1,
        jit_compile=False,
    )
    assert make("cw_paper", base).settings() == dict(
        shell="cw",
        variant="paper_code",
        max_iterations=5,
        learning_rate=5e-3,
        tau=cw_shell.PAPER_CODE_TAU,
        **cw_shell.PAPER_CODE_CONSTS,
        jit_compile=False,
    )


def test_mcn_optimizer_pgd_is_a_deprecated_alias_of_sign(base):
    with pytest.warns(DeprecationWarning, match="'pgd' is deprecated.*'sign'"):
        old = make("mcn", base, optimizer="pgd")
    assert old.optimizer_name == "sign" and old.get_config()["optimizer"] == "sign"
    assert old.settings()["optimizer"] == "sign"
    assert shells.mcn.OPTIMIZERS == projected.OPTIMIZERS == ("sign", "adam")
    # A config saved before the rename loads, and searches as "sign" does.
    saved = {**make("mcn", base).get_config(), "optimizer": "pgd"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = MCNShell.from_config(saved)
    x = uniform_images(2, SHAPE, seed=3)
    np.testing.assert_array_equal(
        loaded.embed(x)["z"].numpy(), make("mcn", base).embed(x)["z"].numpy()
    )
    assert make("mcn", base, steps=0).step_size == projected.madry_step_size(5.0, 1)


def test_the_strategy_a_shell_runs_under_is_public(base):
    # evaluation/defence.py asks which strategy a shell was built under: Keras' public property.
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        inside = make("mcn", base)
    assert inside.distribute_strategy is strategy
    assert make("mcn", base).distribute_strategy is tf.distribute.get_strategy()


# ------------------------------------------------------------------------------------------------
# The registry


def shell_settings(**overrides) -> types.SimpleNamespace:
    """The fields ``from_settings`` reads (the evaluation's ShellConfig has them all)."""
    fields = dict(
        steps=3,
        step_size=None,
        optimizer="sign",
        random_start=True,
        ncn_delta_max=6.0,
        ncn_rounds=2,
        ncn_alpha=1.0,
        ncn_alpha_factor=10.0,
        ncn_learning_rate=0.05,
        cw_variant="all_labels",
        cw_const=0.2,
        cw_max_iterations=4,
        jit_compile=None,
    )
    return types.SimpleNamespace(**{**fields, **overrides})


def without_name(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "name"}


def test_the_built_in_kinds_are_registered():
    assert shells.SHELLS is registry.SHELLS
    assert {SHELLS[k] for k in ("mcn", "ncn", "cw")} == {MCNShell, NCNShell, CarliniWagnerShell}
    assert (MCNShell.kind, NCNShell.kind, CarliniWagnerShell.kind) == ("mcn", "ncn", "cw")


@pytest.mark.parametrize("jit", [None, True])
def test_build_equals_direct_construction(base, jit):
    s = shell_settings(jit_compile=jit)
    jit_kw = {} if jit is None else dict(jit_compile=True)
    direct = {
        "mcn": MCNShell(
            base,
            4.0,
            optimizer="sign",
            steps=3,
            step_size=None,
            random_start=True,
            seed=9,
            **jit_kw,
        ),
        "ncn": NCNShell(
            base,
            0.7,
            delta_max=6.0,
            steps=3,
            rounds=2,
            alpha=1.0,
            alpha_factor=10.0,
            learning_rate=0.05,
            **jit_kw,
        ),
        "cw": CarliniWagnerShell(
            base, variant="all_labels", delta=4.0, const=0.2, max_iterations=4, **jit_kw
        ),
    }
    for kind, expected in direct.items():
        built = build(kind, base, s, delta=4.0, p=0.7, seed=9)
        assert type(built) is type(expected) and built.kind == kind and built.base is base
        assert without_name(built.get_config()) == without_name(expected.get_config())
        assert built.jit_compile == (shells.DEFAULT_JIT_COMPILE if jit is None else True)


def test_unknown_kind_names_it_and_lists_the_known_ones(base):
    with pytest.raises(ValueError, match=r"unknown shell kind 'mnc'.*'cw'.*'mcn'.*'ncn'"):
        build("mnc", base, shell_settings(), delta=4.0, p=0.7)


@register("test_identity")
class IdentityShell(FactorShell):
    """A new defence in one class: the base's answer at ``x`` (a search of radius 0)."""

    @classmethod
    def from_settings(cls, base, settings, *, delta, p, seed=0):
        return cls(base, **shells.base.jit_kwargs(settings))

    def _embed_graph(self, x):
        xt, labels = self._tile(x)
        score = self._per_label(shells.log_odds(self._logits(xt), labels))
        label = tf.argmax(score, axis=1, output_type=tf.int32)
        z = self._per_label(xt)
        return dict(z=z, label=label, log_odds=score, probabilities=self._output(z, label))

    def passes_per_prediction(self) -> int:
        return 0

    @property
    def search_radius(self) -> float:
        return 0.0


def test_a_shell_registered_in_one_module_is_built_by_kind(base):
    assert SHELLS["test_identity"] is IdentityShell and IdentityShell.kind == "test_identity"
    shell = build("test_identity", base, shell_settings(), delta=4.0, p=0.7)
    assert type(shell) is IdentityShell and shell.jit_compile is shells.DEFAULT_JIT_COMPILE
    x = uniform_images(3, SHAPE, seed=5)
    expected = base(x).numpy().argmax(1)
    np.testing.assert_array_equal(shell.predict(x, verbose=0).argmax(1), expected)
    sc = shell.scores(shell.embed(x))  # the default rule: slot t is label t, ranked by log-odds
    np.testing.assert_array_equal(sc.pick, expected)
    np.testing.assert_array_equal(sc.key.argmax(1), expected)
    assert not shell.is_random and shell.with_seed(2) is shell and shell.rows_per_image == C
    assert shell.passes_per_prediction() == 0 and shell.search_radius == 0.0


def test_register_refuses_what_it_cannot_record():
    with pytest.raises(ValueError, match="non-empty string"):
        register("")
    with pytest.raises(ValueError, match="FactorShell subclasses.*dict"):
        register("not_a_shell")(dict)
    with pytest.raises(ValueError, match="'mcn' is already registered.*MCNShell"):
        register("mcn")(IdentityShell)
    assert SHELLS["mcn"] is MCNShell and IdentityShell.kind == "test_identity"


def test_a_shell_without_the_evaluation_methods_says_what_to_define(base):
    class Bare(FactorShell):
        pass

    with pytest.raises(NotImplementedError, match="Bare does not implement from_settings"):
        Bare.from_settings(base, shell_settings(), delta=1.0, p=0.5)
    bare = Bare(base)
    with pytest.raises(NotImplementedError, match="Bare does not implement passes_per_prediction"):
        bare.passes_per_prediction()
    with pytest.raises(NotImplementedError, match="Bare does not implement search_radius"):
        bare.search_radius  # noqa: B018
