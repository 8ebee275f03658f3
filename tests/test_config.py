"""The evaluation's settings: presets apply to every setting, explicit flags win, the threat model
is one config, and bad presets or values are errors naming them. No model runs here."""

from __future__ import annotations

import dataclasses

import pytest
from absl import flags

from manifold_tf import projected
from manifold_tf.cli import evaluate
from manifold_tf.cli import flags as config_flags
from manifold_tf.evaluation import adaptive_config, presets
from manifold_tf.evaluation import config as cfg


def _config(*argv: str) -> cfg.EvaluationConfig:
    """The config ``evaluate.py argv`` would run, parsed on fresh flags (not the global ones)."""
    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values)
    flag_values(["evaluate.py", *argv])
    return evaluate.config_from_flags(flag_values)


def _leaves(changes: dict, path=()):
    """``(path, value)`` of every setting in nested ``changes``."""
    for key, value in changes.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


def _get(config, path):
    for key in path:
        config = getattr(config, key)
    return config


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_setting_of_a_preset_reaches_the_built_config(name):
    changes = presets.PRESETS[name].changes
    for config in (
        _config(f"--preset={name}"),
        _config(f"--preset={name}", "--shell=mcn"),
        presets.from_preset(name),
    ):
        for path, value in _leaves(changes):
            if path == ("defence", "shell", "kind") and config.mode == "defence":
                continue  # --shell=mcn was given: it wins
            assert _get(config, path) == value, (name, path)


def test_full_is_autoattack_standard_on_the_base_and_the_strong_suite_on_the_shell():
    a = _config("--preset=full", "--shell=mcn").adaptive
    assert (a.num_points, a.steps, a.restarts, a.targets, a.lift_steps) == (150, 100, 2, 4, 100)
    assert (a.square_queries, a.eot_samples, a.sanity_points, a.sanity_steps) == (2000, 8, 20, 20)
    assert a.base_attacks == ("apgd_ce", "apgd_t", "fab_t", "square")
    assert (a.base_apgd_steps, a.base_targets, a.base_square_queries) == (100, 9, 5000)
    default = cfg.AdaptiveConfig()
    differ = {
        f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(default, f.name)
    }
    assert a.budget is None  # the strongest suite runs every planned point
    assert differ == {
        "num_points",
        "budget",
        "steps",
        "restarts",
        "targets",
        "lift_steps",
        "square_queries",
        "eot_samples",
        "sanity_points",
        "sanity_steps",
        "base_attacks",
        "base_targets",
    }


def test_paper_keeps_its_150_points_and_its_protocol():
    config = _config("--preset=paper", "--shell=cw")
    assert config.adaptive.num_points == 150
    assert (config.separation.batches, config.separation.batch_points) == (10, 30)
    d = config.defence
    assert (d.batches, d.permutation, d.points) == (5, "paper", "paper")
    assert d.shell.cw_max_iterations == 1000
    assert (d.attack.max_iterations, d.attack.initial_const, d.attack.stop_within_epsilon) == (
        1000,
        1e-5,
        False,
    )
    assert _config("--preset=default", "--shell=cw") == _config("--shell=cw")


def test_an_explicit_flag_beats_the_preset_even_at_the_default_value():
    config = _config(
        "--preset=full",
        "--shell=mcn",
        "--adaptive_steps=3",
        "--num_points=30",
        "--adaptive_base_attacks=apgd_ce",
    )
    a = config.adaptive
    assert (a.steps, a.num_points, a.base_attacks) == (3, 30, ("apgd_ce",))
    assert a.restarts == 2 and a.base_square_queries == 5000  # the rest is still the preset's
    paper = _config(
        "--preset=paper",
        "--shell=mcn",
        "--base_attack_stop_within_epsilon",
        "--separation_batches=2",
        "--delta=4",
    )
    assert paper.defence.shell.kind == "mcn" and paper.defence.shell.cw_max_iterations == 1000
    assert paper.defence.attack.stop_within_epsilon is True
    assert paper.defence.attack.max_iterations == 1000
    assert (paper.separation.batches, paper.separation.batch_points) == (2, 30)
    assert paper.threat == cfg.ThreatConfig(epsilon=8.0, delta=4.0, p=0.9)


