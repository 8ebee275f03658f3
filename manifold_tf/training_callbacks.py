"""The Keras callbacks of a training run (:mod:`manifold_tf.training`): progress lines, batch-norm
statistics averaged over replicas, and checkpoints that are safe points for SIGINT/SIGTERM."""

from __future__ import annotations

import keras
import tensorflow as tf
from absl import logging

from manifold_tf import interrupts, reporting


class ProgressLogger(keras.callbacks.Callback):
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
            logging.info(f"{self.progress.line()}, {ex_s:.1f} examples/s, {metrics}")


class SyncStatistics(keras.callbacks.Callback):
    """Averages the BN moving statistics over the replicas at the end of each checkpoint interval.

    Keras updates them per replica from the replica's own batch, so under a multi-replica strategy
    each worker would otherwise hold (measure on held-out data, and save) slightly different
    statistics; their mean approximates statistics over the global batch. Runs before the held-out
    check, so every worker measures the same model and takes the same early-stopping decision.
    """

    def __init__(self, strategy: tf.distribute.Strategy, variables: list):
        super().__init__()
        self.strategy = strategy
        self.variables = variables

    def on_epoch_end(self, epoch, logs=None):
        for v in self.variables:
            local = self.strategy.run(lambda v=v: tf.identity(v))
            v.assign(self.strategy.reduce(tf.distribute.ReduceOp.MEAN, local, axis=None))


class Checkpointer(keras.callbacks.Callback):
    """Saves a checkpoint at the end of every interval and at the last step (``total``), which
    ends the run: ``steps`` need not be a multiple of ``checkpoint_every``. Each saved checkpoint is
    a safe point (:func:`manifold_tf.interrupts.check`) where a SIGINT/SIGTERM stops the run."""

    def __init__(self, manager: tf.train.CheckpointManager, optimizer, total: int | None = None):
        super().__init__()
        self.manager = manager
        self.optimizer = optimizer
        self.total = total

    def on_train_batch_end(self, batch, logs=None):
        if self.total is not None and int(self.optimizer.iterations.numpy()) >= self.total:
            self.model.stop_training = True  # Keras still ends the epoch: on_epoch_end saves

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.optimizer.iterations.numpy())
        path = self.manager.save(checkpoint_number=step)
        logging.info(f"checkpoint: {path}")
        interrupts.check(f"after checkpoint {path}")
