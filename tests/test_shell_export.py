"""Tests of the shells as Keras models: predict/evaluate, config and ``.keras`` round trips,
SavedModel export (run without manifold_tf), and input checks of call/predict/embed.

Units: pixels 0..255.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import (
    assert_config_round_trip,
    assert_saving_round_trip,
    nearest_centre_model,
    uniform_images,
)
from manifold_tf.data import synthetic_arrays, synthetic_manifold
from manifold_tf.models import LeakyReLU, PerImageStandardization, madry_resnet
from manifold_tf.shells import CarliniWagnerShell, MCNShell, NCNShell

SHAPE = (32, 32, 3)


def test_predict_and_evaluate_work_as_for_any_keras_model():
    centres, _ = synthetic_manifold(num_classes=10)
    x, y = synthetic_arrays("test", num_examples=6)
    shell = MCNShell(nearest_centre_model(centres, 1e4), 8.0, steps=3, jit_compile=False)
    probs = shell.predict(x, batch_size=4, verbose=0)
    assert probs.shape == (6, 10)
    np.testing.assert_allclose(probs, shell.embed(x)["probabilities"].numpy(), atol=1e-6)
    shell.compile(metrics=["accuracy"])
    result = shell.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    assert result["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == y))


def tiny_custom_base() -> keras.Model:
    """A small conv net made of manifold_tf's registered custom layers and Keras ones (fast)."""
    inputs = keras.Input(SHAPE)
    h = PerImageStandardization(name="standardize")(inputs)
    h = keras.layers.Conv2D(4, 3, strides=4, name="conv")(h)
    h = LeakyReLU(name="relu")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logit")(h))


def _small_shells(base=None):
    base = base or tiny_custom_base()
    return [
        MCNShell(base, 8.0, steps=2, jit_compile=False, name="mcn"),
        NCNShell(base, 0.6, delta_max=8.0, steps=1, rounds=2, jit_compile=False, name="ncn"),
        CarliniWagnerShell(
            base,
            variant="all_labels",
            delta=6.0,
            const=0.5,
            max_iterations=3,
            learning_rate=1e-2,
            jit_compile=False,
            name="cw",
        ),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_config_round_trip_and_keras_file(tmp_path, index):
    shell = _small_shells()[index]
    x = uniform_images(2, SHAPE, seed=0)
    expected = shell(x).numpy()
    clone = assert_config_round_trip(shell)
    clone.set_weights(shell.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), expected, atol=1e-6)
    assert_saving_round_trip(shell, x, tmp_path, atol=1e-6)


_LOAD_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
probs = loaded.serve(tf.constant(x)).numpy()
label = loaded.embed(tf.constant(x))["label"].numpy()
np.save(sys.argv[3], probs)
imported = sorted(m for m in sys.modules if m.startswith(("manifold_tf", "keras")))
print(json.dumps({"imported": imported,
                  "label": label.tolist()}))
"""


@pytest.mark.parametrize("index", [0, 1])
def test_export_runs_in_a_fresh_process_without_manifold_tf(tmp_path, index):
    shell = _small_shells()[index]
    x = uniform_images(3, SHAPE, seed=1)
    expected = shell.embed(x)
    export_dir = str(tmp_path / "export")
    shell.export(export_dir)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_SCRIPT,
            export_dir,
            str(tmp_path / "x.npy"),
            str(tmp_path / "p.npy"),
        ],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [m for m in report["imported"] if m.startswith("manifold_tf")], report["imported"]
    np.testing.assert_allclose(
        np.load(tmp_path / "p.npy"), expected["probabilities"].numpy(), atol=1e-6
    )
    assert report["label"] == expected["label"].numpy().tolist()


@pytest.mark.slow
def test_madry_resnet_shell_saves_and_exports(tmp_path):
    shell = _small_shells(madry_resnet("narrow"))[0]
    x = uniform_images(2, SHAPE, seed=0)
    expected = shell(x).numpy()
    assert_saving_round_trip(shell, x, tmp_path, atol=1e-6)
    shell.export(str(tmp_path / "export"))
    loaded = tf.saved_model.load(str(tmp_path / "export"))  # keep it: its variables live with it
    np.testing.assert_allclose(loaded.serve(x).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((2, 32, 32, 3), np.nan, np.float32), "NaN|pixel values"),
        (np.full((2, 32, 32, 3), np.inf, np.float32), "infinite|pixel values"),
        (np.full((2, 32, 32, 3), -1.0, np.float32), "pixel values in \\[0, 255\\]|< 0"),
        (np.full((2, 32, 32, 3), 300.0, np.float32), "pixel values in \\[0, 255\\]|> 255"),
        (np.zeros((0, 32, 32, 3), np.float32), "empty batch"),
        (np.zeros((2, 32, 32), np.float32), "shape"),
        (np.zeros((2, 32, 32, 3), np.uint8), "floating-point"),
    ],
)
def test_bad_input_is_refused_by_call_predict_and_embed(bad, message):
    base = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(3)])
    shell = MCNShell(base, 4.0, steps=1, jit_compile=False)
    for run in (shell.predict, shell.embed, shell):
        if run is not shell.predict and bad.shape[:1] == (0,):
            continue  # embed/call of an empty batch return an empty result
        with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=message):
            run(bad)


def test_graph_mode_call_refuses_out_of_range_pixels():
    base = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(3)])
    shell = MCNShell(base, 4.0, steps=1, jit_compile=False)
    graph_call = tf.function(lambda x: shell(x))
    with pytest.raises(tf.errors.InvalidArgumentError, match="> 255"):
        graph_call(tf.fill((1, 32, 32, 3), 300.0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or infinite"):
        graph_call(tf.fill((1, 32, 32, 3), float("nan")))