def test_an_unknown_preset_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown preset 'fast'.*default, full, paper"):
        presets.from_preset("fast")
    with pytest.raises(flags.IllegalFlagValueError, match="fast"):
        _config("--preset=fast")


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(adaptive=dict(stepz=3)),
            "preset 'bad': adaptive.stepz is not a setting of AdaptiveConfig",
        ),
        (
            dict(defence=dict(shell=dict(delta=4.0))),
            "defence.shell.delta is not a setting of ShellConfig",
        ),
        (dict(epsilon=4.0), "preset 'bad': epsilon is not a setting of EvaluationConfig"),
        (dict(threat=4.0), "threat is a section \\(ThreatConfig\\)"),
        (dict(adaptive=dict(steps=-1)), "steps must be an integer >= 0; got -1"),
    ],
)
def test_a_preset_naming_an_unknown_field_or_a_bad_value_is_an_error_naming_it(
    monkeypatch, changes, message
):
    monkeypatch.setitem(presets.PRESETS, "bad", presets.Preset("a broken preset", changes))
    with pytest.raises(ValueError, match=message):
        presets._check_presets()  # what the module runs at import


def test_help_lists_every_preset_and_the_flags_it_sets():
    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values)
    text = flag_values["preset"].help
    for name, (description, changes) in presets.PRESETS.items():
        assert f"{name}: {description}" in text
        for flag in config_flags.flags_of(cfg.EvaluationConfig, changes):
            assert flag in text
    assert "--num_points=150" in text and "--adaptive_steps=100" in text and "--shell=cw" in text


def test_the_threat_model_is_one_config_read_by_every_mode():
    for mode in ("accuracy", "separation"):
        config = _config(f"--mode={mode}", "--epsilon=4", "--delta=6", "--p=0.8")
        assert config.threat == cfg.ThreatConfig(epsilon=4.0, delta=6.0, p=0.8)
    for owner in (cfg.AccuracyConfig, cfg.SeparationConfig, cfg.DefenceConfig, cfg.ShellConfig):
        assert not {"epsilon", "delta", "p"} & {f.name for f in dataclasses.fields(owner)}, owner
    with pytest.raises(ValueError, match="p must lie in \\(0, 1\\); got 1.5"):
        cfg.ThreatConfig(p=1.5)
    with pytest.raises(ValueError, match="delta=300.0 exceeds the pixel range"):
        cfg.ThreatConfig(delta=300)


def test_the_separation_search_takes_the_threat_models_delta():
    sep = cfg.SeparationConfig(steps=10, extra_radius=2.0)
    assert sep.radius(8.0) == 10.0
    assert sep.attack(8.0) == dict(
        steps=10,
        step_size=projected.madry_step_size(10.0, 10),
        optimizer="sign",
        random_start=False,
    )
    assert sep.attack(8.0, steps=50)["step_size"] == pytest.approx(2.5 * 10.0 / 50)
    assert cfg.SeparationConfig(step_size=1.5).attack(8.0)["step_size"] == 1.5


def test_the_optimiser_vocabulary_is_the_projected_cores():
    for owner in (cfg.SeparationConfig, cfg.ShellConfig):
        optimizer = {f.name: f for f in dataclasses.fields(owner)}["optimizer"]
        assert optimizer.metadata["choices"] == projected.OPTIMIZERS == ("sign", "adam")
    with pytest.raises(ValueError, match="shell_optimizer must be one of .*got 'pgd'"):
        cfg.ShellConfig(optimizer="pgd")


def test_the_shell_is_built_by_kind_at_the_threat_models_delta_and_p(monkeypatch):
    from manifold_tf import shells

    calls = []
    monkeypatch.setattr(
        shells,
        "build",
        lambda kind, base, settings, **kw: calls.append((kind, base, settings, kw)) or "shell",
    )
    settings = cfg.ShellConfig(kind="ncn", ncn_rounds=2)
    assert settings.build("base", cfg.ThreatConfig(delta=4.0, p=0.8), seed=3) == "shell"
    assert calls == [("ncn", "base", settings, dict(delta=4.0, p=0.8, seed=3))]


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90s", 90.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        (" 45 ", 45.0),
        ("2M", 120.0),
    ],
)
def test_parse_budget(text, seconds):
    assert adaptive_config.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "10 min", "-5m", "0s", "h", "1e400s", "inf"])
