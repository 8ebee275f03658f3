"""MCN_delta (paper, Algorithm 1): the most confident point of ``N(x, delta)`` for every label."""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf

from manifold_tf import projected, seeds
from manifold_tf.compiled import graph_function
from manifold_tf.shells.base import (
    DEFAULT_JIT_COMPILE,
    FactorShell,
    check_seed,
    jit_kwargs,
    log_odds,
)
from manifold_tf.shells.registry import register
from manifold_tf.validation import check_choice, check_int, validate_radius

# The package's one vocabulary ("sign": signed steps, "adam"). Configs saved before it said "pgd"
# for "sign": still accepted, reported as "sign".
OPTIMIZERS = projected.OPTIMIZERS
DEPRECATED_OPTIMIZERS = {"pgd": "sign"}
# XLA on CPU runs a tf.while_loop several times slower than the unrolled steps; past a few dozen
# steps the unrolled graph's compile time would dominate.
MAX_UNROLLED_STEPS = 32


@register("mcn")
@keras.saving.register_keras_serializable(package="manifold_tf")
class MCNShell(FactorShell):
    """MCN_delta (Algorithm 1): for every label ``t``, ``z_t = argmax_{z in N(x, delta)} F(z)_t``.

    The optimiser ascends the log-odds ``log(F(z)_t / (1 - F(z)_t))`` over ``N(x, delta)`` (the
    L-inf ball, intersected with the pixel box): the same maximiser as ``log F(z)_t``, the same
    signed steps, but no float32 saturation (see :func:`log_odds`). ``t* = argmax_t F(z_t)_t``,
    compared by log-odds so that saturated candidates still rank (ties go to the smaller label);
    the output is ``F(z_t*)``.

    Args:
      base: Keras model, images ``[N, H, W, C]`` (pixels) -> logits ``[N, C]``.
      delta: the radius of ``N(x, delta)`` in pixels (8 means 8/255). ``delta = 0`` returns the
        base model's probabilities at ``x``.
      optimizer: ``"sign"`` (``steps`` signed steps of ``step_size`` pixels, best iterate kept) or
        ``"adam"`` (Adam on ``z`` with learning rate ``step_size`` pixels, projected each step);
        ``"pgd"`` is a deprecated alias of ``"sign"``.
      steps: ``K``, forward+backward passes per label.
      step_size: pixels; default ``2.5 * delta / steps`` (Madry et al.'s rule,
        :func:`manifold_tf.projected.madry_step_size`).
      random_start: start each ascent at a uniform point of the ball instead of at ``x``
        (a stateless draw keyed by ``seed``, the image's pixels and the label:
        :func:`manifold_tf.seeds.tf_input_keys`; a point's output does not depend on its batch).
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
        optimizer: str = "sign",
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = False,
        seed: int = 0,
        jit_compile: bool = DEFAULT_JIT_COMPILE,
        **kwargs,
    ):
        self.delta = validate_radius(delta, "delta")
        if optimizer in DEPRECATED_OPTIMIZERS:
            warnings.warn(
                f"MCNShell optimizer {optimizer!r} is deprecated: use "
                f"{DEPRECATED_OPTIMIZERS[optimizer]!r} (the same signed steps).",
                DeprecationWarning,
                stacklevel=2,
            )
            optimizer = DEPRECATED_OPTIMIZERS[optimizer]
        self.optimizer_name = check_choice(optimizer, "optimizer", OPTIMIZERS)
        self.steps = check_int(steps, "steps", 0)
        if step_size is None:
            step_size = projected.madry_step_size(self.delta, self.steps)
        self.step_size = validate_radius(step_size, "step_size")
        self.random_start = bool(random_start)
        self.seed = check_seed(seed)
        super().__init__(base, jit_compile=jit_compile, **kwargs)

    @classmethod
    def from_settings(
        cls, base: keras.Model, settings, *, delta: float, p: float, seed: int = 0
    ) -> MCNShell:
        """MCN_delta from the evaluation's settings (``optimizer``, ``steps``, ``step_size``,
        ``random_start``, ``jit_compile``); ``p`` is unused."""
        del p  # MCN has no confidence level
        return cls(
            base,
            delta,
            optimizer=settings.optimizer,
            steps=settings.steps,
            step_size=settings.step_size,
            random_start=settings.random_start,
            seed=seed,
            **jit_kwargs(settings),
        )

    def _shell_config(self) -> dict:
        return dict(
            delta=self.delta,
            optimizer=self.optimizer_name,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            seed=self.seed,
        )

    def passes_per_prediction(self) -> int:
        """``C * K``: ``K`` steps for each of the ``C`` labels (a proxy searching ``y`` and ``m``
        wrong labels, :meth:`proxy`: ``(m + 1) * K``)."""
        labels = self.num_classes if self.proxy_labels is None else self.proxy_labels + 1
        return labels * self.steps

    def proxy(self, *, steps: int | None = None, labels: int | None = None) -> MCNShell:
        """MCN with ``steps`` ascent steps (the step size scaled so that ``steps * step_size``
        stays the shell's) on ``y`` and ``labels`` wrong labels per point (see the base class);
        ``self`` when neither changes anything."""
        steps = self.steps if steps is None else min(check_int(steps, "steps", 1), self.steps)
        if labels is not None and check_int(labels, "labels", 1) >= self.num_classes - 1:
            labels = None  # every wrong label: the shell's own layout
        if steps == self.steps and labels is None:
            return self

        def build():
            scale = self.steps / steps if self.steps else 1.0
            copy = self._replace(steps=steps, step_size=self.step_size * scale)
            copy.proxy_labels = labels
            return copy

        return self._cached_proxy((steps, labels), build)

    def default_proxy(self, *, attack: str = "bpda") -> MCNShell:
        """BPDA: half the steps on ``y`` and the best wrong label; targeted BPDA: the shell's own
        steps on ``y`` and the target; Square: half the steps on ``y`` and the best wrong label
        at ``x``. Measured on MCN_8 (10 steps), the points of the synthetic default's and
        the CIFAR sample's first 30 that the transfers and lift leave standing: each attack broke
        the same points as through the shell itself (BUILD.md). Targeted BPDA needs its steps:
        through 5 it broke 2 of the shell's 6 on the synthetic default (on y and the target
        alone, or with 2 more labels), through 10 on y and the target the same 6. Square's 30
        queries break none of those points at 8 px; at 32 px on the synthetic default's, its copy
        on ``y`` and 1, 2 or 3 labels broke the same 9 as through the shell itself."""
        if attack == "square":
            return self.proxy(steps=max(1, self.steps // 2), labels=1)
        if attack == "bpda_targeted":
            return self.proxy(labels=1)
        return self.proxy(steps=max(1, self.steps // 2), labels=1)

    def embed_labels(self, x, labels) -> dict:
        """The ascent of the given labels only (see the base class): ``labels`` ``[M, S]``."""
        fn = self.__dict__.get("_labels_function")
        if fn is None:
            spec = tf.TensorSpec((None,) + self.image_shape, tf.float32)
            fn = graph_function(
                self._labels_graph,
                input_signature=[spec, tf.TensorSpec((None, None), tf.int32)],
            )
            self.__dict__["_labels_function"] = fn
        return fn(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(labels, tf.int32))

    @property
    def search_radius(self) -> float:
        """``delta``, pixels."""
        return self.delta

    @property
    def is_random(self) -> bool:
        """True with ``random_start`` (the ascent starts at a seeded random point of the ball)."""
        return self.random_start

    def with_seed(self, seed: int) -> MCNShell:
        """A copy with another random start seed (sharing ``base``); ``self`` without
        ``random_start`` (the seed draws nothing then)."""
        seed = check_seed(seed)
        if not self.random_start:
            return self
        return self._replace(seed=seed)

    def warm_search(self, steps: int):
        """``steps`` steps of MCN's own ascent from the previous points (see the base class); the
        previous points, projected onto the new ball, are the first iterate, so the result is at
        least as confident per label. Compiled once per ``steps``, any batch size."""
        steps = check_int(steps, "steps", 0)
        cache = self.__dict__.setdefault("_warm_functions", {})
        if steps not in cache:
            spec = tf.TensorSpec((None,) + self.image_shape, tf.float32)
            prev = tf.TensorSpec((None, self.num_classes) + self.image_shape, tf.float32)
            cache[steps] = graph_function(
                lambda x, z_prev: self._search(
                    x, tf.reshape(z_prev, (-1,) + self.image_shape), steps
                ),
                input_signature=[spec, prev],
            )
        return cache[steps]

    def _starts(self, x: tf.Tensor, slots: tf.Tensor) -> tf.Tensor:
        """The random starts of the rows ``x`` repeated per slot (``slots`` ``[N, S]``, labels):
        row ``i * S + j`` keyed by image ``i``'s pixels and the label ``slots[i, j]``, so a
        label's start is the same whichever labels are searched beside it and in any batch."""
        s = tf.shape(slots)[1]
        keys = tf.repeat(seeds.tf_input_keys(x, self.seed, "mcn start"), s)
        keys = seeds.tf_fold(keys, tf.reshape(slots, [-1]))
        return projected.random_start_rows(tf.repeat(x, s, axis=0), self.delta, keys)

    def _embed_graph(self, x: tf.Tensor) -> dict:
        z0 = None
        if self.random_start:
            every = tf.tile(tf.range(self.num_classes)[None, :], [tf.shape(x)[0], 1])
            z0 = self._starts(x, every)
        return self._search(x, z0, self.steps)

    def _labels_graph(self, x: tf.Tensor, labels: tf.Tensor) -> dict:
        z0 = self._starts(x, labels) if self.random_start else None
        return self._search(x, z0, self.steps, labels)

    def _search(
        self, x: tf.Tensor, z0: tf.Tensor | None, steps: int, slots: tf.Tensor | None = None
    ) -> dict:
        """The ascent of every label of every image from ``z0`` (``None``: from ``x``); with
        ``slots`` ``[N, S]``, of those labels only."""
        if slots is None:
            xt, labels = self._tile(x)
            s = self.num_classes
        else:
            s = tf.shape(slots)[1]
            xt, labels = tf.repeat(x, s, axis=0), tf.reshape(slots, [-1])

        def objective(z):
            return log_odds(self._logits(z), labels)

        z, score = projected.projected_ascent(
            objective,
            xt,
            xt if z0 is None else z0,
            radius=self.delta,
            steps=steps,
            step_size=self.step_size,
            optimizer=self.optimizer_name,
            unroll=self.jit_compile and steps <= MAX_UNROLLED_STEPS,
        )
        z = tf.reshape(z, tf.concat([tf.stack([-1, s]), tf.shape(z)[1:]], axis=0))
        score = tf.reshape(score, [-1, s])
        best = tf.argmax(score, axis=1, output_type=tf.int32)
        out = dict(
            z=z,
            label=best if slots is None else tf.gather(slots, best, batch_dims=1),
            confidences=tf.sigmoid(score),
            log_odds=score,
            probabilities=self._output(z, best),
        )
        if slots is not None:
            out["slot_labels"] = slots
        return out
