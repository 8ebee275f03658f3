"""What an evaluation runs on: the model and the data, with defaults that work on a fresh machine.

Explicit settings win. Without a checkpoint and a data folder, the embedded default is, in order:

1. CIFAR-10 from the folder named by ``$MANIFOLD_TF_CIFAR10_DIR`` (the top-level ``evaluate.py``
   points it at the CIFAR-10 sample beside the checkout when that exists) with the shipped robust
   model;
2. the synthetic data set with the shipped model trained on it;
3. the synthetic data set with a narrow model trained here in about a minute
   (:func:`quick_synthetic_model`), cached in the run directory so that a resumed run reuses it.

Also here: batched inference with one compiled function per model (:func:`predict_logits`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import keras
import numpy as np
import tensorflow as tf

from manifold_tf import checkpoints, compiled, data, models, pretrained
from manifold_tf.evaluation.config import InputConfig
from manifold_tf.validation import validate_images, validate_labels

# The shipped model each data set uses by default (manifold_tf/weights/README.md).
DEFAULT_MODELS = {"cifar10": "narrow_robust", "synthetic": "synthetic_narrow"}
QUICK_MODEL = "quick_synthetic_model.keras"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A resolved :class:`InputConfig`: a dataset name, its folder, a model path, and why."""

    dataset: str
    data_dir: str | None
    checkpoint: str
    note: str
    train_quick_model: bool = False

    def load_test(self) -> tuple[np.ndarray, np.ndarray]:
        return data.load_arrays(self.dataset, "test", self.data_dir)

    @property
    def class_names(self):
        return data.CIFAR10_LABELS if self.dataset == "cifar10" else None


def default_checkpoint(dataset: str) -> str:
    """The shipped model used when no checkpoint is given (raises, naming the flag, if missing)."""
    try:
        return pretrained.path(DEFAULT_MODELS[dataset])
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"no --checkpoint given and {e} Pass --checkpoint=PATH (a TF1 "
            f"checkpoint, a .keras file or .weights.h5)."
        ) from None


def _has_cifar(folder: str | None) -> bool:
    if not folder:
        return False
    return any(
        os.path.isfile(os.path.join(d, "test_batch"))
        for d in (folder, os.path.join(folder, "cifar-10-batches-py"))
    )


def resolve(config: InputConfig, *, run_dir: str | None = None) -> Inputs:
    """Resolves the model and the data of ``config`` (see the module docstring for the defaults)."""
    quick = os.path.join(run_dir or ".", QUICK_MODEL)
    data_dir = config.data_dir
    if config.checkpoint or data_dir or config.dataset != "auto":
        dataset = config.dataset
        if dataset == "auto":  # CIFAR-10 when a folder is known (given, or from the environment)
            dataset = "cifar10" if data_dir or _has_cifar(data.default_data_dir()) else "synthetic"
        if dataset == "cifar10" and data_dir is None:
            data_dir = data.default_data_dir()
        if config.checkpoint:
            return Inputs(dataset, data_dir, config.checkpoint, "as given")
        if dataset == "synthetic" and DEFAULT_MODELS["synthetic"] not in pretrained.available():
            return Inputs(dataset, data_dir, quick, "quickly trained model", train_quick_model=True)
        return Inputs(dataset, data_dir, default_checkpoint(dataset), "default model")
    env_dir = data.default_data_dir()
    if _has_cifar(env_dir) and DEFAULT_MODELS["cifar10"] in pretrained.available():
        return Inputs(
            "cifar10",
            env_dir,
            pretrained.path(DEFAULT_MODELS["cifar10"]),
            f"embedded default: CIFAR-10 from ${data.DATA_DIR_ENV} + "
            f"{DEFAULT_MODELS['cifar10']}.keras",
        )
    if DEFAULT_MODELS["synthetic"] in pretrained.available():
        return Inputs(
            "synthetic",
            None,
            pretrained.path(DEFAULT_MODELS["synthetic"]),
            "embedded default: synthetic data + shipped model",
        )
    return Inputs(
        "synthetic",
        None,
        quick,
        "embedded default: synthetic data + a quickly trained narrow model",
        train_quick_model=True,
    )


def load_model(inputs: Inputs, *, width: str | None = None, seed: int = 0):
    """The base model of ``inputs`` (trains the quick synthetic model if that is the default)."""
    if inputs.train_quick_model:
        return quick_synthetic_model(inputs.checkpoint, seed=seed)
    return checkpoints.load_model_weights(inputs.checkpoint, width=width)


def model_identity(path: str) -> str:
    """A file's SHA-256 (so a resumed run accepts a copied or renamed model), else its path."""
    if not os.path.isfile(path):
        return os.path.abspath(path)
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]


def quick_synthetic_model(path: str, *, steps: int = 300, batch_size: int = 32, seed: int = 0):
    """A narrow Madry ResNet trained naturally on the synthetic set, cached at ``path`` (.keras).

    ``steps`` SGD steps of ``batch_size`` images, from ``seed``.

    The synthetic classes are far apart, so a few hundred SGD steps reach near-perfect test
    accuracy. An existing ``path`` is loaded instead (a resumed run must use the same model).
    """
    if os.path.exists(path):
        return keras.saving.load_model(path)
    keras.utils.set_random_seed(seed)
    x, y = data.synthetic_arrays("train", seed=0)
    model = models.madry_resnet("narrow")
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ds = data.make_dataset(x, y, batch_size=batch_size, training=True, seed=seed)
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    tmp = path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)
    return model


def _predict_function(model):
    # One inference function per model, traced once per image shape: a new tf.function per call
    # would retrace on every batch of an evaluation.
    return compiled.cached(
        model, ("predict",), lambda net: lambda b: net(b, training=False), reduce_retracing=True
    )


def predict_logits(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, C]`` of ``model`` on ``x`` ``[N, H, W, C]`` (pixels), batched, in inference
    mode."""
    fn = _predict_function(model)
    outs = [fn(tf.constant(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def accuracy(model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Clean accuracy in [0, 1]."""
    validate_images(x, image_shape=None)
    validate_labels(y, num_examples=len(x), num_classes=int(model.output_shape[-1]))
    return float(np.mean(predict_logits(model, x, batch_size).argmax(-1) == y))