def test_parse_budget_names_a_bad_text(text):
    with pytest.raises(ValueError, match=f"got {text!r}"):
        adaptive_config.parse_budget(text)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(until="forever"),
            "adaptive_until must be one of \\('points', 'decided'\\); got 'forever'",
        ),
        (dict(margin=150.0), "adaptive_margin is in percentage points, 0..100; got 150.0"),
        (dict(budget="ten minutes"), "budget must be a positive wall time .*got 'ten minutes'"),
        (dict(base_attacks=("apgd_ce", "pgd")), "base_attacks must be one of .*got 'pgd'"),
        (dict(base_targets=0), "base_targets must be an integer >= 1; got 0"),
    ],
)
def test_the_new_adaptive_settings_are_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        cfg.AdaptiveConfig(**changes)


def test_the_new_adaptive_settings_come_from_flags():
    a = _config(
        "--shell=mcn",
        "--adaptive_until=decided",
        "--adaptive_margin=2.5",
        "--adaptive_budget=10m",
        "--adaptive_base_targets=5",
    ).adaptive
    assert (a.until, a.margin, a.budget, a.budget_seconds, a.base_targets) == (
        "decided",
        2.5,
        "10m",
        600.0,
        5,
    )
    assert cfg.AdaptiveConfig().budget_seconds == 540.0  # the headline's default: 9 minutes
    assert cfg.AdaptiveConfig(budget="none").budget_seconds is None


def test_full_plans_at_least_ten_times_the_defaults_passes_on_the_same_points():
    from manifold_tf.evaluation import estimate

    class Shell:
        num_classes = 10

    planned = {}
    for name in ("default", "full"):
        config = presets.from_preset(name)
        phases = estimate.defence_passes(
            table2_points=100,
            num_points=150,
            shell=Shell(),
            per_prediction=10 * 10,
            cw=config.defence.attack.cw_settings,
            suite=config.adaptive,
        )
        planned[name] = sum(phases.values())
    assert planned["full"] >= 10 * planned["default"], planned


def test_the_full_preset_plans_at_most_220000_passes_per_point_for_mcn():
    """Issue 22's bound on the strongest suite's plan (an upper bound: every point standing to
    the last attack), on 4 points as the CIFAR default's first 4, MCN_8 with its own cheaper
    copies; and it is still the stronger suite, by a wide margin."""
    from helpers import small_conv
    from manifold_tf.evaluation import estimate
    from manifold_tf.shells import MCNShell

    shell = MCNShell(small_conv(classes=10, shape=(32, 32, 3)), 8.0)
    per_point, plans = {}, {}
    for name in ("default", "full"):
        config = presets.from_preset(name)
        phases = estimate.defence_passes(
            table2_points=4,
            num_points=4,
            shell=shell,
            per_prediction=shell.passes_per_prediction(),
            cw=config.defence.attack.cw_settings,
            suite=config.adaptive,
        )
        per_point[name], plans[name] = sum(phases.values()) / 4, phases
        if name == "full":  # every attack of the strongest suite is planned, none for free
            attacks_planned = {k: v for k, v in phases.items() if k.startswith("adaptive: ")}
            assert all(v > 0 for k, v in attacks_planned.items() if "not in Table 2" not in k)
    assert shell.passes_per_prediction() == 100
    assert per_point["full"] <= 220_000, per_point
    # Stronger attack by attack, and by a wide margin overall (8.2x when MCN's Square copy became
    # 5 steps on y and 1 label: the full suite's 2,000 Square queries got cheaper too).
    for phase, passes in plans["default"].items():
        if phase.startswith("adaptive: ") and "sanity" not in phase:
            assert plans["full"].get(phase, 0) >= passes, (phase, plans)
    assert per_point["full"] >= 5 * per_point["default"], per_point


def test_make_and_changes_of_round_trip():
    for name in presets.PRESETS:
        config = presets.from_preset(name)
        assert presets.make(cfg.EvaluationConfig, presets.changes_of(config)) == config
    assert presets.merge(dict(a=dict(b=1, c=2)), dict(a=dict(c=3), d=4)) == dict(
        a=dict(b=1, c=3), d=4
    )


def test_every_setting_has_one_flag():
    names = [s.flag for s in config_flags.walk(cfg.EvaluationConfig)]
    assert len(names) == len(set(names))
    assert {
        "epsilon",
        "delta",
        "p",
        "shell",
        "num_points",
        "adaptive",
        "adaptive_until",
        "adaptive_budget",
        "separation_steps",
        "base_attack_max_iterations",
    } <= set(names)
