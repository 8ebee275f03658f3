"""MCN_delta (paper, Algorithm 1): the most confident point of ``N(x, delta)`` for every label."""

from __future__ import annotations

import keras
import tensorflow as tf

from manifold_tf import projected
from manifold_tf.shells.base import DEFAULT_JIT_COMPILE, FactorShell, log_odds
from manifold_tf.validation import check_choice, check_int, validate_radius

OPTIMIZERS = ("pgd", "adam")
# XLA on CPU runs a tf.while_loop several times slower than the unrolled steps; past a few dozen
# steps the unrolled graph's compile time would dominate.
MAX_UNROLLED_STEPS = 32


@keras.saving.register_keras_serializable(package="manifold_tf")
class MCNShell(FactorShell):
    """MCN_delta (Algorithm 1): for every label ``t``, ``z_t = argmax_{z in N(x, delta)} F(z)_t``.

    The optimiser ascends the log-odds ``log(F(z)_t / (1 - F(z)_t))`` over ``N(x, delta)`` (the L-inf
    ball, intersected with the pixel box): the same maximiser as ``log F(z)_t``, and the same signed
    steps, but no float32 saturation (see :func:`log_odds`). ``t* = argmax_t F(z_t)_t``, compared by
    log-odds so that saturated candidates still rank (ties go to the smaller label); the output is
    ``F(z_t*)``.

    Args:
      base: Keras model, images ``[N, H, W, C]`` (pixels) -> logits ``[N, C]``.
      delta: the radius of ``N(x, delta)`` in pixels (8 means 8/255). ``delta = 0`` returns the
        base model's probabilities at ``x``.
      optimizer: ``"pgd"`` (``steps`` signed steps of ``step_size`` pixels, best iterate kept) or
        ``"adam"`` (Adam on ``z`` with learning rate ``step_size`` pixels, projected each step).
      steps: ``K``, forward+backward passes per label.
      step_size: pixels; default ``2.5 * delta / steps`` (Madry et al.'s rule).
      random_start: start each ascent at a uniform point of the ball instead of at ``x``
        (stateless RNG from ``seed``; the draw depends on the batch layout, so a point's output can
        then depend on which other points share its batch).
      seed: int, the random start's seed.
      jit_compile: compile the embedding with XLA (once per batch size; see DEFAULT_JIT_COMPILE).

    ``embed(x)`` returns ``z`` ``[N, C, H, W, 3]``, ``label`` ``[N]`` (``t*``), ``confidences``
    ``[N, C]`` (``F(z_t)_t``), ``log_odds`` ``[N, C]`` (the same, as log-odds: finite where a
    confidence rounds to 0 or 1) and ``probabilities`` ``[N, C]``. Cost: ``C * K``
    forward+backward passes and ``C + 1`` forward passes per image.
    """

    def __init__(
        self,
        base: keras.Model,
        delta: float = 8.0,
        *,
        optimizer: str = "pgd",
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = False,
        seed: int = 0,
        jit_compile: bool = DEFAULT_JIT_COMPILE,
        **kwargs,
    ):
        self.delta = validate_radius(delta, "delta")
        self.optimizer_name = check_choice(optimizer, "optimizer", OPTIMIZERS)
        self.steps = check_int(steps, "steps", 0)
        if step_size is None:
            step_size = 2.5 * self.delta / max(self.steps, 1)
        self.step_size = validate_radius(step_size, "step_size")
        self.random_start = bool(random_start)
        self.seed = int(seed)
        super().__init__(base, jit_compile=jit_compile, **kwargs)

    def _shell_config(self) -> dict:
        return dict(delta=self.delta, optimizer=self.optimizer_name, steps=self.steps,
                    step_size=self.step_size, random_start=self.random_start, seed=self.seed)

    def settings(self) -> dict:
        """The settings of the shell (for reports)."""
        return dict(shell="mcn", **self._shell_config(), jit_compile=self.jit_compile)

    def _embed_graph(self, x: tf.Tensor) -> dict:
        xt, labels = self._tile(x)

        def objective(z):
            return log_odds(self._logits(z), labels)

        z0 = xt
        if self.random_start:
            z0 = projected.random_start(xt, self.delta, tf.constant([self.seed, 0], tf.int64))
        z, score = projected.projected_ascent(
            objective, xt, z0, radius=self.delta, steps=self.steps, step_size=self.step_size,
            optimizer="sign" if self.optimizer_name == "pgd" else "adam",
            unroll=self.jit_compile and self.steps <= MAX_UNROLLED_STEPS,
        )
        z, score = self._per_label(z), self._per_label(score)
        label = tf.argmax(score, axis=1, output_type=tf.int32)
        return dict(z=z, label=label, confidences=tf.sigmoid(score), log_odds=score,
                    probabilities=self._output(z, label))
