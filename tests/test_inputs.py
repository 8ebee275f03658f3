"""Tests of the evaluation inputs: the embedded defaults, batched inference without retracing."""

from __future__ import annotations

import os

import numpy as np

from helpers import LabelInPixel
from manifold_tf import data, pretrained
from manifold_tf.evaluation import inputs
from manifold_tf.evaluation.config import InputConfig


def test_default_inputs_prefer_the_cifar_folder_then_synthetic(tmp_path, monkeypatch):
    sample = tmp_path / "sample"
    (sample / "cifar-10-batches-py").mkdir(parents=True)
    (sample / "cifar-10-batches-py" / "test_batch").write_bytes(b"")
    shipped = set()
    monkeypatch.setattr(pretrained, "available", lambda: sorted(shipped))
    monkeypatch.setattr(pretrained, "path", lambda name: f"/w/{name}.keras")
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    out = str(tmp_path / "out")
    got = inputs.resolve(InputConfig(), run_dir=out)
    assert (got.dataset, got.train_quick_model) == ("synthetic", True)
    assert got.checkpoint == os.path.join(out, inputs.QUICK_MODEL)
    shipped.add("synthetic_narrow")
    assert inputs.resolve(InputConfig(), run_dir=out).checkpoint == "/w/synthetic_narrow.keras"
    shipped.add(inputs.DEFAULT_MODELS["cifar10"])
    # The CIFAR-10 default needs the folder: without the environment variable, still synthetic.
    assert inputs.resolve(InputConfig(), run_dir=out).dataset == "synthetic"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(sample))
    got = inputs.resolve(InputConfig(), run_dir=out)
    assert (got.dataset, got.data_dir, got.checkpoint) == (
        "cifar10",
        str(sample),
        f"/w/{inputs.DEFAULT_MODELS['cifar10']}.keras",
    )
    got = inputs.resolve(InputConfig(checkpoint="/m.keras", data_dir="/d"), run_dir=out)
    assert (got.dataset, got.data_dir, got.checkpoint) == ("cifar10", "/d", "/m.keras")


def test_predict_logits_reuses_one_function_per_model():
    model = LabelInPixel()
    x = np.zeros((7, 32, 32, 3), np.float32)
    x[:, 0, 0, 0] = np.arange(7) % 3
    for batch_size in (7, 3, 2, 7):
        np.testing.assert_array_equal(
            inputs.predict_logits(model, x, batch_size).argmax(-1), np.arange(7) % 3
        )
    # Shapes 7, 3, 1, 2: reduce_retracing relaxes the batch axis after the second shape.
    assert inputs._predict_function(model).experimental_get_tracing_count() <= 2
