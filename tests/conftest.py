"""Shared fixtures: the CIFAR-10 sample from ../shared (skipped when absent), and models built once
per session (a saved nearest-centre checkpoint for command-line runs).

Tiny models, ball/box checks and the config / ``.keras`` round trips live in ``helpers.py``;
command-line runs forked warm in ``warm.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-sample")


@pytest.fixture
def cifar_sample_dir() -> str:
    """Path of the real CIFAR-10 sample; skips the test when it is not on this machine."""
    if not os.path.isfile(os.path.join(SAMPLE_DIR, "cifar-10-batches-py", "test_batch")):
        pytest.skip(f"CIFAR-10 sample not found at {SAMPLE_DIR} (see ../shared/data/README.md)")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def nearest_centre_checkpoint(tmp_path_factory) -> str:
    """A ``.keras`` nearest-centre classifier of the synthetic set's 10 centres (temperature
    3e4 px^2): images ``[N, 32, 32, 3]`` -> logits ``[N, 10]``, a linear model, so command-line
    runs on it spend their time in the protocol, not in tracing a ResNet. Do not modify the file."""
    # deferred: importing TensorFlow is left to the tests that need it.
    from helpers import nearest_centre_model
    from manifold_tf.data import synthetic_manifold

    centres, _ = synthetic_manifold(num_classes=10)
    path = str(tmp_path_factory.mktemp("model") / "nearest_centre.keras")
    nearest_centre_model(centres, 3e4).save(path)
    return path
