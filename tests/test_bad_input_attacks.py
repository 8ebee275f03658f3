"""Bad input by the thousand for the attacks and the shells (see ``bad_input_cases``).

Every public attack (``manifold_tf.attacks``: on base models and on shells), every shell's
constructor, ``call``, ``predict`` and ``embed``: each case breaks one or two arguments of a valid
call, and the call must refuse it with a ValueError / TypeError naming one of them, before any
attack step runs. The base is a tiny conv net (8x8x3 images, 4 classes) and each shell is built
once for the module.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import strategies as st

import bad_input_cases as bic
from helpers import small_conv
from manifold_tf import attacks, shells
from manifold_tf.shells import cw_shell, mcn

SHAPE = (8, 8, 3)
CLASSES = 4


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    bic.report(request, "test_bad_input_attacks")


@pytest.fixture(scope="module")
def ctx():
    base = small_conv(seed=0, classes=CLASSES, shape=SHAPE)
    softmax = keras.Sequential([base, keras.layers.Softmax()])
    one_logit = keras.Sequential(
        [keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    built = dict(
        mcn=shells.MCNShell(base, delta=4.0, steps=1),
        ncn=shells.NCNShell(base, p=0.9, steps=1, rounds=1),
        cw=shells.CarliniWagnerShell(base, delta=4.0, max_iterations=1),
        hedge=shells.HedgeShell(base, delta=4.0, steps=1),
        anti_adversary=shells.AntiAdversaryShell(base, steps=1, step_size=1.0),
    )
    # Models that are not logit classifiers, for the "model" argument.
    models = dict(none=None, text="resnet", softmax=softmax, one_logit=one_logit, number=3)
    return dict(base=base, shells=built, models=models)


def bad_model():
    return st.sampled_from(["none", "text", "softmax", "one_logit", "number"])


# ------------------------------------------------------------------------------------------------
# The entry points: how to call each, and how each argument can be broken.

RADIUS, STEPS0, STEPS1 = bic.bad_radius(), bic.bad_int(0), bic.bad_int(1)
NOT_NONE = RADIUS.filter(lambda v: v is not None)  # for radii whose None means "the default"
# attack -> (call(model, x, y, **kw), the model it attacks, {argument: (bad values, valid value)})
BASE = "base"
SHELL = "mcn"
_COMMON = dict(x=(bic.bad_images(), None), y=(bic.bad_labels(), None), epsilon=(RADIUS, 4.0))
ATTACKS = {
    "pgd": (
        lambda m, x, y, restarts, loss, **kw: attacks.pgd(
            m, x, y, settings=attacks.PGDSettings(restarts=restarts, loss=loss), **kw
        ),
        BASE,
        dict(
            _COMMON,
            steps=(STEPS0, 1),
            step_size=(RADIUS, 1.0),
            restarts=(STEPS1, 1),
            loss=(bic.bad_choice(attacks.LOSSES), "xent"),
            model=(bad_model(), None),
        ),
    ),
    "apgd_ce": (
        lambda m, x, y, steps, restarts, **kw: attacks.apgd_ce(
            m, x, y, settings=attacks.APGDSettings(steps=steps, restarts=restarts), **kw
        ),
        BASE,
        dict(_COMMON, steps=(STEPS0, 1), restarts=(STEPS1, 1), model=(bad_model(), None)),
    ),
    "apgd_dlr": (
        lambda m, x, y, steps, restarts, **kw: attacks.apgd_dlr(
            m, x, y, settings=attacks.APGDSettings(steps=steps, restarts=restarts), **kw
        ),
        BASE,
        dict(_COMMON, steps=(STEPS0, 1), restarts=(STEPS1, 1), model=(bad_model(), None)),
    ),
    "apgd_t": (
        lambda m, x, y, steps, num_targets, **kw: attacks.apgd_t(
            m, x, y, settings=attacks.APGDSettings(steps=steps, num_targets=num_targets), **kw
        ),
        BASE,
        dict(_COMMON, steps=(STEPS0, 1), num_targets=(STEPS1, 1), model=(bad_model(), None)),
    ),
    "fab": (
        lambda m, x, y, steps, restarts, **kw: attacks.fab(
            m, x, y, settings=attacks.FABSettings(steps=steps, restarts=restarts), **kw
        ),
        BASE,
        dict(_COMMON, steps=(STEPS0, 1), restarts=(STEPS1, 1), model=(bad_model(), None)),
    ),
    "fab_t": (
        lambda m, x, y, steps, num_targets, **kw: attacks.fab_t(
            m, x, y, settings=attacks.FABSettings(steps=steps, num_targets=num_targets), **kw
        ),
        BASE,
        dict(_COMMON, steps=(STEPS0, 1), num_targets=(STEPS1, 1), model=(bad_model(), None)),
    ),
    "high_confidence": (
        lambda m, x, y, **kw: attacks.high_confidence(m, x, y, **kw),
        BASE,
        dict(_COMMON, steps=(STEPS0, 1), step_size=(RADIUS, 1.0), model=(bad_model(), None)),
    ),
    "cw_linf": (
        lambda m, x, y, max_iterations, **kw: attacks.cw_linf(
            m,
            x,
            y,
            settings=attacks.CWSettings(max_iterations=max_iterations, max_total_iterations=4),
            **kw,
        ),
        BASE,
        dict(_COMMON, max_iterations=(STEPS1, 1), model=(bad_model(), None)),
    ),
    "square": (
        lambda m, x, y, queries, p_init, **kw: attacks.square(
            m, x, y, settings=attacks.SquareSettings(queries=queries, p_init=p_init), **kw
        ),
        BASE,
        dict(
            _COMMON,
            queries=(STEPS1, 2),
            p_init=(bic.bad_open_unit().filter(lambda v: v != 1.0), 0.5),
            seed=(bic.bad_int(0), 0),
            model=(st.sampled_from(["none", "text", "number"]), None),
        ),
    ),
    "square_on_shell": (
        lambda m, x, y, queries, **kw: attacks.square(
            m,
            x,
            y,
            settings=attacks.SquareSettings(queries=queries, output="probabilities"),
            **kw,
        ),
        SHELL,
        dict(_COMMON, queries=(STEPS1, 2)),
    ),
    "bpda": (
        lambda m, x, y, steps, **kw: attacks.bpda(
            m, x, y, settings=attacks.BPDASettings(steps=steps), **kw
        ),
        SHELL,
        dict(_COMMON, steps=(STEPS0, 1), shell=(bad_model(), None)),
    ),
    "bpda_restarts": (
        lambda m, x, y, steps, **kw: attacks.bpda_restarts(
            m, x, y, settings=attacks.BPDASettings(steps=steps, schedule="apgd"), **kw
        ),
        SHELL,
        dict(_COMMON, steps=(STEPS0, 1), shell=(bad_model(), None)),
    ),
    "bpda_targeted": (
        lambda m, x, y, steps, num_targets, **kw: attacks.bpda_targeted(
            m,
            x,
            y,
            settings=attacks.BPDASettings(steps=steps, schedule="apgd", num_targets=num_targets),
            **kw,
        ),
        SHELL,
        dict(_COMMON, steps=(STEPS0, 1), num_targets=(STEPS1, 1), shell=(bad_model(), None)),
    ),
    "lift": (
        lambda m, x, y, steps, num_targets, delta, **kw: attacks.lift(
            m,
            x,
            y,
            settings=attacks.LiftSettings(steps=steps, num_targets=num_targets, delta=delta),
            **kw,
        ),
        SHELL,
        dict(
            _COMMON,
            steps=(STEPS0, 1),
            num_targets=(STEPS1, 1),
            delta=(NOT_NONE, 2.0),  # None: the shell's delta
            shell=(bad_model(), None),
        ),
    ),
}


def case(params: dict):
    """A batch size, a seed, and one or two broken arguments with their bad values."""
    names = sorted(params)
    return st.fixed_dictionaries(
        dict(
            n=st.integers(1, 3),
            seed=st.integers(0, 2**32 - 1),
            broken=st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True),
        )
    ).flatmap(
        lambda c: st.fixed_dictionaries({b: params[b][0] for b in c["broken"]}).map(
            lambda bad: dict(c, bad=bad)
        )
    )


def _materialise(ctx, c, name, value, classes=CLASSES):
    rng = np.random.default_rng([c["seed"], len(name)])
    if name == "x":
        return bic.make_images(value, c["n"], SHAPE, rng)
    if name == "y":
        return bic.make_labels(value, c["n"], classes, rng)
    if name in ("model", "shell"):
        return ctx["models"][value]
    return value


@pytest.mark.parametrize("profile", bic.SIZES)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_refuses_bad_input(attack, profile, ctx):
    call, target, params = ATTACKS[attack]

    def check(c):
        rng = np.random.default_rng(c["seed"])
        args = dict(
            x=rng.uniform(0.0, 255.0, (c["n"], *SHAPE)).astype(np.float32),
            y=rng.integers(0, CLASSES, c["n"]),
        )
        args.update({k: v for k, (_, v) in params.items() if v is not None})
        args["model"] = ctx["base"] if target == BASE else ctx["shells"][target]
        for name, value in c["bad"].items():
            args[name if name != "shell" else "model"] = _materialise(ctx, c, name, value)
        model, x, y = args.pop("model"), args.pop("x"), args.pop("y")
        bic.check_refused(lambda: call(model, x, y, **args), c["broken"], what=attack)

    bic.run(attack, profile, case(params), check)


# ------------------------------------------------------------------------------------------------
# Shells: constructors, call, predict, embed

CONSTRUCTORS = {
    "mcn": (
        shells.MCNShell,
        dict(
            delta=(RADIUS, 4.0),
            optimizer=(bic.bad_choice(mcn.OPTIMIZERS + tuple(mcn.DEPRECATED_OPTIMIZERS)), "sign"),
            steps=(STEPS0, 1),
            step_size=(NOT_NONE, 1.0),  # None: Madry's step for delta and steps
            seed=(bic.bad_seed(), 0),
            base=(bad_model(), None),
        ),
    ),
    "ncn": (
        shells.NCNShell,
        dict(
            p=(bic.bad_open_unit(), 0.9),
            delta_max=(RADIUS, 8.0),
            steps=(STEPS0, 1),
            rounds=(STEPS1, 1),
            alpha=(bic.bad_positive(), 1.0),
            alpha_factor=(bic.bad_positive(), 10.0),
            learning_rate=(bic.bad_positive(), 0.05),
            base=(bad_model(), None),
        ),
    ),
    "cw": (
        shells.CarliniWagnerShell,
        dict(
            variant=(bic.bad_choice(cw_shell.VARIANTS), "paper_code"),
            delta=(RADIUS, 4.0),
            const=(bic.bad_positive(), 0.1),
            max_iterations=(STEPS1, 1),
            learning_rate=(bic.bad_positive(), 5e-3),
            base=(bad_model(), None),
        ),
    ),
    "hedge": (
        shells.HedgeShell,
        dict(
            delta=(RADIUS, 4.0),
            steps=(STEPS0, 1),
            step_size=(RADIUS, 1.0),
            seed=(bic.bad_seed(), 0),
            base=(bad_model(), None),
        ),
    ),
    "anti_adversary": (
        shells.AntiAdversaryShell,
        dict(
            steps=(STEPS0, 1),
            step_size=(RADIUS, 1.0),
            radius=(NOT_NONE, 2.0),  # None: no radius of its own
            base=(bad_model(), None),
        ),
    ),
}


@pytest.mark.parametrize("profile", bic.SIZES)
@pytest.mark.parametrize("kind", sorted(CONSTRUCTORS))
def test_shell_constructor_refuses_bad_settings(kind, profile, ctx):
    cls, params = CONSTRUCTORS[kind]

    def check(c):
        kwargs = {k: v for k, (_, v) in params.items()}
        kwargs["base"] = ctx["base"]
        for name, value in c["bad"].items():
            kwargs[name] = _materialise(ctx, c, name, value)
        bic.check_refused(lambda: cls(**kwargs), c["broken"], what=f"{kind} shell")

    bic.run(f"{kind}.__init__", profile, case(params), check)


METHODS = {
    "call": lambda shell, x: shell(x),
    "predict": lambda shell, x: shell.predict(x, verbose=0),
    "embed": lambda shell, x: shell.embed(x),
}


@pytest.mark.parametrize("profile", bic.SIZES)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", sorted(CONSTRUCTORS))
def test_shell_refuses_bad_images(kind, method, profile, ctx):
    shell, call = ctx["shells"][kind], METHODS[method]
    # predict refuses an empty batch too (call and embed answer it with an empty result).
    extra = ("empty",) if method == "predict" else ()
    strategy = st.fixed_dictionaries(
        dict(n=st.integers(1, 3), seed=st.integers(0, 2**32 - 1), x=bic.bad_images(extra))
    )

    def check(c):
        x = bic.make_images(c["x"], c["n"], SHAPE, np.random.default_rng(c["seed"]))
        bic.check_refused(lambda: call(shell, x), ["x"], what=f"{kind}.{method}")

    bic.run(f"{kind}.{method}", profile, strategy, check)
