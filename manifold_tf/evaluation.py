"""Evaluation: clean and PGD accuracy, and the defence evaluation of the model shells (Table 2).

Defaults that make every command work on a fresh checkout: without ``--data_dir`` the synthetic
data set and the committed model trained on it (``weights/synthetic_narrow.keras``); with a CIFAR-10
``--data_dir`` the committed adversarially trained narrow model (``weights/narrow_adv.keras``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf

from manifold_tf import reporting
from manifold_tf.validation import validate_images, validate_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS_DIR = os.path.join(ROOT, "weights")
DEFAULT_CHECKPOINTS = {
    "cifar10": os.path.join(WEIGHTS_DIR, "narrow_adv.keras"),
    "synthetic": os.path.join(WEIGHTS_DIR, "synthetic_narrow.keras"),
}


def resolve_dataset(dataset: str, data_dir: str | None) -> str:
    """``"auto"`` means CIFAR-10 when a ``data_dir`` is given, else the synthetic set."""
    if dataset == "auto":
        return "cifar10" if data_dir else "synthetic"
    return dataset


def default_checkpoint(dataset: str) -> str:
    """The committed model used when no ``--checkpoint`` is given."""
    path = DEFAULT_CHECKPOINTS[dataset]
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no --checkpoint given and the default model {path!r} is missing: pass "
            f"--checkpoint=PATH (a TF1 checkpoint, a .keras file or .weights.h5)."
        )
    return path


def predict_logits(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, C]`` of ``model`` on ``x`` ``[N, 32, 32, 3]`` (pixels), in batches, inference mode."""
    fn = tf.function(lambda b: model(b, training=False))
    outs = [fn(tf.constant(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def accuracy(model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Clean accuracy in [0, 1]."""
    validate_images(x)
    validate_labels(y, num_examples=len(x), num_classes=int(model.output_shape[-1]))
    return float(np.mean(predict_logits(model, x, batch_size).argmax(-1) == y))


def accuracy_report(
    model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epsilon: float,
    pgd_steps: int,
    pgd_step_size: float,
    restarts: int = 1,
    batch_size: int = 128,
    seed: int = 0,
) -> dict:
    """Clean and PGD-k accuracy (untargeted, cross-entropy, random start) with progress and ETA."""
    from manifold_tf import attacks

    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    validate_images(x)
    validate_labels(y, num_examples=len(x), num_classes=int(model.output_shape[-1]))
    clean_correct = predict_logits(model, x, batch_size).argmax(-1) == y
    adv_correct = np.zeros(len(x), bool)
    progress = reporting.Progress(len(x), f"PGD-{pgd_steps}", unit="images")
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        x_adv = attacks.pgd(
            model, xb, yb, epsilon=epsilon, steps=pgd_steps, step_size=pgd_step_size,
            restarts=restarts, seed=seed + i,
        )
        adv_correct[i : i + len(xb)] = predict_logits(model, np.asarray(x_adv)).argmax(-1) == yb
        progress.update(len(xb))
    return {
        "num_examples": int(len(x)),
        "clean_accuracy": float(clean_correct.mean()),
        "pgd_accuracy": float((adv_correct & clean_correct).mean()),
        "settings": {
            "epsilon": epsilon, "pgd_steps": pgd_steps, "pgd_step_size": pgd_step_size,
            "restarts": restarts, "loss": "xent", "random_start": True, "seed": seed,
        },
        "seconds": time.perf_counter() - start,
    }
