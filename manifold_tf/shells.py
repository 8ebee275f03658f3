"""Model shells (paper, Section 5): MCN_delta (Algorithm 1) and NCN_p (Algorithm 2) as Keras models.

A factor shell wraps a fixed base model ``F`` (images -> logits) and answers ``G(x) = F(H(F, x))``:

- :class:`MCNShell`: for every label ``t``, ``z_t = argmax_{z in N(x, delta)} F(z)_t``; then
  ``t* = argmax_t F(z_t)_t`` and the output is ``F(z_t*)``.
- :class:`NCNShell`: for every label ``t``, ``z_t = argmin ||z - x||_inf`` subject to
  ``F(z)_t >= p`` (quadratic penalty, increasing ``alpha``); ``t*`` is the nearest label whose
  constraint is met, and the output is ``F(z_t*)``.

Layout and cost: the ``N`` images of a call and the ``C`` labels are optimised together as one batch
of ``N * C`` rows (row ``i * C + t`` is image ``i``, label ``t``) inside one compiled
``tf.function`` (XLA optional, ``jit_compile``), traced once for every batch size. A prediction
costs about ``C * K`` forward+backward passes of ``F`` per image (``K`` optimiser steps) and one
forward pass. The shell is not differentiable in ``x``: its output is a function of an argmax/argmin.

Units: images are float32 NHWC pixels in 0..255; ``delta``, step sizes and distances are pixels.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from manifold_tf import projected
from manifold_tf.validation import (
    IMAGE_SHAPE,
    PIXEL_MAX,
    check_logits,
    validate_images,
    validate_radius,
)

MCN_OPTIMIZERS = ("pgd", "adam", "cw")
CW_VARIANTS = ("algorithm1", "paper_code")
# The paper's CarliniWagnerShell (METHOD.md, "What the paper's own code did"): tau fixed at 1/32 of
# the range, constants 1e-5 then 0.1 (const_factor 10000 under a largest constant of 20).
PAPER_CODE_TAU = PIXEL_MAX / 32.0
PAPER_CODE_CONSTS = dict(initial_const=1e-5, const_factor=1e4, largest_const=20.0)
# Measured on 2 CPU cores (bench/bench_shells.py, BUILD.md): with XLA the shell (its K steps
# unrolled) is 1.6-2.2x faster per call at a fixed batch size, but compiles for 30-45 s for every
# new batch size; an evaluation calls the shell on many batch sizes (x, then the x' that succeeded),
# so the default is plain TensorFlow. Pass jit_compile=True for long runs at a fixed batch size.
DEFAULT_JIT_COMPILE = False
MAX_UNROLLED_STEPS = 32


def _base_signature(base) -> tuple[tuple[int, ...], int]:
    """The base model's image shape ``(H, W, C)`` and number of classes; checks it returns logits."""
    shape = None
    inputs = getattr(base, "inputs", None)
    if inputs:
        shape = tuple(inputs[0].shape[1:])
    if not shape or any(d is None for d in shape):
        shape = IMAGE_SHAPE
    if len(shape) != 3:
        raise ValueError(f"the base model must take images [N, H, W, C]; its input shape is {shape}.")
    # A fixed probe (not the user's data): enough to tell logits from probabilities.
    probe = tf.random.stateless_uniform((4,) + tuple(shape), seed=[0, 0], minval=0.0, maxval=PIXEL_MAX)
    logits = check_logits(base, probe)
    return tuple(int(d) for d in shape), int(logits.shape[-1])


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _check_positive(value, name: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value}.")
    return value


