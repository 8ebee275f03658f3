"""What every factor shell shares: the wrapped base, the batch layout, the compiled embedding, I/O.

A factor shell wraps a fixed base model ``F`` (images -> logits) and answers ``G(x) = F(H(F, x))``
(paper, Section 5). The ``N`` images of a call and the ``C`` labels are optimised together as one
batch of ``N * C`` rows (row ``i * C + t`` is image ``i``, label ``t``) inside one compiled
``tf.function`` (XLA optional, ``jit_compile``), traced once for all batch sizes. The shell is not
differentiable in ``x``: its output is a function of an argmax/argmin.

What the evaluation needs to know about a shell, it asks the shell (no attribute probing): its
cost (:meth:`FactorShell.passes_per_prediction`), its decision rule in the form BPDA differentiates
(:meth:`FactorShell.scores`, a :class:`Scores`), the radius it searches
(:attr:`FactorShell.search_radius`), whether it is random and a copy with another seed
(:attr:`FactorShell.is_random`, :meth:`FactorShell.with_seed`), its batch layout
(:attr:`FactorShell.rows_per_image`) and how to build it from the evaluation's settings
(:meth:`FactorShell.from_settings`, through :func:`manifold_tf.shells.registry.build`), and the
cheaper copy of itself an attack may steer by (:meth:`FactorShell.proxy`, in
:mod:`manifold_tf.shells.proxy`).

Units: images are float32 NHWC pixels in 0..255; radii, step sizes and distances are pixels.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from manifold_tf.compiled import graph_function
from manifold_tf.shells.proxy import ProxyMixin
from manifold_tf.shells.scores import Scores, answer, log_odds
from manifold_tf.validation import IMAGE_SHAPE, PIXEL_MAX, check_logits, validate_images

# The shells' scoring helpers live in manifold_tf.shells.scores; re-exported for the shells.
__all__ = [
    "DEFAULT_JIT_COMPILE",
    "FactorShell",
    "Scores",
    "answer",
    "check_seed",
    "jit_kwargs",
    "log_odds",
]

# Measured on 2 CPU cores (bench/bench_shells.py, BUILD.md): with XLA the shell (its K steps
# unrolled) is 1.6-2.2x faster per call at a fixed batch size, but compiles for 30-45 s for every
# new batch size; an evaluation calls the shell on many batch sizes (x, then the x' that succeeded),
# so the default is plain TensorFlow. Pass jit_compile=True for long runs at a fixed batch size.
DEFAULT_JIT_COMPILE = False


def _base_signature(base) -> tuple[tuple[int, ...], int]:
    """The base model's image shape ``(H, W, C)`` and class count; checks it returns logits."""
    shape = None
    inputs = getattr(base, "inputs", None)
    if inputs:
        shape = tuple(inputs[0].shape[1:])
    if not shape or any(d is None for d in shape):
        shape = IMAGE_SHAPE
    if len(shape) != 3:
        raise ValueError(
            f"the base model must take images [N, H, W, C]; its input shape is {shape}."
        )
    # A fixed probe (not the user's data): enough to tell logits from probabilities.
    probe = tf.random.stateless_uniform(
        (4,) + tuple(shape), seed=[0, 0], minval=0.0, maxval=PIXEL_MAX
    )
    logits = check_logits(base, probe)
    return tuple(int(d) for d in shape), int(logits.shape[-1])


