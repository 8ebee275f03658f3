"""Tests of accuracy mode: per-attack and worst-case robust accuracy with intervals, on a linear
oracle."""

from __future__ import annotations

import keras
import numpy as np

from helpers import linear_model
from manifold_tf.evaluation.accuracy import accuracy_markdown, accuracy_report
from manifold_tf.evaluation.config import AccuracyConfig

SHAPE = (4, 4, 3)


def random_linear_model(num_classes: int, seed: int = 0) -> keras.Model:
    """A linear model on ``[N, 4, 4, 3]`` pixels, weights ``N(0, 1) / 50``, no bias."""
    rng = np.random.default_rng(seed)
    return linear_model(SHAPE, rng.normal(size=(48, num_classes)).astype(np.float32) / 50)


def test_robust_accuracy_matches_the_linear_closed_form_and_the_worst_case_is_the_minimum():
    model = random_linear_model(5)
    rng = np.random.default_rng(1)
    x = rng.uniform(60, 195, size=(40, *SHAPE)).astype(np.float32)  # away from the box edges
    logits = model(x).numpy()
    y = logits.argmax(1)
    y[:5] = (y[:5] + 1) % 5  # a few points wrong at x
    eps = 3.0
    w = model.layers[-1].get_weights()[0]
    # A linear model is broken within eps iff some margin Z_y - Z_t < eps * ||w_y - w_t||_1.
    reach = np.array([[eps * np.abs(w[:, yi] - w[:, t]).sum() for t in range(5)] for yi in y])
    margin = logits[np.arange(40), y][:, None] - logits
    provable = np.all((margin > reach + 1e-3) | (np.arange(5)[None] == y[:, None]), axis=1)
    breakable = np.any((margin < reach - 1e-3) & (np.arange(5)[None] != y[:, None]), axis=1)
    report = accuracy_report(
        model,
        x,
        y,
        AccuracyConfig(
            pgd_steps=30, pgd_step_size=0.5, apgd_steps=30, apgd_targets=4, batch_size=16
        ),
        epsilon=eps,
    )
    assert report["clean"]["k"] == 35 and report["clean"]["n"] == 40
    assert set(report["robust"]) == {"PGD-30", "APGD-CE", "APGD-T"}
    worst = report["worst_case"]
    assert worst["k"] <= min(p["k"] for p in report["robust"].values())
    # Oracle: the worst case finds every breakable point and never breaks a provably robust one.
    correct = logits.argmax(1) == y
    assert int((correct & provable).sum()) <= worst["k"] <= int((correct & ~breakable).sum())
    assert worst["ci_low"] <= worst["rate"] <= worst["ci_high"]
    assert report["pgd_accuracy"] == report["robust"]["PGD-30"]["rate"]
    text = accuracy_markdown(dict(report, checkpoint="lin"))
    assert "worst case" in text and "95% CI" in text


def test_three_classes_skip_apgd_t_and_zero_apgd_steps_skip_both():
    model = random_linear_model(3)
    x = np.full((4, *SHAPE), 128, np.float32)
    y = model(x).numpy().argmax(1)
    report = accuracy_report(model, x, y, AccuracyConfig(pgd_steps=2, apgd_steps=5), epsilon=1.0)
    assert set(report["robust"]) == {"PGD-2", "APGD-CE"}
    report = accuracy_report(model, x, y, AccuracyConfig(pgd_steps=2, apgd_steps=0), epsilon=1.0)
    assert set(report["robust"]) == {"PGD-2"}
