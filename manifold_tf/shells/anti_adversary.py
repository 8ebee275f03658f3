"""The anti-adversary layer (Alfarra et al., AAAI 2022, "Combating Adversaries with
Anti-Adversaries") as a shell around a base.

At prediction time the input moves *against* an adversary: with ``y_hat = argmax F(x)`` (fixed at
``x``, as in the authors' code), ``z_{k+1} = z_k - alpha * sign(grad_z CE(F(z_k), y_hat))`` for
``K`` steps from ``z_0 = x``, and the answer is ``F(z_K)``: the input is pushed towards more
confidence in the label the base already predicts. The authors' release (``Anti_Adv.py``; their
README's CIFAR-10 command ``--k 2 --alpha 0.15`` on an AWP model that takes [0, 1] inputs
without normalisation) uses ``K = 2`` and ``alpha = 0.15`` of the range, i.e. 38.25 pixels per
step, with no projection (the two steps stay within ``K * alpha`` of ``x`` by construction) and
no clipping to the image box. Here every iterate is clipped to the box [0, 255] (the project's
convention) and, optionally, to a tighter ball ``N(x, radius)``. The steps ascend the log-odds of
``y_hat``, whose gradient is CE's up to a positive factor (the same signed steps) but does not
vanish where the softmax saturates in float32.

Units: pixels 0..255 for ``step_size`` and ``radius``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from manifold_tf import projected
from manifold_tf.shells.base import DEFAULT_JIT_COMPILE, FactorShell, jit_kwargs, log_odds
from manifold_tf.shells.registry import register
from manifold_tf.validation import check_int, validate_radius

# The authors' CIFAR-10 setting: K = 2 steps of 0.15 of the [0, 1] range.
ANTI_STEPS = 2
ANTI_STEP_SIZE = 0.15 * 255.0


@register("anti_adversary")
@keras.saving.register_keras_serializable(package="manifold_tf")
class AntiAdversaryShell(FactorShell):
    """Anti-adversary: ``K`` signed descent steps of ``CE(F(z), argmax F(x))``; output ``F(z_K)``.

    Args:
      base: Keras model, images ``[N, H, W, C]`` (pixels) -> logits ``[N, C]``.
      steps: ``K`` (authors: 2), each one forward+backward pass of the base.
      step_size: ``alpha`` in pixels (authors: 0.15 of the range = 38.25 pixels).
      radius: L-inf radius in pixels the iterates are projected onto; ``None`` (default, as the
        authors): ``steps * step_size``, which the signed steps never leave anyway.
      jit_compile: compile the search with XLA.

    ``embed(x)`` returns ``point`` ``[N, H, W, C]`` (``z_K``), ``z`` ``[N, C, H, W, C]`` (every
    label's slot is ``z_K``: BPDA's rows, see :meth:`FactorShell.bpda_approximation`),
    ``pseudo_label`` ``[N]`` (``argmax F(x)``), ``log_odds`` and ``confidences`` ``[N, C]`` at
    ``z_K``, ``label`` and ``probabilities``. Deterministic. Cost: ``K`` forward+backward passes
    and two forward passes (at ``x`` and at ``z_K``) of the base per image, one compiled call.
    """

    def __init__(
        self,
        base: keras.Model,
        *,
        steps: int = ANTI_STEPS,
        step_size: float = ANTI_STEP_SIZE,
        radius: float | None = None,
        jit_compile: bool = DEFAULT_JIT_COMPILE,
        **kwargs,
    ):
        self.steps = check_int(steps, "steps", 0)
        self.step_size = validate_radius(step_size, "step_size")
        self.radius = None if radius is None else validate_radius(radius, "radius")
        super().__init__(base, jit_compile=jit_compile, **kwargs)

    @classmethod
    def from_settings(
        cls, base: keras.Model, settings, *, delta: float, p: float, seed: int = 0
    ) -> AntiAdversaryShell:
        """The anti-adversary with ``anti_steps``, ``anti_step_size`` and ``anti_radius`` of the
        settings; ``delta``, ``p`` and ``seed`` are unused (its reach is ``K * alpha``; it is
        deterministic)."""
        del delta, p, seed
        return cls(
            base,
            steps=settings.anti_steps,
            step_size=settings.anti_step_size,
            radius=settings.anti_radius,
            **jit_kwargs(settings),
        )

    def _shell_config(self) -> dict:
        return dict(steps=self.steps, step_size=self.step_size, radius=self.radius)

    def settings(self) -> dict:
        """The settings of the shell (for reports), with the radius actually searched."""
        return dict(
            shell=self.kind,
            **self._shell_config(),
            search_radius=self.search_radius,
            jit_compile=self.jit_compile,
        )

    def passes_per_prediction(self) -> int:
        """``K``: one forward+backward pass per step (one point per image)."""
        return self.steps

    def proxy(self, *, steps: int | None = None, labels: int | None = None) -> AntiAdversaryShell:
        """The anti-adversary with ``steps`` steps of the same size (the radius the shell
        searches is kept); ``labels`` is ignored (one point per image)."""
        del labels
        steps = self.steps if steps is None else min(check_int(steps, "steps", 1), self.steps)
        if steps == self.steps:
            return self
        return self._cached_proxy(
            (steps, None), lambda: self._replace(steps=steps, radius=self.search_radius)
        )

    @property
    def search_radius(self) -> float:
        """Pixels: ``radius``, or ``steps * step_size`` (what ``K`` signed steps can reach)."""
        return float(self.steps * self.step_size if self.radius is None else self.radius)

    @property
    def rows_per_image(self) -> int:
        """1: one point per image."""
        return 1

    def _embed_graph(self, x: tf.Tensor) -> dict:
        pseudo = tf.argmax(self._logits(x), axis=-1, output_type=tf.int32)

        # Descending CE(F(z), y_hat) = ascending log F_yhat. Its gradient is the log-odds'
        # times (1 - F_yhat) > 0: the same signed steps. The log-odds are ascended because in
        # float32 1 - F_yhat rounds to 0 once the margin passes ~17, and the CE's gradient then
        # loses the y_hat term (it points along the other labels' weights alone).
        def objective(z):
            return log_odds(self._logits(z), pseudo)

        z, _ = projected.projected_ascent(
            objective,
            x,
            x,
            radius=self.search_radius,
            steps=self.steps,
            step_size=self.step_size,
            optimizer="sign",
            return_best=False,
            unroll=self.jit_compile and self.steps <= 32,
        )
        return self._at_point(z, pseudo_label=pseudo)
