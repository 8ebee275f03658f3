"""Natural and PGD-adversarial training as Madry et al. did it, Keras-native and resumable.

:class:`AdversarialTrainer` wraps a base model; its compiled ``train_step`` replaces each batch by
its PGD adversarial examples (random start, cross-entropy, ``k`` signed steps, last iterate, as in
Madry's ``pgd_attack.py``) before the usual Keras step. :func:`train` drives ``fit`` with
Madry's optimiser (SGD, momentum 0.9, piecewise-constant learning rate), checkpoints every N
steps, resumes to the same weights an uninterrupted run reaches, logs to TensorBoard and writes the
final base model as ``final.keras``.

One deliberate difference from Madry's TF1 code: the attack runs the model in inference mode (BN
moving statistics, no statistics updates), so attack steps do not move the BN averages; the
training step itself uses batch statistics as usual.
"""

from __future__ import annotations

import dataclasses
import os
import time

import keras
import numpy as np
import tensorflow as tf

from manifold_tf import data as data_lib
from manifold_tf import models, reporting
from manifold_tf.projected import projected_ascent, random_start

FINAL_WEIGHTS = "final.keras"
CHECKPOINT_SUBDIR = "checkpoints"


@keras.saving.register_keras_serializable(package="manifold_tf")
class AdversarialTrainer(keras.Model):
    """Trains ``base`` on PGD adversarial examples generated inside ``train_step``.

    Args:
      base: a Keras classifier, ``[N, 32, 32, 3]`` pixels in 0..255 -> logits ``[N, C]``.
      epsilon: L-inf budget in pixels (0 with ``pgd_steps=0`` is natural training).
      pgd_steps: attack steps ``k`` per batch (0: natural training).
      pgd_step_size: pixels per signed step.
      seed: seeds the random starts (stateless, keyed by the optimizer step, so a resumed run
        draws the same starts as an uninterrupted one).
    """

    def __init__(
        self,
        base: keras.Model,
        *,
        epsilon: float = 8.0,
        pgd_steps: int = 7,
        pgd_step_size: float = 2.0,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if epsilon < 0 or pgd_steps < 0 or pgd_step_size < 0:
            raise ValueError(
                f"epsilon, pgd_steps and pgd_step_size must be >= 0; got {epsilon}, {pgd_steps}, "
                f"{pgd_step_size}."
            )
        self.base = base
        self.epsilon = float(epsilon)
        self.pgd_steps = int(pgd_steps)
        self.pgd_step_size = float(pgd_step_size)
        self.seed = int(seed)

    @property
    def adversarial(self) -> bool:
        return self.pgd_steps > 0 and self.epsilon > 0

    def call(self, x, training=False):
        return self.base(x, training=training)

    def perturb(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """PGD adversarial examples ``[B, 32, 32, 3]`` for the batch, in N(x, epsilon)."""
        step = tf.cast(self.optimizer.iterations, tf.int32)
        replica = tf.distribute.get_replica_context()
        replica_id = tf.cast(replica.replica_id_in_sync_group, tf.int32) if replica else 0
        seed = tf.stack([tf.constant(self.seed, tf.int32), step * 64 + replica_id])

        def loss(z):
            logits = self.base(z, training=False)
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

        z0 = random_start(x, self.epsilon, seed)
        z, _ = projected_ascent(
            loss, x, z0, radius=self.epsilon, steps=self.pgd_steps,
            step_size=self.pgd_step_size, return_best=False,
        )
        return tf.stop_gradient(z)

    def train_step(self, data):
        x, y = data[0], data[1]
        if self.adversarial:
            x = self.perturb(x, tf.cast(y, tf.int32))
        return super().train_step((x, y))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            base=keras.saving.serialize_keras_object(self.base),
            epsilon=self.epsilon,
            pgd_steps=self.pgd_steps,
            pgd_step_size=self.pgd_step_size,
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base"] = keras.saving.deserialize_keras_object(config["base"])
        return cls(**config)


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the model dir)."""

    width: str = "narrow"
    dataset: str = "cifar10"
    data_dir: str | None = None
    adversarial: bool = False
    epsilon: float = 8.0
    pgd_steps: int = 7
    pgd_step_size: float = 2.0
    batch_size: int = 128
    steps: int = 80000
    lr_boundaries: tuple[int, ...] = (40000, 60000)
    lr_values: tuple[float, ...] = (0.1, 0.01, 0.001)
    momentum: float = 0.9
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    strategy: str = "default"
    jit_compile: bool = False

    def validate(self) -> None:
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
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}.")
        if self.steps % self.checkpoint_every:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of checkpoint_every "
                f"({self.checkpoint_every}), so that every run ends on a checkpoint."
            )
        if self.strategy not in ("default", "mirrored"):
            raise ValueError(f"strategy must be 'default' or 'mirrored'; got {self.strategy!r}.")


class _ProgressLogger(keras.callbacks.Callback):
    """Prints step counts, examples/s, ETA and the running loss/accuracy every ``every`` steps."""

    def __init__(self, start_step: int, total_steps: int, batch_size: int, every: int):
        super().__init__()
        self.progress = reporting.Progress(total_steps, "train", unit="steps", initial=start_step)
        self.batch_size = batch_size
        self.every = every

    def on_train_batch_end(self, batch, logs=None):
        self.progress.done += 1
        if self.progress.done % self.every == 0 or self.progress.done == self.progress.total:
            logs = logs or {}
            ex_s = self.progress.rate * self.batch_size
            metrics = ", ".join(f"{k} {float(v):.4f}" for k, v in logs.items())
            print(f"{self.progress.line()}, {ex_s:.1f} examples/s, {metrics}", flush=True)


class _Checkpointer(keras.callbacks.Callback):
    def __init__(self, manager: tf.train.CheckpointManager, optimizer):
        super().__init__()
        self.manager = manager
        self.optimizer = optimizer

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.optimizer.iterations.numpy())
        path = self.manager.save(checkpoint_number=step)
        print(f"checkpoint: {path}", flush=True)


def _strategy(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def build_trainer(config: TrainConfig) -> AdversarialTrainer:
    """The base model wrapped in a compiled :class:`AdversarialTrainer` (call inside a strategy scope)."""
    base = models.madry_resnet(config.width)
    trainer = AdversarialTrainer(
        base,
        epsilon=config.epsilon if config.adversarial else 0.0,
        pgd_steps=config.pgd_steps if config.adversarial else 0,
        pgd_step_size=config.pgd_step_size,
        seed=config.seed,
    )
    if config.lr_boundaries:
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


def _config_path(model_dir: str) -> str:
    return os.path.join(model_dir, "config.json")


def train(
    config: TrainConfig,
    model_dir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    train_arrays: tuple[np.ndarray, np.ndarray] | None = None,
) -> keras.Model:
    """Runs (or resumes) a training run and returns the trained base model.

    ``model_dir`` receives ``config.json``, ``checkpoints/`` (every ``checkpoint_every`` steps),
    ``logs/`` (TensorBoard) and ``final.keras``. A non-empty ``model_dir`` needs ``resume`` (which
    also checks that the saved config matches) or ``overwrite``.
    """
    config.validate()
    reporting.prepare_output_dir(model_dir, overwrite=overwrite, resume=resume)
    saved = _config_path(model_dir)
    if resume and os.path.exists(saved):
        previous = reporting.read_json(saved)
        mine = reporting._to_jsonable(dataclasses.asdict(config))
        diff = {k: (previous.get(k), v) for k, v in mine.items() if previous.get(k) != v}
        for free in ("strategy", "jit_compile", "steps", "log_every"):  # may change on resume
            diff.pop(free, None)
        if diff:
            raise ValueError(
                f"--resume with settings that differ from the run in {model_dir!r}: "
                + ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            )
    reporting.write_json(saved, dataclasses.asdict(config))

    if train_arrays is None:
        train_arrays = data_lib.load_arrays(config.dataset, "train", config.data_dir)
    images, labels = train_arrays

    strategy = _strategy(config.strategy)
    with strategy.scope():
        trainer = build_trainer(config)
    ckpt = tf.train.Checkpoint(model=trainer, optimizer=trainer.optimizer)
    manager = tf.train.CheckpointManager(
        ckpt, os.path.join(model_dir, CHECKPOINT_SUBDIR), max_to_keep=3
    )
    start = 0
    if resume and manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        start = int(trainer.optimizer.iterations.numpy())
        print(f"resumed from {manager.latest_checkpoint} at step {start}", flush=True)
    elif overwrite and manager.latest_checkpoint:
        for name in os.listdir(manager.directory):
            os.remove(os.path.join(manager.directory, name))
        manager = tf.train.CheckpointManager(ckpt, manager.directory, max_to_keep=3)
    if start % config.checkpoint_every:
        raise ValueError(
            f"checkpoint step {start} is not a multiple of checkpoint_every={config.checkpoint_every}."
        )
    if start >= config.steps:
        print(f"already trained for {start} >= {config.steps} steps", flush=True)
    else:
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
            callbacks=[
                _ProgressLogger(start, epochs * config.checkpoint_every, config.batch_size, config.log_every),
                _Checkpointer(manager, trainer.optimizer),
                keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), update_freq=config.log_every),
            ],
        )
    final = os.path.join(model_dir, FINAL_WEIGHTS)
    tmp = os.path.join(model_dir, ".tmp-" + FINAL_WEIGHTS)
    trainer.base.save(tmp)
    os.replace(tmp, final)
    print(f"final weights: {final}", flush=True)
    return trainer.base
