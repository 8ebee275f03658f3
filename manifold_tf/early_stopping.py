"""Held-out PGD early stopping for adversarial training (catastrophic overfitting of FGSM training).

Fast FGSM training (Wong et al. 2020) can overfit catastrophically: within an epoch its PGD accuracy
collapses while its FGSM accuracy soars. :class:`HoldoutMonitor` attacks a held-out part of the
training set with PGD after every checkpoint interval, keeps ``best.keras`` (the best held-out PGD
accuracy) and stops the run when that accuracy falls ``overfit_drop`` below its best; its history
(``holdout.json``) survives a resume.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
from absl import logging

from manifold_tf import attacks, reporting

BEST_WEIGHTS = "best.keras"
HOLDOUT_LOG = "holdout.json"
MEASURE_BATCH = 250  # held-out images per forward/attack batch: bounds the memory of the check


class HoldoutMonitor(keras.callbacks.Callback):
    """After each checkpoint interval: clean and PGD accuracy on held-out training images.

    Keeps ``best.keras`` (highest held-out PGD accuracy) and stops the run when that accuracy falls
    ``overfit_drop`` below its best: the signature of catastrophic overfitting in FGSM training.
    The history lives in ``holdout.json`` so that a resumed run keeps its best and its verdict.
    """

    def __init__(
        self, config, model_dir: str, images: np.ndarray, labels: np.ndarray, history: dict
    ):
        super().__init__()
        self.config = config
        self.model_dir = model_dir
        self.images = images
        self.labels = labels
        self.history = history

    def measure(self, base: keras.Model) -> tuple[float, float]:
        """``(clean accuracy, PGD accuracy)`` of ``base`` on the held-out images, both in [0, 1]."""
        clean = robust = 0
        for start in range(0, len(self.images), MEASURE_BATCH):
            x = self.images[start : start + MEASURE_BATCH]
            y = self.labels[start : start + MEASURE_BATCH]
            clean += int(np.sum(np.argmax(base(x, training=False), -1) == y))
            x_adv = attacks.pgd(
                base,
                x,
                y,
                epsilon=self.config.epsilon,
                steps=self.config.holdout_pgd_steps,
                step_size=self.config.holdout_pgd_step_size,
                seed=self.config.seed,
            ).x_adv
            robust += int(np.sum(np.argmax(base(x_adv, training=False), -1) == y))
        n = len(self.images)
        return clean / n, robust / n

    def on_epoch_end(self, epoch, logs=None):
        base = self.model.averaged_base()  # the base itself unless the run averages its weights
        step = int(self.model.optimizer.iterations.numpy())
        start = time.perf_counter()
        clean, robust = self.measure(base)
        entry = {
            "step": step,
            "clean_accuracy": clean,
            "pgd_accuracy": robust,
            "n": len(self.images),
            "train_accuracy": float((logs or {}).get("accuracy", float("nan"))),
        }
        self.history["entries"].append(entry)
        best = self.history.get("best")
        if best is None or robust >= best["pgd_accuracy"]:  # ties: the later, longer-trained model
            self.history["best"] = entry
            tmp = os.path.join(self.model_dir, ".tmp-" + BEST_WEIGHTS)
            base.save(tmp)
            os.replace(tmp, os.path.join(self.model_dir, BEST_WEIGHTS))
        best = self.history["best"]
        if robust < best["pgd_accuracy"] - self.config.overfit_drop:
            self.history["stopped"] = {
                "step": step,
                "reason": (
                    f"held-out PGD accuracy {robust:.3f} fell more than {self.config.overfit_drop} "
                    f"below its best {best['pgd_accuracy']:.3f} (step {best['step']}): "
                    f"catastrophic overfitting"
                ),
            }
            self.model.stop_training = True
        reporting.write_json(os.path.join(self.model_dir, HOLDOUT_LOG), self.history)
        logging.info(
            f"holdout @ step {step}: clean {clean:.3f}, "
            f"PGD-{self.config.holdout_pgd_steps} {robust:.3f} "
            f"(n={len(self.images)}, best {best['pgd_accuracy']:.3f} @ {best['step']}, "
            f"{time.perf_counter() - start:.0f}s)",
        )
        if "stopped" in self.history:
            logging.info("stopping: " + self.history["stopped"]["reason"])


def split_holdout(images: np.ndarray, labels: np.ndarray, n: int, seed: int):
    """Holds ``n`` images out by a seeded permutation (``seed``), in their original order.

    Returns ``(train_images, train_labels, held_images, held_labels)``; images ``[*, 32, 32, 3]``.
    """
    if n >= len(images):
        raise ValueError(f"holdout ({n}) must be smaller than the training set ({len(images)}).")
    order = np.random.default_rng(seed).permutation(len(images))
    keep, held = np.sort(order[n:]), np.sort(order[:n])
    return images[keep], labels[keep], images[held], labels[held]
