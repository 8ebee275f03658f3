"""``RunContext``: the run's shared settings, checked once, built from the defence config."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest

from manifold_tf.attacks import CWSettings
from manifold_tf.evaluation.config import BaseAttackConfig, DefenceConfig
from manifold_tf.evaluation.context import RunContext, defence_metadata
from manifold_tf.evaluation.store import RunStore


@pytest.fixture
def store(tmp_path):
    out = RunStore(str(tmp_path / "run"))
    yield out
    out.close()


def test_the_defaults_are_those_the_protocols_had(store):
    context = RunContext(store=store, epsilon=8.0, cw_settings=CWSettings())
    assert (context.seed, context.permutation, context.batch_points) == (0, "numpy", 30)
    assert context.metadata is None and context.clock() >= 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.seed = 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epsilon", -1.0, "epsilon must be a finite number >= 0"),
        ("epsilon", 300.0, "exceeds the pixel range"),
        ("batch_points", 0, "batch_points must be an integer >= 1"),
        ("batch_points", 2.5, "batch_points must be an integer >= 1"),
        ("permutation", "python", "permutation must be one of"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(store, field, value, message):
    given = dict(dict(store=store, epsilon=8.0, cw_settings=CWSettings()), **{field: value})
    with pytest.raises(ValueError, match=message):
        RunContext(**given)


def test_for_defence_takes_order_batches_and_attack_from_the_config_and_checks_them(store):
    config = DefenceConfig(
        batch_points=4, permutation="paper", attack=BaseAttackConfig(max_iterations=2)
    )
    context = RunContext.for_defence(config, store, epsilon=6.0, seed=3, metadata=dict(a=1))
    assert (context.permutation, context.batch_points) == ("paper", 4)
    assert context.cw_settings == config.attack.cw_settings
    assert (context.epsilon, context.seed, context.metadata) == (6.0, 3, dict(a=1))
    context.check_defence(config)
    # Reusing another run's x' changes no attack setting.
    context.check_defence(
        dataclasses.replace(config, attack=dataclasses.replace(config.attack, from_run="x"))
    )
    for other in (
        dataclasses.replace(config, batch_points=5),
        dataclasses.replace(config, permutation="numpy"),
        dataclasses.replace(config, attack=BaseAttackConfig(max_iterations=3)),
    ):
        with pytest.raises(ValueError, match="differ from the run's"):
            context.check_defence(other)


def test_on_moves_only_the_store(store):
    context = RunContext(store=store, epsilon=8.0, cw_settings=CWSettings(), seed=5)
    sub = store.sub("mcn")
    moved = context.on(sub)
    assert moved.store is sub and moved.seed == 5 and context.store is store


def test_defence_metadata_records_absolute_paths_and_p_auto_only_when_chosen():
    inputs = SimpleNamespace(checkpoint="m.keras", dataset="synthetic", data_dir=None)
    got = defence_metadata(inputs, "default (1 replicas)", None)
    assert got == dict(
        checkpoint=os.path.abspath("m.keras"),
        dataset="synthetic",
        data_dir=None,
        strategy="default (1 replicas)",
    )
    assert list(defence_metadata(inputs, "s", dict(quantile=0.5)))[-1] == "p_auto"
