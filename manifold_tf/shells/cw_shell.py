"""The paper's "CarliniWagnerShell": Carlini-Wagner L-inf as the search factor (METHOD.md).

Two variants:

- ``"paper_code"``: what the authors' code did. For every label but the base prediction at ``x``,
  the targeted CW L-inf attack with ``tau = 255 / 32`` fixed and constants 1e-5 then 0.1 (Adam
  state kept between them), at most ``max_iterations`` steps per constant; a failed label's
  candidate is ``x`` and the prediction's own candidate is ``x``. Each candidate is scored by the
  base's *top* label and confidence at it (which need not be its target), and the shell answers
  the one-hot vector of the most confident candidate's top label.
- ``"all_labels"``: every label, ``tau = delta``, one constant ``const``; ``z_t`` is the CW result
  projected into ``N(x, delta)`` (the CW penalty is soft) and scored by ``F(z_t)_t``. CW stops as
  soon as ``t`` is the argmax, so this does *not* maximise ``F_t`` as Algorithm 1 asks (the
  predicted label's candidate never moves from ``x``): it is a CW-stopped search, offered to compare
  with the paper's code, not as MCN_delta (that is :class:`~manifold_tf.shells.MCNShell`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from manifold_tf import projected
from manifold_tf.cw_search import CWSettings, cw_inner, cw_schedule, to_tanh_space
from manifold_tf.shells.base import DEFAULT_JIT_COMPILE, FactorShell, Scores, jit_kwargs, log_odds
from manifold_tf.shells.registry import register
from manifold_tf.validation import (
    PIXEL_MAX,
    check_choice,
    check_int,
    check_positive,
    validate_radius,
)

VARIANTS = ("paper_code", "all_labels")
# tau fixed at 1/32 of the range, constants 1e-5 then 0.1 (const_factor 10000 under a largest
# constant of 20): the authors' settings.
PAPER_CODE_TAU = PIXEL_MAX / 32.0
PAPER_CODE_CONSTS = dict(initial_const=1e-5, const_factor=1e4, largest_const=20.0)


@register("cw")
@keras.saving.register_keras_serializable(package="manifold_tf")
class CarliniWagnerShell(FactorShell):
    """The paper's CarliniWagnerShell (see the module docstring for the two variants).

    Args:
      base: Keras model, images ``[N, H, W, C]`` (pixels) -> logits ``[N, C]``.
      variant: ``"paper_code"`` or ``"all_labels"``.
      delta: ``tau`` and the projection radius of ``"all_labels"``, pixels (unused by
        ``"paper_code"``, whose tau is 255 / 32).
      const: the CW constant of ``"all_labels"``.
      max_iterations: Adam steps per constant (the paper: 1000; default CPU-cheap 100).
      learning_rate: Adam's, in tanh space (the paper: 5e-3).
      jit_compile: compile the embedding with XLA.

    ``embed(x)`` returns ``z`` ``[N, C, H, W, 3]``, ``label`` ``[N]``, ``confidences`` and
    ``log_odds`` ``[N, C]`` (``paper_code``: each candidate's top confidence; ``all_labels``:
    ``F(z_t)_t``), ``probabilities`` ``[N, C]`` (one-hot for ``paper_code``), ``cw_success``
    ``[N, C]`` (the CW run met its goal) and ``candidate_labels`` ``[N, C]`` (top label at each
    ``z_t``).
    """

    def __init__(
        self,
        base: keras.Model,
        *,
        variant: str = "paper_code",
        delta: float = 8.0,
        const: float = 0.1,
        max_iterations: int = 100,
        learning_rate: float = 5e-3,
        jit_compile: bool = DEFAULT_JIT_COMPILE,
        **kwargs,
    ):
        self.variant = check_choice(variant, "variant", VARIANTS)
        self.delta = validate_radius(delta, "delta")
        self.const = check_positive(const, "const")
        self.max_iterations = check_int(max_iterations, "max_iterations", 1)
        self.learning_rate = check_positive(learning_rate, "learning_rate")
        super().__init__(base, jit_compile=jit_compile, **kwargs)

    @classmethod
    def from_settings(
        cls, base: keras.Model, settings, *, delta: float, p: float, seed: int = 0
    ) -> CarliniWagnerShell:
        """The cw shell from the evaluation's settings (``cw_variant``, ``cw_const``,
        ``cw_max_iterations``, ``jit_compile``) and ``delta`` (all_labels' tau); ``p`` and
        ``seed`` are unused (it is deterministic)."""
        del p, seed
        return cls(
            base,
            variant=settings.cw_variant,
            delta=delta,
            const=settings.cw_const,
            max_iterations=settings.cw_max_iterations,
            **jit_kwargs(settings),
        )

    def _shell_config(self) -> dict:
        return dict(
            variant=self.variant,
            delta=self.delta,
            const=self.const,
            max_iterations=self.max_iterations,
            learning_rate=self.learning_rate,
        )

    def passes_per_prediction(self) -> int:
        """``C * 2 * max_iterations``: up to ``max_iterations`` Adam steps per constant, two
        constants (paper_code; all_labels runs one, so this is an upper bound), ``C`` rows."""
        return self.num_classes * 2 * self.max_iterations

    def proxy(self, *, steps: int | None = None, labels: int | None = None) -> CarliniWagnerShell:
        """The CW shell with ``steps`` Adam iterations per constant instead of
        ``max_iterations``; ``labels`` is ignored (its candidates are scored by their top
        label)."""
        del labels
        steps = (
            self.max_iterations
            if steps is None
            else min(check_int(steps, "steps", 1), self.max_iterations)
        )
        if steps == self.max_iterations:
            return self
        return self._cached_proxy((steps, None), lambda: self._replace(max_iterations=steps))

    @property
    def search_radius(self) -> float:
        """Pixels: ``delta`` for ``all_labels`` (its tau and projection radius); ``tau = 255 / 32``
        for ``paper_code`` (its candidates lie within tau of ``x``; ``delta`` is unused there)."""
        return self.delta if self.variant == "all_labels" else PAPER_CODE_TAU

    def scores(self, out: dict) -> Scores:
        """``all_labels``: as MCN (slot ``t`` is label ``t``, ranked by ``lo_t(z_t)``).
        ``paper_code``: slot ``t`` stands for its candidate's *top* label (``candidate_labels``),
        ranked by that label's log-odds."""
        sc = super().scores(out)
        if self.variant == "paper_code" and "candidate_labels" in out:
            sc = sc._replace(label=np.asarray(out["candidate_labels"]).astype(np.int32))
        return sc

    def settings(self) -> dict:
        """The settings that matter for the variant (for reports)."""
        s = dict(
            shell=self.kind,
            variant=self.variant,
            max_iterations=self.max_iterations,
            learning_rate=self.learning_rate,
        )
        if self.variant == "all_labels":
            s.update(delta=self.delta, const=self.const)
        else:
            s.update(tau=PAPER_CODE_TAU, **PAPER_CODE_CONSTS)
        s.update(jit_compile=self.jit_compile)
        return s

    def _embed_graph(self, x: tf.Tensor) -> dict:
        if self.variant == "paper_code":
            return self._paper_code(x)

        xt, labels = self._tile(x)
        z, ok = cw_inner(
            self.base,
            xt,
            labels,
            to_tanh_space(xt),
            tau=self.delta,
            const=self.const,
            max_iterations=self.max_iterations,
            learning_rate=self.learning_rate,
            targeted=True,
        )
        z = projected.project(z, xt, self.delta)
        logits = self._logits(z)
        score = self._per_label(log_odds(logits, labels))
        z = self._per_label(z)
        label = tf.argmax(score, axis=1, output_type=tf.int32)
        return dict(
            z=z,
            label=label,
            confidences=tf.sigmoid(score),
            log_odds=score,
            probabilities=self._output(z, label),
            cw_success=self._per_label(ok),
            candidate_labels=self._per_label(tf.argmax(logits, -1, output_type=tf.int32)),
        )

    def _paper_code(self, x: tf.Tensor) -> dict:

        c = self.num_classes
        n = tf.shape(x)[0]
        pred = tf.argmax(self._logits(x), axis=-1, output_type=tf.int32)
        # Row i * (C - 1) + (s - 1) targets (pred_i + s) mod C: every label but the prediction.
        shifts = tf.range(1, c, dtype=tf.int32)
        targets = tf.reshape((pred[:, None] + shifts[None, :]) % c, [-1])
        xt = tf.repeat(x, c - 1, axis=0)
        # One constant-growing round at a fixed tau: min_tau = tau ends an example at its first
        # success (the next tau would be below it), as one call of the original's inner loop.
        settings = CWSettings(
            targeted=True,
            max_iterations=self.max_iterations,
            learning_rate=self.learning_rate,
            initial_tau=PAPER_CODE_TAU,
            decrease_factor=0.9,
            min_tau=PAPER_CODE_TAU,
            **PAPER_CODE_CONSTS,
        )
        out = cw_schedule(self.base, xt, targets, epsilon=PAPER_CODE_TAU, settings=settings)
        ok = out["has_last"]
        cand = tf.where(tf.reshape(ok, [-1, 1, 1, 1]), out["x_last"], xt)
        cand = tf.reshape(cand, tf.concat([[n, c - 1], tf.shape(x)[1:]], axis=0))
        ok = tf.reshape(ok, [n, c - 1])
        # Put candidates back in label order, with x itself in the prediction's slot.
        all_cand = tf.concat([x[:, None], cand], axis=1)  # slot s holds label (pred + s) mod C
        all_ok = tf.concat([tf.ones([n, 1], tf.bool), ok], axis=1)
        order = (tf.range(c)[None, :] - pred[:, None]) % c  # label t sits in slot (t - pred) mod C
        z = tf.gather(all_cand, order, batch_dims=1)
        ok = tf.gather(all_ok, order, batch_dims=1)
        logits = self._logits(tf.reshape(z, tf.concat([[-1], tf.shape(x)[1:]], 0)))
        top = tf.argmax(logits, axis=-1, output_type=tf.int32)
        top_label = self._per_label(top)
        top_score = self._per_label(log_odds(logits, top))  # ranks as the top confidence does
        best = tf.argmax(top_score, axis=1, output_type=tf.int32)
        label = tf.gather(top_label, best, batch_dims=1)
        return dict(
            z=z,
            label=label,
            confidences=tf.sigmoid(top_score),
            log_odds=top_score,
            probabilities=tf.one_hot(label, c, dtype=tf.float32),
            cw_success=ok,
            candidate_labels=top_label,
        )
