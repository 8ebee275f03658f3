"""The Keras model that trains a base classifier: the attack inside ``train_step``, and its extras.

:class:`AdversarialTrainer` replaces each batch by adversarial examples before the update: Madry's
PGD-k (random start, cross-entropy, last iterate), fast FGSM from a random start (Wong et al. 2020,
``pgd_steps=1``), or TRADES (Zhang et al. 2019: the attack ascends the KL to the clean prediction,
the loss adds ``beta`` times that KL). Optional extras: an exponential moving average of the
weights (``ema_decay``) and adversarial weight perturbation (``awp_gamma``, Wu et al. 2020).
:class:`CyclicLearningRate` is the one-cycle schedule of fast adversarial training.
:mod:`manifold_tf.training` drives it (configs, checkpoints, resume, workers).

The attacks run the model in inference mode (BN moving statistics, no updates), so attack steps do
not move the BN averages; the training step itself uses batch statistics as usual.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from manifold_tf.projected import project, projected_ascent, random_start
from manifold_tf.validation import check_int, validate_radius


@keras.saving.register_keras_serializable(package="manifold_tf")
class CyclicLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Triangular one-cycle schedule: 0 at step 0, ``peak_lr`` at ``peak * total_steps``, 0 at end.

    Wong et al.'s schedule for fast adversarial training (linear up for 2/5 of the run, then down).
    """

    def __init__(self, peak_lr: float, total_steps: int, peak: float = 0.4):
        self.peak_lr = float(peak_lr)
        self.total_steps = check_int(total_steps, "total_steps", minimum=1)
        self.peak = float(peak)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        top = self.peak * self.total_steps
        up = step / top
        down = (self.total_steps - step) / (self.total_steps - top)
        return self.peak_lr * tf.maximum(0.0, tf.minimum(up, down))

    def get_config(self) -> dict:
        return {"peak_lr": self.peak_lr, "total_steps": self.total_steps, "peak": self.peak}


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
      trades_beta: > 0 trains with TRADES (Zhang et al. 2019) instead: the attack ascends
        ``KL(F(x) || F(x'))`` and the loss is ``CE(F(x), y) + trades_beta * KL(F(x) || F(x'))``.
      ema_decay: > 0 keeps an exponential moving average of every base weight, BN statistics
        included, updated after each step with decay ``min(ema_decay, (1 + t) / (10 + t))`` at
        optimizer step ``t`` (so it starts at the initial weights, e.g. ``init_from``'s, and forgets
        them quickly). :meth:`averaged_base` returns the averaged model. Averaging the last few
        epochs' weights smooths the epoch-to-epoch swings of adversarial training's robust accuracy
        (Gowal et al. 2020 report +1-2 points of PGD accuracy).
      awp_gamma: > 0 adds adversarial weight perturbation (Wu et al. 2020) of this relative size to
        every step (:meth:`_perturb_weights`); 5e-3 is the paper's value.
    """

    def __init__(
        self,
        base: keras.Model,
        *,
        epsilon: float = 8.0,
        pgd_steps: int = 7,
        pgd_step_size: float = 2.0,
        seed: int = 0,
        trades_beta: float = 0.0,
        ema_decay: float = 0.0,
        awp_gamma: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not pgd_step_size >= 0:  # also refuses NaN
            raise ValueError(f"pgd_step_size must be >= 0 (pixels); got {pgd_step_size}.")
        self.base = base
        self.epsilon = validate_radius(epsilon, "epsilon")
        self.pgd_steps = check_int(pgd_steps, "pgd_steps")
        self.pgd_step_size = float(pgd_step_size)
        self.seed = int(seed)
        self.trades_beta = float(trades_beta)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {ema_decay}.")
        self.ema_decay = float(ema_decay)
        if awp_gamma < 0:
            raise ValueError(f"awp_gamma must be >= 0; got {awp_gamma}.")
        self.awp_gamma = float(awp_gamma)
        self._average: list = []

    def build(self, input_shape):
        self.base.build(input_shape)
        if self.ema_decay and not self._average:
            # "mean" aggregation: every replica computes the same average; mirrored like BN
            # statistics.
            self._average = [
                self.add_weight(
                    shape=w.shape,
                    initializer=keras.initializers.Constant(w.numpy()),
                    trainable=False,
                    aggregation="mean",
                    name="average_" + w.name.replace("/", "_"),
                )
                for w in self.base.weights
            ]
        self.built = True

    def _update_average(self) -> None:
        t = tf.cast(self.optimizer.iterations, tf.float32)
        decay = tf.minimum(self.ema_decay, (1.0 + t) / (10.0 + t))
        for average, w in zip(self._average, self.base.weights, strict=True):
            average.assign(decay * average + (1.0 - decay) * tf.cast(w, average.dtype))

    @property
    def average_variables(self) -> list:
        """The averaged copies of the base's weights (empty without ``ema_decay``)."""
        return list(self._average)

    def reset_average(self) -> None:
        """Restarts the average at the base's current weights (after loading ``init_from``)."""
        for average, w in zip(self._average, self.base.weights, strict=True):
            average.assign(tf.cast(w, average.dtype))

    def averaged_base(self) -> keras.Model:
        """The base model with the averaged weights (a copy); the base itself without averaging."""
        if not self._average:
            return self.base
        clone = keras.models.clone_model(self.base)
        clone.set_weights([a.numpy() for a in self._average])
        return clone

    @property
    def adversarial(self) -> bool:
        return self.pgd_steps > 0 and self.epsilon > 0

    def call(self, x, training=False):
        return self.base(x, training=training)

    def perturb(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """PGD adversarial examples ``[B, 32, 32, 3]`` for the batch, in N(x, epsilon)."""
        seed = self._seed()

        def loss(z):
            logits = self.base(z, training=False)
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

        z0 = random_start(x, self.epsilon, seed)
        z, _ = projected_ascent(
            loss,
            x,
            z0,
            radius=self.epsilon,
            steps=self.pgd_steps,
            step_size=self.pgd_step_size,
            return_best=False,
        )
        return tf.stop_gradient(z)

    def _seed(self) -> tf.Tensor:
        step = tf.cast(self.optimizer.iterations, tf.int32)
        replica = tf.distribute.get_replica_context()
        replica_id = tf.cast(replica.replica_id_in_sync_group, tf.int32) if replica else 0
        return tf.stack([tf.constant(self.seed, tf.int32), step * 64 + replica_id])

    def perturb_kl(self, x: tf.Tensor) -> tf.Tensor:
        """TRADES' inner maximisation: ``x'`` in N(x, epsilon) ascending ``KL(F(x) || F(x'))``."""
        p = tf.stop_gradient(tf.nn.softmax(self.base(x, training=False)))
        log_p = tf.math.log(p + 1e-12)

        def kl(z):
            return tf.reduce_sum(p * (log_p - tf.nn.log_softmax(self.base(z, training=False))), -1)

        # TRADES starts at x plus small Gaussian noise (std 0.001 of the range).
        noise = tf.random.stateless_normal(tf.shape(x), seed=self._seed()) * (0.001 * 255.0)
        z, _ = projected_ascent(
            kl,
            x,
            project(x + noise, x, self.epsilon),
            radius=self.epsilon,
            steps=self.pgd_steps,
            step_size=self.pgd_step_size,
            return_best=False,
        )
        return tf.stop_gradient(z)

    def train_step(self, data):
        logs = self._train_step(data)
        if self._average:
            self._update_average()
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras reduces the logs of multi-worker steps with MEAN along axis 0, which scalars
            # lack (Keras 3.x): give them one; the reduction returns scalars again.
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    @property
    def trades(self) -> bool:
        return self.adversarial and self.trades_beta > 0

    def _train_step(self, data):
        x, y = data[0], data[1]
        y = tf.cast(y, tf.int32)
        if not (self.trades or self.awp_gamma):  # Keras' own step on the (adversarial) batch
            if self.adversarial:
                x = self.perturb(x, y)
            return super().train_step((x, y))
        if self.trades:
            x_adv = self.perturb_kl(x)
        else:
            x_adv = self.perturb(x, y) if self.adversarial else x
        shifts = self._perturb_weights(x, x_adv, y) if self.awp_gamma else []
        with tf.GradientTape() as tape:
            loss, logits = self._objective(x, x_adv, y)
            # Gradients are summed over replicas: scale each replica's loss accordingly.
            scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
        grads = tape.gradient(scaled, self.trainable_variables)
        for w, v in shifts:  # back to the unperturbed weights before the update
            w.assign_sub(v)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        self._loss_tracker.update_state(loss)
        # The metrics read the clean batch under TRADES, else the adversarial one (as Keras' step).
        return self.compute_metrics(x, y, logits, sample_weight=None)

    def _objective(self, x, x_adv, y) -> tuple[tf.Tensor, tf.Tensor]:
        """The training loss at the current weights, and the logits the metrics read.

        TRADES: ``CE(F(x), y) + beta * KL(F(x) || F(x'))`` (metrics on ``F(x)``); otherwise
        ``CE(F(x'), y)`` (metrics on ``F(x')``); plus the base's weight decay.
        """
        if self.trades:
            logits = self.base(x, training=True)
            logits_adv = self.base(x_adv, training=True)
            ce = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            )
            log_p = tf.nn.log_softmax(logits)
            kl = tf.reduce_mean(
                tf.reduce_sum(tf.exp(log_p) * (log_p - tf.nn.log_softmax(logits_adv)), -1)
            )
            loss = ce + self.trades_beta * kl
        else:
            logits = self.base(x_adv, training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            )
        if self.base.losses:  # weight decay
            loss = loss + tf.add_n(self.base.losses)
        return loss, logits

    def _perturb_weights(self, x, x_adv, y) -> list:
        """Adversarial weight perturbation (Wu et al. 2020): moves every kernel ``w`` (rank >= 2;
        biases and BN parameters stay) by ``v = awp_gamma * ||w|| * g / ||g||``, ``g`` its gradient
        of the training loss, i.e. one layer-wise normalised ascent step. Returns the ``(w, v)``
        pairs.

        The step's gradient is then taken at ``w + v``: a flatter, more robust minimum, and much
        less robust overfitting on small data. Its extra forward passes also update the BN moving
        statistics (Keras offers no training-mode call without), with the same batch.
        """
        kernels = [w for w in self.base.trainable_variables if len(w.shape) > 1]
        with tf.GradientTape() as tape:
            loss, _ = self._objective(x, x_adv, y)
        shifts = []
        for w, g in zip(kernels, tape.gradient(loss, kernels), strict=True):
            v = self.awp_gamma * tf.norm(w) * g / (tf.norm(g) + 1e-12)
            w.assign_add(v)
            shifts.append((w, v))
        return shifts

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds its metrics from one batch: under MultiWorkerMirroredStrategy it averages the
        # replicas' batches with an eager collective that fails on PerReplica values (Keras 3.x).
        # One replica's batch has the same shapes.
        if iterator is not None and isinstance(
            self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy
        ):
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(
                    lambda v: self.distribute_strategy.experimental_local_results(v)[0], batch
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            base=keras.saving.serialize_keras_object(self.base),
            epsilon=self.epsilon,
            pgd_steps=self.pgd_steps,
            pgd_step_size=self.pgd_step_size,
            seed=self.seed,
            trades_beta=self.trades_beta,
            ema_decay=self.ema_decay,
            awp_gamma=self.awp_gamma,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base"] = keras.saving.deserialize_keras_object(config["base"])
        return cls(**config)
