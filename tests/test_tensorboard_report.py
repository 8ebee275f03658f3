"""TensorBoard summaries of the verdict: read back from the event files and through the HParams
plugin's own routes (what the dashboard asks), they hold summary.json's settings and numbers."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorboard import context as context_lib
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import hparams_plugin
from tensorboard.plugins.hparams import metadata as hp_metadata
from werkzeug import test as werkzeug_test

from helpers import small_conv
from manifold_tf import reporting
from manifold_tf.attacks import CWSettings
from manifold_tf.cli import summaries
from manifold_tf.evaluation import adaptive, adaptive_report, presets, tensorboard_report
from manifold_tf.evaluation.config import AdaptiveConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.store import RunStore
from manifold_tf.shells import MCNShell, NCNShell

SUITE = AdaptiveConfig(shell_attacks=("transfer_cw", "bpda"), steps=7)


def fake_summary(shell, base_by, shell_by, *, epsilon=8.0, seed=0, suite=SUITE) -> dict:
    """A ``summary.json`` dict made as a real run's is (summarize, then summary_json), from
    outcome lists instead of attacks: ``""`` robust, ``"clean"`` wrong at x, else the attack."""
    records = [
        dict(
            indices=list(range(len(base_by))),
            base_broken_by=base_by,
            shell_broken_by=shell_by,
            cost=dict(base_passes=37 * len(base_by), shell_predictions=3 * len(base_by)),
            seconds=dict(total=2.0),
        )
    ]
    settings = reporting.to_jsonable(
        dict(epsilon=epsilon, shell=shell.settings(), suite=suite, seed=seed, dataset="synthetic")
    )
    sanity = dict(passed=True, failures=[])
    verdict = adaptive_report.summarize(records, settings, sanity)
    return json.loads(
        json.dumps(
            reporting.to_jsonable(
                adaptive_report.summary_json(dict(settings=settings, verdict=verdict))
            )
        )
    )


@pytest.fixture(scope="module")
def two_summaries():
    base = small_conv(seed=1, shape=(8, 8, 3), classes=4)
    mcn = fake_summary(
        MCNShell(base, 6.0, steps=3),
        ["", "", "apgd_ce", "clean", "apgd_ce", ""],
        ["", "", "", "clean", "bpda", "bpda"],
    )
    ncn = fake_summary(
        NCNShell(base, p=0.95, delta_max=8.0, steps=2, rounds=1),
        ["", "apgd_ce", "", "", "clean"],
        ["", "", "clean", "bpda", "clean"],
        epsilon=4.0,
        seed=3,
        suite=AdaptiveConfig(),
    )
    return mcn, ncn


def read_run(directory: str) -> tuple[dict, dict]:
    """``(hparams, scalars)`` of the one event file in ``directory``."""
    files = glob.glob(os.path.join(directory, "events.out.tfevents.*"))
    assert len(files) == 1, files
    hparams, scalars, starts = {}, {}, 0
    for event in tf.compat.v1.train.summary_iterator(files[0]):
        for v in event.summary.value:
            if v.tag == hp_metadata.SESSION_START_INFO_TAG:
                starts += 1
                info = hp_metadata.parse_session_start_info_plugin_data(
                    v.metadata.plugin_data.content
                )
                hparams = {k: getattr(x, x.WhichOneof("kind")) for k, x in info.hparams.items()}
            elif v.HasField("tensor"):
                assert v.tag not in scalars, f"{v.tag} written twice"
                assert event.step == 0
                scalars[v.tag] = tf.make_ndarray(v.tensor).item()
    assert starts == 1
    return hparams, scalars


def f32(x: float) -> float:
    return float(np.float32(x))  # tf.summary.scalar stores float32


def test_the_event_files_hold_the_hparams_and_the_summary_numbers(two_summaries, tmp_path):
    for i, summary in enumerate(two_summaries):
        directory = tensorboard_report.write_summaries(summary, str(tmp_path / f"r{i}" / "tb"))
        hparams, scalars = read_run(directory)
        assert hparams == tensorboard_report.hparams(summary)
        s = summary["settings"]
        assert hparams["shell"] == s["shell"]["shell"]
        assert hparams["epsilon"] == s["epsilon"] == summary["threat_model"]["epsilon_pixels"]
        assert (hparams["n"], hparams["seed"], hparams["dataset"]) == (
            summary["n"],
            s["seed"],
            "synthetic",
        )
        assert hparams["suite.shell_attacks"] == ",".join(s["suite"]["shell_attacks"])
        assert hparams["suite.steps"] == s["suite"]["steps"]
        for key, value in s["shell"].items():
            if key in ("delta", "p"):  # the threat model's, under their flag names
                assert hparams[key] == value and f"shell.{key}" not in hparams
            elif key != "shell":
                assert hparams[f"shell.{key}"] == value, key
        for who in ("shell", "base"):
            for kind in ("robust_accuracy", "clean_accuracy"):
                assert scalars[f"{who}/{kind}"] == f32(summary[who][kind])
                lo, hi = summary[who][f"{kind}_ci"]
                assert scalars[f"{who}/{kind}_lo"] == f32(lo)
                assert scalars[f"{who}/{kind}_hi"] == f32(hi)
            d = summary["difference"][kind]
            assert scalars[f"difference/{kind}"] == f32(d["estimate"])
            assert scalars[f"difference/{kind}_lo"] == f32(d["ci_low"])
            assert scalars[f"difference/{kind}_hi"] == f32(d["ci_high"])
        for key, value in summary["passes_per_point"].items():
            assert scalars[f"passes_per_point/{key}"] == f32(value)
        assert scalars["mcnemar_p_value"] == f32(summary["mcnemar_p_value"])
        assert scalars["sanity_checks_passed"] == 1.0
    mcn, ncn = two_summaries
    # The outcome lists fix the numbers: 6 points, 3 robust each (one point only the shell's).
    assert mcn["n"] == 6 and mcn["shell"]["robust_accuracy"] == 0.5
    assert mcn["difference"]["robust_accuracy"]["estimate"] == 0.0
    assert ncn["difference"]["robust_accuracy"]["estimate"] == pytest.approx(-1 / 5)
    assert ncn["passes_per_point"] == dict(base_passes=37, shell_predictions=3)


def test_two_runs_under_one_logdir_are_two_rows_of_the_hparams_dashboard(two_summaries, tmp_path):
    for name, summary in zip(("mcn_run", "ncn_run"), two_summaries, strict=True):
        tensorboard_report.write_summaries(summary, str(tmp_path / name / "tensorboard"))
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    assert sorted(mux.Runs()) == ["mcn_run/tensorboard", "ncn_run/tensorboard"]
    provider = data_provider.MultiplexerDataProvider(mux, str(tmp_path))
    context = base_plugin.TBContext(logdir=str(tmp_path), multiplexer=mux, data_provider=provider)
    # The plugins TensorBoard lists as active (its hparams dashboard among them).
    assert "hparams" in provider.list_plugins(context_lib.RequestContext(), experiment_id="")
    apps = hparams_plugin.HParamsPlugin(context).get_plugin_apps()

    def post(route: str, body: dict) -> dict:
        response = werkzeug_test.Client(apps[route]).post(
            route, data=json.dumps(body), content_type="application/json"
        )
        assert response.status_code == 200, response.get_data(as_text=True)
        return json.loads(response.get_data(as_text=True))

    experiment = post("/experiment", dict(experimentName=""))
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    assert set(infos["shell"]["domainDiscrete"]) == {"mcn", "ncn"} and infos["shell"]["differs"]
    assert infos["epsilon"]["domainInterval"] == dict(minValue=4.0, maxValue=8.0)
    # Each shell's own settings are columns: MCN's delta and NCN's p both.
    assert {"delta", "p", "shell.delta_max", "suite.preset", "n", "seed"} <= set(infos)
    groups = post(
        "/session_groups",
        dict(
            experimentName="",
            allowedStatuses=["STATUS_UNKNOWN"],
            colParams=[],
            startIndex=0,
            sliceSize=10,
        ),
    )["sessionGroups"]
    assert len(groups) == 2
    by_shell = {g["hparams"]["shell"]: g for g in groups}
    for summary in two_summaries:
        group = by_shell[summary["settings"]["shell"]["shell"]]
        assert group["hparams"]["n"] == summary["n"]
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert values["difference/robust_accuracy_lo"] == f32(
            summary["difference"]["robust_accuracy"]["ci_low"]
        )
        assert values["shell/clean_accuracy"] == f32(summary["shell"]["clean_accuracy"])


def test_a_rewrite_replaces_the_earlier_summaries_and_leaves_no_temporary_folder(
    two_summaries, tmp_path
):
    mcn, ncn = two_summaries
    directory = str(tmp_path / "run" / "tensorboard")
    tensorboard_report.write_summaries(mcn, directory)
    tensorboard_report.write_summaries(ncn, directory)
    hparams, scalars = read_run(directory)  # one event file, the second summary's
    assert hparams["shell"] == "ncn"
    assert scalars["shell/robust_accuracy"] == f32(ncn["shell"]["robust_accuracy"])
    assert os.listdir(tmp_path / "run") == ["tensorboard"]


def test_the_suite_preset_is_named_by_its_attack_settings_not_its_stopping_rule():
    def suite(config):
        return reporting.to_jsonable(config)

    assert tensorboard_report.suite_preset(suite(AdaptiveConfig())) == "default"
    full = presets.from_preset("full").adaptive
    assert tensorboard_report.suite_preset(suite(full)) == "full"
    # Stopping settings do not change the suite; the paper preset runs the default suite.
    assert tensorboard_report.suite_preset(suite(presets.from_preset("paper").adaptive)) == (
        "default"
    )
    stopped = dataclasses.replace(full, num_points=7, until="decided", budget="1m")
    assert tensorboard_report.suite_preset(suite(stopped)) == "full"
    assert tensorboard_report.suite_preset(suite(SUITE)) == "custom"


def test_without_tensorboard_a_warning_and_no_crash(two_summaries, tmp_path, monkeypatch):
    path = str(tmp_path / "summary.json")
    reporting.write_json(path, two_summaries[0])
    warnings = []
    monkeypatch.setattr(
        tensorboard_report.logging, "warning", lambda msg, *a: warnings.append(msg % a)
    )
    monkeypatch.setitem(sys.modules, "tensorboard.plugins.hparams", None)  # import fails
    assert tensorboard_report.write_beside(path) is None
    assert len(warnings) == 1 and "manifold-tf[tensorboard]" in warnings[0]
    assert not os.path.exists(tmp_path / "tensorboard")
    assert summaries.main([path]) == 1


def test_a_real_verdict_writes_event_files_beside_summary_json_and_they_can_be_rebuilt(tmp_path):
    base = small_conv(seed=3, shape=(8, 8, 3), classes=4)
    shell = MCNShell(base, 4.0, steps=2)
    x = np.random.default_rng(0).uniform(0, 255, size=(6, 8, 8, 3)).astype(np.float32)
    y = shell.predict(x, verbose=0).argmax(1)
    config = AdaptiveConfig(
        num_points=6,
        steps=2,
        sanity_points=0,
        lift_steps=2,
        base_apgd_steps=2,
        targets=1,
        shell_attacks=("transfer_cw", "bpda"),
        base_attacks=("apgd_ce",),
    )
    store = RunStore(str(tmp_path / "run"))
    run = adaptive.run_adaptive(
        base,
        shell,
        x,
        y,
        config,
        RunContext(store=store, epsilon=6.0, cw_settings=CWSettings(max_iterations=2), seed=0),
    )
    adaptive_report.write_adaptive_report(run, x, store)
    summary = reporting.read_json(store.path("summary.json"))
    hparams, scalars = read_run(store.path(tensorboard_report.SUBDIR))
    assert hparams == tensorboard_report.hparams(summary)
    assert (hparams["shell"], hparams["delta"], hparams["n"]) == ("mcn", 4.0, 6)
    assert scalars["shell/robust_accuracy"] == f32(summary["shell"]["robust_accuracy"])
    assert scalars["difference/clean_accuracy_hi"] == f32(
        summary["difference"]["clean_accuracy"]["ci_high"]
    )
    # The command line rebuilds them from summary.json (runs made before this module).
    for f in glob.glob(os.path.join(store.path(tensorboard_report.SUBDIR), "*")):
        os.remove(f)
    assert summaries.main([store.path("summary.json")]) == 0
    again, rescalars = read_run(store.path(tensorboard_report.SUBDIR))
    assert again == hparams
    assert rescalars == scalars
    assert summaries.main([str(tmp_path / "nowhere.json")]) == 1
    assert summaries.main([]) == 2