def log_odds(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """``log(F_t / (1 - F_t)) = Z_t - logsumexp_{j != t} Z_j`` per row: logits ``[B, C]``, labels ``[B]``.

    A strictly increasing function of ``F_t``, so it has the same maximiser and ranks candidates as
    ``F_t`` does; unlike ``F_t`` or ``log F_t`` it does not round to a constant in float32 once the
    softmax saturates (``F_t`` = 1.0 for margins above ~17), and its gradient does not vanish there.
    """
    logits = tf.cast(logits, tf.float32)
    own = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    others = tf.where(own, tf.constant(-1e30, tf.float32), logits)  # finite: no inf - inf
    return tf.gather(logits, labels, batch_dims=1) - tf.reduce_logsumexp(others, axis=-1)


class _FactorShell(keras.Model):
    """What MCN and NCN share: the wrapped base, the batch layout, the compiled embedding, I/O.

    Subclasses implement ``_embed_graph(x) -> dict`` (traceable) and ``_shell_config() -> dict``.
    """

    def __init__(self, base: keras.Model, *, jit_compile: bool = DEFAULT_JIT_COMPILE, **kwargs):
        super().__init__(**kwargs)
        if not callable(base):
            raise ValueError(f"base must be a Keras model (images -> logits); got {type(base).__name__}.")
        self.image_shape, self.num_classes = _base_signature(base)
        self.base = base
        self.jit_compile = bool(jit_compile)
        self._embed_function = None
        self.built = True  # no weights of its own: the base's are already built.

    # -- the compiled embedding ------------------------------------------------------------------

    @property
    def embed_function(self):
        """The cached ``tf.function`` ``x [N, H, W, C] -> diagnostics dict`` (see :meth:`embed`).

        Built on first use, with a ``None`` batch axis, so it is traced once for all batch sizes
        (XLA still compiles once per concrete batch size).
        """
        if self._embed_function is None:
            spec = tf.TensorSpec((None,) + self.image_shape, tf.float32, name="x")
            self._embed_function = tf.function(
                self._embed_graph, input_signature=[spec], jit_compile=self.jit_compile
            )
        return self._embed_function

    def embed(self, x) -> dict:
        """Runs the search factor on ``x`` and returns its diagnostics (a dict of tensors).

        Args:
          x: images ``[N, H, W, C]``, float, pixels 0..255.

        Returns:
          ``z`` ``[N, C, H, W, 3]`` (the point found for each label), ``label`` int32 ``[N]`` (the
          chosen ``t*``), ``probabilities`` ``[N, C]`` (``F(z_t*)``, the shell's output), and the
          per-label scores of the subclass (see its docstring).
        """
        x = validate_images(x, image_shape=self.image_shape)
        return self.embed_function(x)

    def call(self, x, training=None):
        """``x [N, H, W, C]`` pixels -> probabilities ``[N, num_classes]`` (``training`` is ignored)."""
        del training  # the base always runs in inference mode inside a shell
        x = validate_images(x, image_shape=self.image_shape)
        return self.embed_function(x)["probabilities"]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def build(self, input_shape=None):
        self.built = True

    # -- shared pieces of the graph --------------------------------------------------------------

    def _logits(self, z: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.base(z, training=False), tf.float32)

    def _tile(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``[N, ...]`` -> (``[N * C, ...]`` with row ``i * C + t`` = image ``i``, labels ``[N * C]``)."""
        n = tf.shape(x)[0]
        return tf.repeat(x, self.num_classes, axis=0), tf.tile(tf.range(self.num_classes), [n])

    def _per_label(self, v: tf.Tensor) -> tf.Tensor:
        """``[N * C, ...]`` -> ``[N, C, ...]``."""
        return tf.reshape(v, tf.concat([[-1, self.num_classes], tf.shape(v)[1:]], axis=0))

    def _output(self, z: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
        """``F(z_t*)`` ``[N, C]`` from ``z`` ``[N, C, ...]``: one forward pass on the ``N`` chosen points."""
        chosen = tf.gather(z, label, batch_dims=1)
        return tf.nn.softmax(self._logits(chosen))

    # -- Keras plumbing --------------------------------------------------------------------------

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """As Keras', except that ``compile(metrics=[...])`` without a loss evaluates metrics only.

        A shell is evaluated, never trained, so a loss is optional: without one the reported loss
        is 0.
        """
        if self._compile_loss is None and not self.losses:
            return tf.constant(0.0)
        return super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                    training=training)

    def train_step(self, data):
        raise NotImplementedError(
            f"{type(self).__name__} wraps a fixed base model and is not trained (it is not "
            f"differentiable in its input): train the base model, then wrap it."
        )

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "base": keras.saving.serialize_keras_object(self.base),
            "jit_compile": self.jit_compile,
            **self._shell_config(),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        base = keras.saving.deserialize_keras_object(config.pop("base"))
        return cls(base, **config)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Writes a SavedModel with endpoints ``serve`` (probabilities) and ``embed`` (diagnostics).

        Both take ``x`` float32 ``[None, H, W, C]`` (pixels). The SavedModel needs neither Keras
        nor ``manifold_tf`` to run: ``tf.saved_model.load(path).serve(x)``. Other formats are
        delegated to :meth:`keras.Model.export`.
        """
        if format != "tf_saved_model":
            return super().export(filepath, format=format, verbose=verbose,
                                  input_signature=input_signature, **kwargs)
        spec = tf.TensorSpec((None,) + self.image_shape, tf.float32, name="x")
        archive = keras.export.ExportArchive()
        archive.track(self)
        archive.add_endpoint("serve", lambda x: self.embed_function(x)["probabilities"], [spec])
        archive.add_endpoint("embed", lambda x: self.embed_function(x), [spec])
        archive.write_out(filepath, verbose=bool(verbose))


@keras.saving.register_keras_serializable(package="manifold_tf")
class MCNShell(_FactorShell):
    """MCN_delta (Algorithm 1): the most confident point of ``N(x, delta)`` for every label.

    For every label ``t`` the optimiser ascends the log-odds ``log(F(z)_t / (1 - F(z)_t))`` over
    ``N(x, delta)`` (the L-inf ball, intersected with the pixel box): the same maximiser as
    ``log F(z)_t``, and the same signed steps, but no float32 saturation (see :func:`log_odds`).
    ``t* = argmax_t F(z_t)_t``, compared by log-odds so that saturated candidates still rank (ties
    go to the smaller label); the output is ``F(z_t*)``.

    Optimisers:
      ``"pgd"``: ``steps`` signed-gradient steps of ``step_size`` pixels, best iterate kept
        (:func:`projected.projected_ascent`). ``"adam"``: Adam on ``z`` with learning rate
        ``step_size`` pixels, projected after each step.
      ``"cw"``: the paper's CarliniWagnerShell machinery (Carlini-Wagner L-inf, tanh variables,
        Adam with ``cw_learning_rate``, penalty ``sum(max(|z - x| - tau, 0))``, stop once the
        target is the argmax and the loss is below ``1e-4 * c``), targeted at each label:
        - ``cw_variant="algorithm1"``: every label, ``tau = delta``, constant ``cw_const``, at most
          ``cw_max_iterations`` steps; ``z_t`` is the result projected into ``N(x, delta)``
          (the CW penalty is soft) and scored by ``F(z_t)_t`` as above. Note that CW stops as soon
          as ``t`` is the argmax, so it does not maximise ``F_t`` further.
        - ``cw_variant="paper_code"``: what the authors' code did (METHOD.md): every label but the
          base prediction at ``x``, ``tau = 255 / 32``, constants 1e-5 then 0.1 with Adam state
          kept between them, at most ``cw_max_iterations`` steps per constant (``delta`` and
          ``cw_const`` are not used). A failed label's candidate is ``x``; the prediction's own
          candidate is ``x``. Each candidate is scored by the base's *top* label and confidence
          at it; the output is the one-hot vector of the most confident candidate's top label.

    Args:
      base: Keras model, images ``[N, H, W, C]`` (pixels) -> logits ``[N, C]``.
      delta: the radius of ``N(x, delta)`` in pixels (8 means 8/255). ``delta = 0`` returns the
        base model's probabilities at ``x``.
      optimizer: ``"pgd"``, ``"adam"`` or ``"cw"``.
      steps: ``K`` for ``"pgd"``/``"adam"`` (forward+backward passes per label).
      step_size: pixels per step (``"pgd"``) or Adam learning rate in pixels (``"adam"``);
        default ``2.5 * delta / steps`` (Madry et al.'s rule).
      random_start: start each ascent at a uniform point of the ball instead of at ``x``
        (stateless RNG from ``seed``; the draw depends on the batch layout, so a point's output can
        then depend on which other points share its batch).
      seed: int, the random start's seed.
      cw_variant, cw_const, cw_max_iterations, cw_learning_rate: the ``"cw"`` settings above.
        Defaults are CPU-cheap (100 iterations); the paper used 1000 and learning rate 5e-3.
      jit_compile: compile the embedding with XLA (once per batch size; see DEFAULT_JIT_COMPILE).

    ``embed(x)`` returns ``z`` ``[N, C, H, W, 3]``, ``label`` ``[N]`` (``t*``), ``confidences``
    ``[N, C]`` (``F(z_t)_t``; for ``paper_code`` each candidate's top confidence) and
    ``log_odds`` ``[N, C]`` (the same, as log-odds: finite where a confidence rounds to 0 or 1),
    ``probabilities`` ``[N, C]``, and for ``"cw"`` ``cw_success`` ``[N, C]`` (the CW run met its
    goal) and ``candidate_labels`` ``[N, C]`` (top label at each ``z_t``).
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
        cw_variant: str = "algorithm1",
        cw_const: float = 0.1,
        cw_max_iterations: int = 100,
        cw_learning_rate: float = 5e-3,
        jit_compile: bool = DEFAULT_JIT_COMPILE,
        **kwargs,
    ):
        self.delta = validate_radius(delta, "delta")
        if optimizer not in MCN_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {MCN_OPTIMIZERS}; got {optimizer!r}.")
        if cw_variant not in CW_VARIANTS:
            raise ValueError(f"cw_variant must be one of {CW_VARIANTS}; got {cw_variant!r}.")
        self.optimizer_name = optimizer
        self.steps = _check_int(steps, "steps", 0)
        if step_size is None:
            step_size = 2.5 * self.delta / max(self.steps, 1)
        self.step_size = validate_radius(step_size, "step_size")
        self.random_start = bool(random_start)
        self.seed = int(seed)
        self.cw_variant = cw_variant
        self.cw_const = _check_positive(cw_const, "cw_const")
        self.cw_max_iterations = _check_int(cw_max_iterations, "cw_max_iterations", 1)
        self.cw_learning_rate = _check_positive(cw_learning_rate, "cw_learning_rate")
        super().__init__(base, jit_compile=jit_compile, **kwargs)

    def _shell_config(self) -> dict:
        return dict(
            delta=self.delta,
            optimizer=self.optimizer_name,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            seed=self.seed,
            cw_variant=self.cw_variant,
            cw_const=self.cw_const,
            cw_max_iterations=self.cw_max_iterations,
            cw_learning_rate=self.cw_learning_rate,
        )

    def settings(self) -> dict:
        """The settings that matter for the chosen optimiser (for reports)."""
        s = dict(shell="mcn", delta=self.delta, optimizer=self.optimizer_name)
        if self.optimizer_name == "cw":
            s.update(cw_variant=self.cw_variant, cw_max_iterations=self.cw_max_iterations,
                     cw_learning_rate=self.cw_learning_rate)
            if self.cw_variant == "algorithm1":
                s.update(cw_const=self.cw_const)
            else:
                s.update(tau=PAPER_CODE_TAU, **PAPER_CODE_CONSTS)
        else:
            s.update(steps=self.steps, step_size=self.step_size, random_start=self.random_start,
                     seed=self.seed)
        s.update(jit_compile=self.jit_compile)
        return s

    def _embed_graph(self, x: tf.Tensor) -> dict:
        if self.optimizer_name == "cw" and self.cw_variant == "paper_code":
            return self._paper_code(x)
        xt, labels = self._tile(x)
        extra = {}
        if self.optimizer_name == "cw":
            from manifold_tf.carlini_wagner import cw_inner, to_tanh_space

            z, ok = cw_inner(
                self.base, xt, labels, to_tanh_space(xt), tau=self.delta, const=self.cw_const,
                max_iterations=self.cw_max_iterations, learning_rate=self.cw_learning_rate,
                targeted=True,
            )
            z = projected.project(z, xt, self.delta)
            logits = self._logits(z)
            score = log_odds(logits, labels)
            extra = dict(cw_success=self._per_label(ok),
                         candidate_labels=self._per_label(tf.argmax(logits, -1, output_type=tf.int32)))
        else:
            def objective(z):
                return log_odds(self._logits(z), labels)

            z0 = xt
            if self.random_start:
                z0 = projected.random_start(xt, self.delta, tf.constant([self.seed, 0], tf.int64))
            z, score = projected.projected_ascent(
                objective, xt, z0, radius=self.delta, steps=self.steps, step_size=self.step_size,
                optimizer="sign" if self.optimizer_name == "pgd" else "adam",
                # XLA on CPU runs a tf.while_loop several times slower than the unrolled steps;
                # past a few dozen steps the unrolled graph's compile time would dominate.
                unroll=self.jit_compile and self.steps <= MAX_UNROLLED_STEPS,
            )
        z, score = self._per_label(z), self._per_label(score)
        label = tf.argmax(score, axis=1, output_type=tf.int32)
        return dict(z=z, label=label, confidences=tf.sigmoid(score), log_odds=score,
                    probabilities=self._output(z, label), **extra)

    def _paper_code(self, x: tf.Tensor) -> dict:
        from manifold_tf.carlini_wagner import cw_schedule

        c = self.num_classes
        n = tf.shape(x)[0]
        pred = tf.argmax(self._logits(x), axis=-1, output_type=tf.int32)
        # Row i * (C - 1) + (s - 1) targets (pred_i + s) mod C: every label but the prediction.
        shifts = tf.range(1, c, dtype=tf.int32)
        targets = tf.reshape((pred[:, None] + shifts[None, :]) % c, [-1])
        xt = tf.repeat(x, c - 1, axis=0)
        # One constant-growing round at a fixed tau: min_tau = tau ends an example at its first
        # success (the next tau would be below it), as one call of the original's inner loop.
        out = cw_schedule(
            self.base, xt, targets, epsilon=PAPER_CODE_TAU, targeted=True,
            max_iterations=self.cw_max_iterations, learning_rate=self.cw_learning_rate,
            initial_tau=PAPER_CODE_TAU, decrease_factor=0.9, min_tau=PAPER_CODE_TAU,
            **PAPER_CODE_CONSTS,
        )
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
        return dict(z=z, label=label, confidences=tf.sigmoid(top_score), log_odds=top_score,
                    probabilities=tf.one_hot(label, c, dtype=tf.float32),
                    cw_success=ok, candidate_labels=top_label)


@keras.saving.register_keras_serializable(package="manifold_tf")
class NCNShell(_FactorShell):
    """NCN_p (Algorithm 2): for every label, the nearest point where ``F`` is ``p``-confident in it.

    Problem per label ``t``: ``min ||z - x||_inf`` subject to ``F(z)_t >= p``, searched within the
    box ``N(x, delta_max)``. Solved by the quadratic penalty method: minimise
    ``Q = r + alpha * max(logit(p) - o_t(z), 0)^2`` for ``alpha = alpha0 * alpha_factor^k``,
    ``k = 0 .. rounds - 1``, ``steps`` Adam steps per round, warm-started. Two choices, both for the
    optimiser's sake (the feasible set and the objective are unchanged):
      * the L-inf norm is written in epigraph form, ``z = clip(x + r * tanh(w), 0, 255)`` with
        ``r = delta_max * s``, ``s in [0, 1]``, so ``||z - x||_inf <= r`` and the distance has a
        dense gradient (the gradient of ``max_i |z_i - x_i|`` touches one pixel);
      * the constraint is ``o_t(z) >= logit(p)`` with ``o_t`` the log-odds of :func:`log_odds`
        (the same set as ``F(z)_t >= p``), whose violation keeps a gradient where the softmax
        saturates.
    Every iterate is checked; per label the nearest feasible iterate (distance measured as
    ``||z - x||_inf``) is kept, and ``x`` itself when ``F(x)_t >= p``. ``t*`` is the label with the
    smallest distance among those meeting ``p`` (ties: the smaller label). When no label meets
    ``p``, the shell falls back to the most confident ``z_t`` seen (largest ``F(z_t)_t``) and
    flags the point in ``unmet``.

    Args:
      base: Keras model, images -> logits.
      p: the confidence threshold, in (0, 1).
      delta_max: radius of the search box in pixels.
      steps: Adam steps per penalty round; rounds: number of ``alpha`` values.
      alpha: the first penalty weight (pixels per squared unit of log-odds); alpha_factor: its
        growth per round.
      learning_rate: Adam's, for ``s`` (fraction of ``delta_max``) and ``w`` (tanh space).
      jit_compile: compile the embedding with XLA (once per batch size; see DEFAULT_JIT_COMPILE).

    ``embed(x)`` returns ``z`` ``[N, C, H, W, 3]``, ``label`` ``[N]``, ``distances`` ``[N, C]``
    (pixels, L-inf), ``met`` bool ``[N, C]`` (``F(z_t)_t >= p``), ``confidences`` ``[N, C]``
    (``F(z_t)_t``) and ``log_odds`` (the same, as log-odds), ``unmet`` bool ``[N]`` (no label met
    ``p``: the fallback was used) and ``probabilities``. Cost: ``C * steps * rounds``
    forward+backward passes per image and ``2 C + 1`` forward passes.
    """

    def __init__(
        self,
        base: keras.Model,
        p: float = 0.9,
        *,
        delta_max: float = 16.0,
        steps: int = 10,
        rounds: int = 3,
        alpha: float = 1.0,
        alpha_factor: float = 10.0,
        learning_rate: float = 0.05,
        jit_compile: bool = DEFAULT_JIT_COMPILE,
        **kwargs,
    ):
        p = float(p)
        if not 0.0 < p < 1.0:
            raise ValueError(f"p must lie in (0, 1) (a confidence); got {p}.")
        self.p = p
        self.delta_max = validate_radius(delta_max, "delta_max")
        self.steps = _check_int(steps, "steps", 0)
        self.rounds = _check_int(rounds, "rounds", 1)
        self.alpha = _check_positive(alpha, "alpha")
        self.alpha_factor = _check_positive(alpha_factor, "alpha_factor")
        self.learning_rate = _check_positive(learning_rate, "learning_rate")
        super().__init__(base, jit_compile=jit_compile, **kwargs)

    def _shell_config(self) -> dict:
        return dict(p=self.p, delta_max=self.delta_max, steps=self.steps, rounds=self.rounds,
                    alpha=self.alpha, alpha_factor=self.alpha_factor,
                    learning_rate=self.learning_rate)

    def settings(self) -> dict:
        return dict(shell="ncn", **self._shell_config(), jit_compile=self.jit_compile)

    def _embed_graph(self, x: tf.Tensor) -> dict:
        xt, labels = self._tile(x)
        rows = tf.shape(xt)[0]
        axes = list(range(1, len(xt.shape)))
        expand = [-1] + [1] * len(axes)
        logit_p = float(np.log(self.p) - np.log1p(-self.p))  # F_t >= p  <=>  log-odds >= logit(p)
        beta1, beta2, eps = 0.9, 0.999, 1e-8

        def point(s, w):
            return tf.clip_by_value(xt + tf.reshape(self.delta_max * s, expand) * tf.tanh(w),
                                    0.0, PIXEL_MAX)

        def target_odds(z):
            return log_odds(self._logits(z), labels)

        def keep(z, odds, best):
            """Nearest feasible point so far (and its log-odds), and most confident point so far."""
            bz, bd, bf, cz, cf = best
            d = tf.reduce_max(tf.abs(z - xt), axis=axes)
            nearer = (odds >= logit_p) & (d < bd)
            bz = tf.where(tf.reshape(nearer, expand), z, bz)
            bd = tf.where(nearer, d, bd)
            bf = tf.where(nearer, odds, bf)
            surer = odds > cf
            cz = tf.where(tf.reshape(surer, expand), z, cz)
            return bz, bd, bf, cz, tf.where(surer, odds, cf)

        def body(i, s, w, ms, vs, mw, vw, best):
            alpha = self.alpha * tf.pow(self.alpha_factor, tf.cast(i // max(self.steps, 1), tf.float32))
            with tf.GradientTape() as tape:
                tape.watch([s, w])
                z = point(s, w)
                odds = target_odds(z)
                q = self.delta_max * s + alpha * tf.square(tf.nn.relu(logit_p - odds))
                total_q = tf.reduce_sum(q)  # rows are independent: the sum's gradient is per row
            gs, gw = tape.gradient(total_q, [s, w])
            best = keep(z, odds, best)
            t = tf.cast(i + 1, tf.float32)
            correction = tf.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
            ms = beta1 * ms + (1.0 - beta1) * gs
            vs = beta2 * vs + (1.0 - beta2) * tf.square(gs)
            mw = beta1 * mw + (1.0 - beta1) * gw
            vw = beta2 * vw + (1.0 - beta2) * tf.square(gw)
            s = tf.clip_by_value(s - self.learning_rate * correction * ms / (tf.sqrt(vs) + eps), 0.0, 1.0)
            w = w - self.learning_rate * correction * mw / (tf.sqrt(vw) + eps)
            return i + 1, s, w, ms, vs, mw, vw, best

        odds0 = target_odds(xt)
        inf = tf.fill([rows], np.float32(np.inf))
        best = keep(xt, odds0, (xt, inf, -inf, xt, -inf))
        # Start at x (w = 0) with the whole box available (s = 1): dz/dw = r is then non-zero.
        s0 = tf.ones([rows])
        w0 = tf.zeros_like(xt)
        total = self.steps * self.rounds
        state = (tf.constant(0), s0, w0, tf.zeros_like(s0), tf.zeros_like(s0), w0, w0, best)
        _, s, w, *_, best = tf.while_loop(
            lambda i, *_: i < total, body, state, maximum_iterations=total
        )
        z_last = point(s, w)
        bz, bd, bf, cz, cf = keep(z_last, target_odds(z_last), best)

        found = tf.math.is_finite(bd)
        z_rows = tf.where(tf.reshape(found, expand), bz, cz)
        distances = self._per_label(tf.reduce_max(tf.abs(z_rows - xt), axis=axes))
        met = self._per_label(found)
        z = self._per_label(z_rows)
        any_met = tf.reduce_any(met, axis=1)
        nearest = tf.argmin(tf.where(met, distances, np.float32(np.inf)), axis=1, output_type=tf.int32)
        surest = tf.argmax(self._per_label(cf), axis=1, output_type=tf.int32)
        label = tf.where(any_met, nearest, surest)
        odds = self._per_label(tf.where(found, bf, cf))
        return dict(z=z, label=label, distances=distances, met=met,
                    confidences=tf.sigmoid(odds), log_odds=odds, unmet=~any_met,
                    probabilities=self._output(z, label))
