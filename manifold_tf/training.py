"""Training runs, resumable: natural, PGD (Madry et al.), fast FGSM (Wong et al.) and TRADES.

:func:`train` drives Keras ``fit`` on an :class:`~manifold_tf.trainer.AdversarialTrainer` (the
model whose ``train_step`` attacks each batch) with Madry's optimiser (SGD, momentum 0.9,
piecewise-constant or cyclic learning rate). It checkpoints every N steps, resumes to the same
weights an uninterrupted run reaches, logs to TensorBoard and writes the final base model as
``final.keras``; on one device, the devices of a host (``mirrored``) or several workers
(``multi_worker``, :mod:`manifold_tf.distributed`). :class:`TrainConfig` holds every setting.

Fast adversarial training (Wong, Rice & Kolter 2020, "Fast is better than free") is the same trainer
with one step: ``attack="fgsm"`` starts at a uniform point of the ball and takes one signed step of
``1.25 * epsilon``. It is known to overfit catastrophically (PGD accuracy collapses within an epoch
while FGSM accuracy soars), so a run may hold out part of the training set: after every checkpoint
interval the model is attacked there with PGD, ``best.keras`` keeps the weights with the best
held-out PGD accuracy, and a drop of ``overfit_drop`` below that best stops the run.
"""

from __future__ import annotations

import dataclasses
import math
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from manifold_tf import checkpoints, models, reporting, training_callbacks
from manifold_tf import data as data_lib
from manifold_tf.distributed import SINGLE, Workers, remove_scratch, scratch_dir
from manifold_tf.early_stopping import HOLDOUT_LOG, HoldoutMonitor, split_holdout
from manifold_tf.evaluation.store import RunStore
from manifold_tf.settings import setting
from manifold_tf.trainer import AdversarialTrainer, CyclicLearningRate
from manifold_tf.validation import check_int, check_positive, check_real, validate_radius

__all__ = ["AdversarialTrainer", "CyclicLearningRate", "TrainConfig", "build_trainer", "train"]

