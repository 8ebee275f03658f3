"""Tests of the run store: settings saved once and compared on resume, atomic batches, corrupt
files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from manifold_tf.evaluation.store import RunStore, SettingsMismatch, compare_settings


def test_batches_round_trip_and_resume_keeps_them(tmp_path):
    run = str(tmp_path / "run")
    store = RunStore(run)
    store.bind("proto", dict(a=1, b=[1, 2]))
    store.save("proto", 0, dict(v=1), arrays={"x": np.arange(6.0).reshape(2, 3)})
    store.save("proto", 2, dict(v=3))
    assert store.finished("proto") == [0, 2]
    again = RunStore(run, resume=True)
    assert again.bind("proto", dict(a=1, b=(1, 2))) == dict(a=1, b=[1, 2])  # tuples == lists
    assert again.load("proto", 0) == dict(v=1) and again.load("proto", 1) is None
    np.testing.assert_array_equal(again.load_array("proto", 0, "x"), np.arange(6.0).reshape(2, 3))
    assert not [n for n in os.listdir(os.path.join(run, "proto")) if "tmp" in n]


def test_a_different_setting_is_named_and_nothing_is_lost(tmp_path):
    run = str(tmp_path / "run")
    RunStore(run).bind("proto", dict(delta=8.0, steps=10, strategy="default"))
    RunStore(run, resume=True).save("proto", 0, dict(v=1))
    with pytest.raises(SettingsMismatch, match=r"steps: saved 10, now 20") as e:
        RunStore(run, resume=True).bind("proto", dict(delta=8.0, steps=20, strategy="default"))
    assert "delta" not in str(e.value)  # only what differs is named
    # A free setting may change between sessions.
    RunStore(run, resume=True).bind(
        "proto", dict(delta=8.0, steps=10, strategy="mirrored"), free=("strategy",)
    )
    assert RunStore(run, resume=True).load("proto", 0) == dict(v=1)
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        RunStore(run)  # a non-empty run directory is not clobbered silently
    RunStore(run, overwrite=True).bind("proto", dict(delta=4.0))
    assert RunStore(run, resume=True).finished("proto") == []


def test_corrupt_files_are_named(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.bind("proto", {})
    store.save("proto", 0, dict(v=1), arrays={"x": np.zeros(3)})
    with open(store.path("proto", "batch_000.json"), "w") as f:
        f.write('{"v": ')
    with open(store.path("proto", "batch_000_x.npy"), "wb") as f:
        f.write(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="batch_000.json is corrupt"):
        store.load("proto", 0)
    with pytest.raises(ValueError, match="batch_000_x.npy is corrupt"):
        store.load_array("proto", 0, "x")


def test_compare_settings_lists_missing_keys():
    with pytest.raises(SettingsMismatch, match="seed: saved '<missing>', now 3"):
        compare_settings(dict(a=1), dict(a=1, seed=3))
    compare_settings(json.loads('{"a": [1, 2]}'), dict(a=(1, 2)))