def check_seed(seed) -> int:
    """Checks a seed (an integer, any sign: it feeds a stateless RNG) and returns it as int."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer; got {seed!r} ({type(seed).__name__}).")
    return int(seed)


def jit_kwargs(settings) -> dict:
    """``{"jit_compile": bool}`` from ``settings.jit_compile``, or ``{}`` when it is None (the
    shell's own default, :data:`DEFAULT_JIT_COMPILE`)."""
    jit = getattr(settings, "jit_compile", None)
    return {} if jit is None else dict(jit_compile=bool(jit))


class FactorShell(ProxyMixin, keras.Model):
    """What every factor shell shares: the wrapped base, the batch layout, the compiled embedding,
    I/O, and what the evaluation asks of a shell.

    A new shell subclasses this, registers itself (``@manifold_tf.shells.register("kind")``, which
    sets :attr:`kind`) and implements ``_embed_graph(x) -> dict`` (traceable; at least ``z``,
    ``label``, ``log_odds`` and ``probabilities``, see :meth:`embed`), ``_shell_config() -> dict``
    (its constructor's keyword arguments), :meth:`passes_per_prediction`, :attr:`search_radius` and
    :meth:`from_settings`; it overrides :meth:`scores`, :attr:`is_random`/:meth:`with_seed` and
    :attr:`rows_per_image` when the defaults (per-label slots ranked by log-odds, deterministic,
    ``C`` rows per image) do not describe it.
    """

    kind: str | None = None  # set by manifold_tf.shells.register

    def __init__(self, base: keras.Model, *, jit_compile: bool = DEFAULT_JIT_COMPILE, **kwargs):
        super().__init__(**kwargs)
        if not callable(base):
            raise ValueError(
                f"base must be a Keras model (images -> logits); got {type(base).__name__}."
            )
        self.image_shape, self.num_classes = _base_signature(base)
        self.base = base
        self.jit_compile = bool(jit_compile)
        self._embed_function = None
        self.built = True  # no weights of its own: the base's are already built.

    # -- the compiled embedding ------------------------------------------------------------------

    @property
    def embed_function(self):
        """The cached ``tf.function`` ``x [N, H, W, C] -> diagnostics dict`` (see :meth:`embed`).

        Built on first use, with a ``None`` batch axis, so it is traced once for all batch sizes.
        XLA compiles once per concrete batch size, and a compile costs tens of seconds here, so with
        ``jit_compile`` the batch is zero-padded to the next power of two (a bucket) and the outputs
        cut back: an evaluation whose batches shrink as points fall compiles once per bucket.
        """
        if self._embed_function is None:
            spec = tf.TensorSpec((None,) + self.image_shape, tf.float32, name="x")
            inner = graph_function(
                self._embed_graph, input_signature=[spec], jit_compile=self.jit_compile
            )
            if not self.jit_compile:
                self._embed_function = inner
            else:

                def bucketed(x):
                    n = tf.shape(x)[0]
                    log2 = tf.math.log(tf.cast(tf.maximum(n, 1), tf.float32)) / tf.math.log(2.0)
                    size = tf.maximum(tf.cast(tf.pow(2.0, tf.math.ceil(log2)), tf.int32), n)
                    padded = tf.pad(x, [[0, size - n]] + [[0, 0]] * (len(self.image_shape)))
                    return {k: v[:n] for k, v in inner(padded).items()}

                self._embed_function = graph_function(bucketed, input_signature=[spec])
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

    def __call__(self, x, *args, **kwargs):
        # Keras converts a numpy input to a tensor before call() runs, and an array it cannot
        # convert (strings, objects) would fail there without naming x: check such input first.
        if isinstance(x, (np.ndarray, list, tuple)):
            x = validate_images(x, image_shape=self.image_shape)
        return super().__call__(x, *args, **kwargs)

    def call(self, x, training=None):
        """``x [N, H, W, C]`` pixels -> probabilities ``[N, num_classes]`` (``training`` unused)."""
        del training  # the base always runs in inference mode inside a shell
        x = validate_images(x, image_shape=self.image_shape)
        if not tf.executing_eagerly():
            # Inside predict's compiled step the eager range check cannot run: check in the graph,
            # so NaN or out-of-range pixels fail loudly instead of answering.
            x = tf.debugging.assert_all_finite(x, "shell input x has NaN or infinite pixels")
            with tf.control_dependencies(
                [
                    tf.debugging.assert_greater_equal(
                        x, 0.0, message="shell input x has pixels < 0 (expected 0..255)"
                    ),
                    tf.debugging.assert_less_equal(
                        x, PIXEL_MAX, message="shell input x has pixels > 255 (expected 0..255)"
                    ),
                ]
            ):
                x = tf.identity(x)
        return self.embed_function(x)["probabilities"]

    def predict(self, x, *args, **kwargs):
        """Keras' ``predict``, after checking an array input whole (shape, dtype, range, size)."""
        if isinstance(x, (np.ndarray, tf.Tensor)) or hasattr(x, "__array__"):
            if len(getattr(x, "shape", ())) >= 1 and x.shape[0] == 0:
                raise ValueError(
                    f"x is an empty batch (shape {tuple(x.shape)}): nothing to predict."
                )
            validate_images(x, image_shape=self.image_shape)
        return super().predict(x, *args, **kwargs)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def build(self, input_shape=None):
        self.built = True

    # -- what the evaluation asks of a shell ------------------------------------------------------

    @classmethod
    def from_settings(
        cls, base: keras.Model, settings, *, delta: float, p: float, seed: int = 0
    ) -> FactorShell:
        """The shell around ``base`` from the evaluation's shell settings.

        Args:
          base: Keras model, images ``[N, H, W, C]`` (pixels 0..255) -> logits ``[N, C]``.
          settings: an object read by attribute name (the evaluation's ``ShellConfig``): ``steps``,
            ``step_size``, ``optimizer``, ``random_start``, ``ncn_delta_max``, ``ncn_rounds``,
            ``ncn_alpha``, ``ncn_alpha_factor``, ``ncn_learning_rate``, ``cw_variant``,
            ``cw_const``, ``cw_max_iterations``, ``jit_compile`` (None: the shell's default).
          delta: the radius setting in pixels (MCN's delta, the cw shell's all_labels tau).
          p: the confidence level setting (NCN).
          seed: the seed of a random shell.
        """
        raise NotImplementedError(
            f"{cls.__name__} does not implement from_settings(base, settings, *, delta, p, seed): "
            f"define it to build the shell from the evaluation's settings."
        )

    def passes_per_prediction(self) -> int:
        """Forward+backward passes of the base in one shell prediction of one image (its search)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement passes_per_prediction(): define it as the "
            f"forward+backward passes of the base per image of one prediction."
        )

    @property
    def search_radius(self) -> float:
        """The L-inf radius in pixels of the ball around ``x`` the shell searches."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement search_radius: define it as the L-inf "
            f"radius (pixels) of the ball its search covers."
        )

    @property
    def is_random(self) -> bool:
        """Whether the shell's answer depends on a random draw (:meth:`with_seed` varies it)."""
        return False

    def with_seed(self, seed: int) -> FactorShell:
        """A copy of the shell drawing with ``seed`` (for EOT); a deterministic shell returns itself
        (no draw to vary). The copy shares ``base``."""
        check_seed(seed)
        return self

    @property
    def rows_per_image(self) -> int:
        """Rows of the search batch per image: the ``C`` labels searched together."""
        return self.num_classes

    def warm_search(self, steps: int):
        """An attacker's cheap approximation of the search, warm-started; ``None`` if the shell
        has none (the default).

        Where given: a compiled ``(x [M, H, W, C], z_prev [M, C, H, W, C']) -> dict`` like
        :meth:`embed`'s, that runs ``steps`` steps of the shell's own search from ``z_prev``
        projected onto the ball around ``x``, instead of the full search from ``x``. BPDA's steps
        move ``x`` a little at a time, so the previous step's points are a good start. It is not the
        shell: an attack using it must confirm every success with the shell itself. Cost per image:
        ``rows_per_image * steps`` forward+backward passes of the base.
        """
        del steps
        return None

    def bpda_approximation(self, x: tf.Tensor) -> tf.Tensor:
        """A differentiable stand-in for the search factor ``H(F, x)``, for BPDA; the identity by
        default.

        Args:
          x: images ``[M, H, W, C]``, float32 pixels 0..255 (traceable: called under a tape).

        Returns:
          ``[M, H, W, C]`` pixels: a smooth function of ``x`` whose Jacobian BPDA may use in place
          of the search's (Athalye et al. 2018). Cost: whatever the override costs; none here.

        How BPDA uses a shell (:mod:`manifold_tf.attacks.bpda`): it runs the real search on the
        forward pass (:attr:`embed_function`), ranks the candidate slots with :meth:`scores`,
        picks two slots per point (``up`` and ``down``, :func:`~manifold_tf.attacks.bpda.
        surrogate_rows`) and takes the base's gradient of their log-odds *at the slots' points*
        ``out["z"][i, slot]``, applied as the gradient in ``x'``: the identity approximation
        ``dz/dx' = I``. A shell that answers at ONE point ``z*`` per image (Hedge,
        anti-adversary, input transformations) therefore returns ``z`` ``[N, C, ...]`` with every
        label's slot equal to ``z*`` and ``log_odds[:, t]`` the log-odds of ``t`` at ``z*``
        (:meth:`_at_point` builds that dict): ``up`` is then the best wrong label at ``z*`` and
        ``down`` the true one, and BPDA ascends ``lo_up(z*) - lo_y(z*)`` through ``F``'s
        gradient at ``z*``, exactly BPDA-identity on ``G(x) = F(z*(x))``.

        A non-identity override is applied by :meth:`bpda_vjp`, which ``bpda.py`` calls on its
        surrogate gradient ``g`` (taken at the ``out["z"]`` rows): ``g = shell.bpda_vjp(x', g)``.
        """
        return x

    def bpda_vjp(self, x, g):
        """``J^T g``: the vector-Jacobian product of :meth:`bpda_approximation` at ``x`` with a
        gradient ``g`` taken at the search's point (both ``[M, H, W, C]``, pixels); ``g`` itself
        when the approximation is the identity (no pass). Cost: one forward+backward pass of the
        approximation otherwise."""
        if type(self).bpda_approximation is FactorShell.bpda_approximation:
            return g
        x = tf.convert_to_tensor(x, tf.float32)
        g = tf.convert_to_tensor(g, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = self.bpda_approximation(x)
        return tape.gradient(
            z, x, output_gradients=g, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

    def scores(self, out: dict) -> Scores:
        """The shell's decision rule as :class:`Scores`, from the dict of :meth:`embed` (``M``
        points).

        Default (MCN, CW ``all_labels``): slot ``t`` stands for label ``t`` (for a dict of
        :meth:`embed_labels`, for ``slot_labels[:, t]``), ranked by its log-odds ``lo_t(z_t)``.
        """
        lo = np.asarray(out["log_odds"]).astype(np.float64)
        if "slot_labels" in out:  # a search on some labels only (embed_labels)
            label = np.asarray(out["slot_labels"]).astype(np.int32)
        else:
            label = np.broadcast_to(np.arange(lo.shape[1], dtype=np.int32), lo.shape)
        return Scores(label, lo, lo, None, None, None, answer(out).astype(np.int32))

    # -- shared pieces of the graph --------------------------------------------------------------

    def _logits(self, z: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.base(z, training=False), tf.float32)

    def _tile(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``[N, ...]`` -> ``[N * C, ...]`` (row ``i * C + t`` is image ``i``) and labels."""
        n = tf.shape(x)[0]
        return tf.repeat(x, self.num_classes, axis=0), tf.tile(tf.range(self.num_classes), [n])

    def _per_label(self, v: tf.Tensor) -> tf.Tensor:
        """``[N * C, ...]`` -> ``[N, C, ...]``."""
        return tf.reshape(v, tf.concat([[-1, self.num_classes], tf.shape(v)[1:]], axis=0))

    def _at_point(self, z: tf.Tensor, **extra) -> dict:
        """The :meth:`embed` dict of a shell that answers ``F(z*)`` at ONE point per image.

        ``z`` ``[N, H, W, C]`` (pixels) -> ``z`` ``[N, C, H, W, C]`` (every label's slot is
        ``z*``, so BPDA's rows are points of the shell's own answer), ``log_odds`` ``[N, C]`` (of
        every label at ``z*``), ``confidences`` ``[N, C]`` (``F(z*)``), ``label`` ``[N]``
        (``argmax F(z*)``), ``probabilities`` ``[N, C]`` and ``point`` ``[N, H, W, C]``
        (``z*``), plus ``extra``. Cost: one forward pass of the base on ``N`` rows.
        """
        logits = self._logits(z)
        n = tf.shape(logits)[0]
        labels = tf.tile(tf.range(self.num_classes), [n])
        lo = tf.reshape(
            log_odds(tf.repeat(logits, self.num_classes, axis=0), labels), [-1, self.num_classes]
        )
        probabilities = tf.nn.softmax(logits)
        slots = tf.repeat(z[:, None], self.num_classes, axis=1)
        return dict(
            z=slots,
            label=tf.argmax(logits, axis=-1, output_type=tf.int32),
            log_odds=lo,
            confidences=probabilities,
            probabilities=probabilities,
            point=z,
            **extra,
        )

    def _output(self, z: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
        """``F(z_t*)`` ``[N, C]`` from ``z`` ``[N, C, ...]``: one forward pass on the ``N`` chosen
        points."""
        chosen = tf.gather(z, label, batch_dims=1)
        return tf.nn.softmax(self._logits(chosen))

    # -- Keras plumbing --------------------------------------------------------------------------

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """As Keras', except that ``compile(metrics=[...])`` without a loss evaluates metrics only.

        A shell is evaluated, never trained, so a loss is optional: without one the reported loss
        is 0.
        """
        if self.loss is None and not self.losses:  # Keras sets `loss` in compile()
            return tf.constant(0.0)
        return super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )

    def train_step(self, data):
        raise NotImplementedError(
            f"{type(self).__name__} wraps a fixed base model and is not trained (it is not "
            f"differentiable in its input): train the base model, then wrap it."
        )

    def get_config(self) -> dict:
        """The keys every shell has (``name``, ``trainable``, ``base``, ``jit_compile``) and the
        subclass's own constructor keywords (:meth:`_shell_config`): a subclass declares only
        those; one that overrides this method merges ``super().get_config()`` (Keras' rule)."""
        return {
            "name": self.name,
            "trainable": self.trainable,
            "base": keras.saving.serialize_keras_object(self.base),
            "jit_compile": self.jit_compile,
            **self._shell_config(),
        }

    def settings(self) -> dict:
        """The shell's settings for reports: its kind, its own keywords, ``jit_compile``."""
        return dict(shell=self.kind, **self._shell_config(), jit_compile=self.jit_compile)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        base = keras.saving.deserialize_keras_object(config.pop("base"))
        return cls(base, **config)

    def _shell_config(self) -> dict:
        """The subclass's own constructor keywords (merged into :meth:`get_config`)."""
        return {}

    def _replace(self, **changes) -> FactorShell:
        """A new shell of the same class around the same ``base`` (shared, not copied: same
        weights, same compiled caches) with ``changes`` applied to its constructor keywords."""
        # A fresh name (Keras makes it unique); the base is passed as is, not serialised.
        config = {
            k: v for k, v in self.get_config().items() if k not in ("base", "name", "trainable")
        }
        copy = type(self)(self.base, **{**config, **changes})
        copy.proxy_labels = self.proxy_labels  # a proxy's copies (EOT seeds) stay proxies
        return copy

    def export(
        self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs
    ):
        """Writes a SavedModel with endpoints ``serve`` (probabilities) and ``embed`` (diagnostics).

        Both take ``x`` float32 ``[None, H, W, C]`` (pixels). The SavedModel needs neither Keras
        nor ``manifold_tf`` to run: ``tf.saved_model.load(path).serve(x)``. Other formats are
        delegated to :meth:`keras.Model.export`.
        """
        if format != "tf_saved_model":
            return super().export(
                filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs
            )
        spec = tf.TensorSpec((None,) + self.image_shape, tf.float32, name="x")
        archive = keras.export.ExportArchive()
        archive.track(self)
        archive.add_endpoint("serve", lambda x: self.embed_function(x)["probabilities"], [spec])
        archive.add_endpoint("embed", lambda x: self.embed_function(x), [spec])
        archive.write_out(filepath, verbose=bool(verbose))