FINAL_WEIGHTS = "final.keras"
CHECKPOINT_SUBDIR = "checkpoints"
ATTACKS = ("pgd", "fgsm", "trades")
LR_SCHEDULES = ("piecewise", "cyclic")
STRATEGIES = ("default", "mirrored", "multi_worker")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the model dir).

    The fields double as ``train.py``'s flags (:mod:`manifold_tf.cli.flags`).
    """

    width: str = setting("narrow", "Model width.", choices=("narrow", "wide"))
    dataset: str = setting("cifar10", "Training data.", choices=("cifar10", "synthetic"))
    data_dir: str | None = setting(
        None,
        "cifar-10-batches-py folder (default: $MANIFOLD_TF_CIFAR10_DIR, else TensorFlow Datasets).",
    )
    adversarial: bool = setting(False, "Train on adversarial examples (--attack).")
    attack: str = setting(
        "pgd",
        "Training attack: Madry's PGD-k, FGSM from a random start (Wong et "
        "al.), or TRADES with PGD-k on the KL (Zhang et al.).",
        choices=ATTACKS,
    )
    epsilon: float = setting(8.0, "Attack L-inf budget, pixels (0..255).")
    pgd_steps: int = setting(7, "PGD steps per batch.")
    pgd_step_size: float = setting(2.0, "PGD step size, pixels.")
    fgsm_step_factor: float = setting(1.25, "FGSM step as a multiple of epsilon.")
    trades_beta: float = setting(6.0, "TRADES: weight of the KL term (attack=trades).")
    batch_size: int = setting(128, "Global batch size.")
    steps: int = setting(80000, "Total training steps.")
    lr_schedule: str = setting("piecewise", "Learning-rate schedule.", choices=LR_SCHEDULES)
    lr_boundaries: tuple[int, ...] = setting(
        (40000, 60000), "Steps where the piecewise rate drops."
    )
    lr_values: tuple[float, ...] = setting(
        (0.1, 0.01, 0.001), "Piecewise rates (one more than boundaries)."
    )
    lr_max: float = setting(0.2, "Peak learning rate of the cyclic schedule.")
    lr_peak: float = setting(0.4, "Where the cyclic schedule peaks, as a fraction of the steps.")
    ema_decay: float = setting(
        0.0,
        "Keep an exponential moving average of the weights with this "
        "decay (0: none); held-out checks, best.keras and final.keras "
        "then use the averaged weights.",
    )
    awp_gamma: float = setting(
        0.0,
        "Adversarial weight perturbation (Wu et al. 2020): relative size "
        "of the kernels' ascent step before each update (0: none; 5e-3 "
        "is the paper's).",
    )
    holdout: int = setting(0, "Training images held out for PGD early stopping (0: none).")
    holdout_pgd_steps: int = setting(10, "PGD steps of the held-out check.")
    holdout_pgd_step_size: float = setting(2.0, "PGD step size of the held-out check, pixels.")
    overfit_drop: float = setting(
        0.2, "Stop when held-out PGD accuracy falls this far below its best."
    )
    momentum: float = setting(0.9, "SGD momentum.")
    seed: int = setting(0, "Seed: initialisation, data order, augmentation, attack starts.")
    checkpoint_every: int = setting(100, "Steps between checkpoints (and held-out checks).")
    log_every: int = setting(10, "Steps between progress lines.")
    strategy: str = setting(
        "default",
        "tf.distribute strategy: one device, the devices of this "
        "host (mirrored), or the workers of TF_CONFIG (multi_worker).",
        choices=STRATEGIES,
    )
    jit_compile: bool = setting(False, "Compile the train step with XLA.")
    init_from: str | None = setting(
        None,
        "Start from these weights (.keras of the same width): "
        "fine-tuning, e.g. PGD after fast FGSM training.",
    )

    @property
    def attack_steps(self) -> int:
        """Attack steps per training batch (0: natural training)."""
        if not self.adversarial:
            return 0
        return 1 if self.attack == "fgsm" else self.pgd_steps

    @property
    def attack_step_size(self) -> float:
        return self.fgsm_step_factor * self.epsilon if self.attack == "fgsm" else self.pgd_step_size

    def validate(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}; got {self.attack!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}."
            )
        if not 0.0 < self.lr_peak < 1.0:
            raise ValueError(
                f"lr_peak must be in (0, 1) (a fraction of the steps); got {self.lr_peak}."
            )
        check_int(self.holdout, "holdout")
        check_int(self.holdout_pgd_steps, "holdout_pgd_steps", minimum=1)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}.")
        # Every float setting is checked even when unused (holdout=0, attack=pgd ...): a NaN
        # given on the command line is a mistake whether or not this run reads it.
        for name in ("epsilon", "pgd_step_size", "holdout_pgd_step_size"):
            validate_radius(getattr(self, name), name)
        for name in ("fgsm_step_factor", "lr_max"):
            check_positive(getattr(self, name), name)
        for name in ("awp_gamma", "trades_beta", "overfit_drop"):
            value = check_real(getattr(self, name), name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0 and finite; got {value}.")
        if not 0.0 <= check_real(self.momentum, "momentum") < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}.")
        for value in self.lr_values:
            check_positive(value, "lr_values")
        if self.width not in models.FILTERS:
            raise ValueError(f"width must be one of {sorted(models.FILTERS)}; got {self.width!r}.")
        if self.dataset not in data_lib.DATASETS:
            raise ValueError(f"dataset must be one of {data_lib.DATASETS}; got {self.dataset!r}.")
        if len(self.lr_values) != len(self.lr_boundaries) + 1:
            raise ValueError(
                f"need one more learning rate than boundaries; got boundaries {self.lr_boundaries} "
                f"and values {self.lr_values}."
            )
        if list(self.lr_boundaries) != sorted(self.lr_boundaries):
            raise ValueError(f"lr_boundaries must increase; got {self.lr_boundaries}.")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            check_int(getattr(self, name), name, minimum=1)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {self.strategy!r}.")


def _strategy(name: str, workers: Workers) -> tf.distribute.Strategy:
    if name == "multi_worker":
        if not workers.distributed:
            raise ValueError(
                "--strategy=multi_worker needs TF_CONFIG describing two or more workers "
                "(BUILD.md, 'Several machines')."
            )
        return workers.strategy
    if workers.distributed:
        raise ValueError(
            f"TF_CONFIG describes {workers.count} workers: train with "
            f"--strategy=multi_worker (got {name!r})."
        )
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def build_trainer(config: TrainConfig) -> AdversarialTrainer:
    """The base model in a compiled :class:`AdversarialTrainer` (call inside a strategy scope)."""
    base = models.madry_resnet(config.width)
    trainer = AdversarialTrainer(
        base,
        epsilon=config.epsilon if config.adversarial else 0.0,
        pgd_steps=config.attack_steps,
        pgd_step_size=config.attack_step_size,
        seed=config.seed,
        trades_beta=config.trades_beta if config.attack == "trades" else 0.0,
        ema_decay=config.ema_decay,
        awp_gamma=config.awp_gamma,
    )
    if config.lr_schedule == "cyclic":
        schedule = CyclicLearningRate(config.lr_max, config.steps, config.lr_peak)
    elif config.lr_boundaries:
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
            list(config.lr_boundaries), list(config.lr_values)
        )
    else:  # PiecewiseConstantDecay fails on an empty boundary list.
        schedule = float(config.lr_values[0])
    trainer.compile(
        optimizer=keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=config.jit_compile,
    )
    trainer.build((None, 32, 32, 3))
    trainer.optimizer.build(trainer.trainable_variables)
    return trainer


def train(
    config: TrainConfig,
    model_dir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    train_arrays: tuple[np.ndarray, np.ndarray] | None = None,
    workers: Workers = SINGLE,
) -> keras.Model:
    """Runs (or resumes) a training run and returns the trained base model (as saved).

    ``model_dir`` receives ``config.json``, ``checkpoints/`` (every ``checkpoint_every`` steps),
    ``logs/`` (TensorBoard) and ``final.keras``. A non-empty ``model_dir`` needs ``resume`` (which
    also checks that the saved config matches) or ``overwrite``.

    ``workers`` (:func:`manifold_tf.distributed.from_env`, with ``strategy="multi_worker"``): every
    worker trains on its share of each batch; only the chief writes into ``model_dir`` (the others
    save their checkpoints into scratch folders, as TensorFlow's multi-worker saving requires), and
    a resume restores every worker from the chief's checkpoint.
    """
    config.validate()
    free = ["strategy", "jit_compile", "log_every"]  # may change on resume
    if config.lr_schedule != "cyclic":  # a cyclic schedule is a function of the total steps
        free.append("steps")
    strategy = _strategy(config.strategy, workers)
    # The run store compares the saved config with this one and names every setting that differs
    # (on the other workers: with the chief's).
    RunStore(model_dir, resume=resume, overwrite=overwrite, workers=workers).bind(
        "train", dataclasses.asdict(config), free=free, settings_file="config.json"
    )
    own_dir = scratch_dir(model_dir, workers)  # where this worker writes: model_dir for the chief
    try:
        model = _run(
            config,
            model_dir,
            own_dir,
            strategy,
            workers,
            resume=resume,
            overwrite=overwrite,
            train_arrays=train_arrays,
        )
    finally:
        remove_scratch(own_dir, model_dir)
    workers.barrier("train done")  # the chief's files are complete when any worker returns
    return model


def _run(
    config: TrainConfig,
    model_dir: str,
    own_dir: str,
    strategy,
    workers: Workers,
    *,
    resume: bool,
    overwrite: bool,
    train_arrays,
) -> keras.Model:
    """The training run of :func:`train`, writing into ``own_dir`` (``model_dir`` on the chief)."""
    images, labels, held, history = _training_data(config, model_dir, resume, train_arrays)
    with strategy.scope():
        trainer = build_trainer(config)
        if config.init_from:
            source = checkpoints.load_model_weights(config.init_from, width=config.width)
            trainer.base.set_weights(source.get_weights())
            trainer.reset_average()
    manager, start = _restore(
        config, trainer, model_dir, own_dir, workers, history, resume=resume, overwrite=overwrite
    )
    callbacks = []
    if strategy.num_replicas_in_sync > 1:
        callbacks.append(
            training_callbacks.SyncStatistics(strategy, trainer.base.non_trainable_variables)
        )
    if config.holdout:
        callbacks.append(HoldoutMonitor(config, own_dir, *held, history))
    if start >= config.steps:
        logging.info(f"already trained for {start} >= {config.steps} steps")
    elif history.get("stopped"):
        logging.info(
            f"not resuming: the run stopped at step {history['stopped']['step']}: "
            f"{history['stopped']['reason']}"
        )
    else:
        _fit(config, trainer, manager, (images, labels), start, callbacks, own_dir)
    final = os.path.join(own_dir, FINAL_WEIGHTS)
    tmp = os.path.join(own_dir, ".tmp-" + FINAL_WEIGHTS)
    model = trainer.averaged_base()
    model.save(tmp)
    os.replace(tmp, final)
    if workers.is_chief:
        logging.info(f"final weights: {final}")
    return model


def _training_data(config: TrainConfig, model_dir: str, resume: bool, train_arrays):
    """``(images, labels, held, history)``: the training arrays (``train_arrays`` or loaded),
    without the held-out part ``held`` (``(x, y)``, or None without ``config.holdout``), and the
    held-out log ``history`` (the saved one on resume)."""
    if train_arrays is None:
        folder = config.data_dir or (
            data_lib.default_data_dir() if config.dataset == "cifar10" else None
        )
        train_arrays = data_lib.load_arrays(config.dataset, "train", folder)
    images, labels = train_arrays
    history_path = os.path.join(model_dir, HOLDOUT_LOG)
    history = {"entries": [], "best": None}
    held = None
    if config.holdout:
        images, labels, held_x, held_y = split_holdout(images, labels, config.holdout, config.seed)
        held = (held_x, held_y)
        if resume and os.path.exists(history_path):
            history = reporting.read_json(history_path)
    return images, labels, held, history


def _restore(
    config: TrainConfig,
    trainer: AdversarialTrainer,
    model_dir: str,
    own_dir: str,
    workers: Workers,
    history: dict,
    *,
    resume: bool,
    overwrite: bool,
) -> tuple[tf.train.CheckpointManager, int]:
    """``(manager, start)``: the checkpoint manager writing into ``own_dir`` and the step the run
    starts at (the chief's latest checkpoint's on resume, restored into ``trainer``; ``history``
    is cut back to it). ``overwrite`` clears the old checkpoints."""
    # Keras does not expose the trainer's own weights (the averages) to tf.train.Checkpoint: name
    # them.
    ckpt = tf.train.Checkpoint(
        model=trainer, optimizer=trainer.optimizer, average=list(trainer.average_variables)
    )
    manager = tf.train.CheckpointManager(
        ckpt, os.path.join(own_dir, CHECKPOINT_SUBDIR), max_to_keep=3
    )
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    start = 0
    if resume and latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        start = int(trainer.optimizer.iterations.numpy())
        history["entries"] = [e for e in history["entries"] if e["step"] <= start]
        if history["entries"]:
            history["best"] = max(history["entries"], key=lambda e: e["pgd_accuracy"])
        logging.info(f"resumed from {latest} at step {start}")
    elif overwrite and manager.latest_checkpoint and workers.is_chief:
        for name in os.listdir(manager.directory):
            os.remove(os.path.join(manager.directory, name))
        manager = tf.train.CheckpointManager(ckpt, manager.directory, max_to_keep=3)
    if start % config.checkpoint_every and start < config.steps:  # the last step may be off-grid
        raise ValueError(
            f"checkpoint step {start} is not a multiple of "
            f"checkpoint_every={config.checkpoint_every}."
        )
    return manager, start


def _fit(
    config: TrainConfig,
    trainer: AdversarialTrainer,
    manager: tf.train.CheckpointManager,
    train_arrays: tuple[np.ndarray, np.ndarray],
    start: int,
    callbacks: list,
    own_dir: str,
) -> None:
    """Trains from step ``start`` to ``config.steps`` on ``train_arrays`` (images ``[N, 32, 32,
    3]`` pixels, labels ``[N]``), checkpointing and logging into ``own_dir``."""
    images, labels = train_arrays
    ds = data_lib.make_dataset(
        images, labels, batch_size=config.batch_size, training=True, seed=config.seed
    ).skip(start)
    # One Keras "epoch" per checkpoint interval, so resuming is initial_epoch arithmetic.
    epochs = -(-config.steps // config.checkpoint_every)
    trainer.fit(
        ds,
        epochs=epochs,
        initial_epoch=start // config.checkpoint_every,
        steps_per_epoch=config.checkpoint_every,
        verbose=0,
        shuffle=False,
        callbacks=callbacks
        + [
            training_callbacks.ProgressLogger(
                start, config.steps, config.batch_size, config.log_every
            ),
            training_callbacks.Checkpointer(manager, trainer.optimizer, config.steps),
            keras.callbacks.TensorBoard(
                os.path.join(own_dir, "logs"), update_freq=config.log_every
            ),
        ],
    )
