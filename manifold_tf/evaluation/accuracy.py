"""Clean and PGD accuracy of a base model (accuracy mode)."""

from __future__ import annotations

import time

import numpy as np

from manifold_tf import reporting
from manifold_tf.evaluation.config import AccuracyConfig
from manifold_tf.evaluation.inputs import predict_logits
from manifold_tf.validation import validate_images, validate_labels


def accuracy_report(model, x: np.ndarray, y: np.ndarray, config: AccuracyConfig, *, seed: int = 0) -> dict:
    """Clean and PGD-k accuracy (untargeted, cross-entropy, random start) with progress and ETA.

    Robust accuracy counts a point when it is correct at ``x`` and at the attack's ``x'``, over
    all evaluated points.
    """
    from manifold_tf import attacks

    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    validate_images(x)
    validate_labels(y, num_examples=len(x), num_classes=int(model.output_shape[-1]))
    bs = config.batch_size
    clean_correct = predict_logits(model, x, bs).argmax(-1) == y
    adv_correct = np.zeros(len(x), bool)
    progress = reporting.Progress(len(x), f"PGD-{config.pgd_steps}", unit="images")
    start = time.perf_counter()
    for i in range(0, len(x), bs):
        xb, yb = x[i : i + bs], y[i : i + bs]
        x_adv = attacks.pgd(model, xb, yb, epsilon=config.epsilon, steps=config.pgd_steps,
                            step_size=config.pgd_step_size, restarts=config.pgd_restarts, seed=seed + i)
        adv_correct[i : i + len(xb)] = predict_logits(model, np.asarray(x_adv)).argmax(-1) == yb
        progress.update(len(xb))
    return {
        "num_examples": int(len(x)),
        "clean_accuracy": float(clean_correct.mean()),
        "pgd_accuracy": float((adv_correct & clean_correct).mean()),
        "settings": {
            "epsilon": config.epsilon, "pgd_steps": config.pgd_steps,
            "pgd_step_size": config.pgd_step_size, "restarts": config.pgd_restarts, "loss": "xent",
            "random_start": True, "seed": seed,
        },
        "seconds": time.perf_counter() - start,
    }


def accuracy_markdown(report: dict) -> str:
    s = report["settings"]
    return reporting.markdown_table(
        ["checkpoint", "images", "clean accuracy", f"PGD-{s['pgd_steps']} accuracy (eps {s['epsilon']:g})"],
        [[report["checkpoint"], report["num_examples"], report["clean_accuracy"], report["pgd_accuracy"]]],
    )


def run_accuracy(model, x: np.ndarray, y: np.ndarray, config: AccuracyConfig, store, *, seed: int = 0,
                 metadata: dict | None = None) -> tuple[dict, str]:
    """Runs :func:`accuracy_report` on the first ``num_examples`` points; writes ``accuracy.{json,md}``."""
    if config.num_examples:
        x, y = x[: config.num_examples], y[: config.num_examples]
    report = accuracy_report(model, x, y, config, seed=seed)
    report.update(metadata or {})
    text = accuracy_markdown(report)
    store.write_report("accuracy", report, text)
    return report, text
