"""Shared fixtures: the CIFAR-10 sample from ../shared (skipped when absent).

Tiny models, ball/box checks and the config / ``.keras`` round trips live in ``helpers.py``.
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
