"""White-box attacks on a Keras model that returns logits: PGD, high-confidence search, CW L-inf.

- :func:`pgd`: L-inf projected gradient descent (Madry et al.), untargeted or targeted, with
  cross-entropy or CW-margin loss and random restarts.
- :func:`high_confidence`: for each point, the largest wrong-label confidence reachable in
  ``N(x, delta)`` (the search of the paper's separation test, Section 4 / Table 1).
- :func:`cw_linf` / :func:`cw_linf_details`: Carlini & Wagner's L-inf attack, batched (the loop
  lives in :mod:`manifold_tf.carlini_wagner`); :func:`cw_inner` is its fixed-(tau, const) inner
  loop, reusable inside another ``tf.function`` (the paper's CarliniWagnerShell).

PGD and the high-confidence search are both one call of :func:`projected.projected_ascent`.
Each attack runs as one compiled ``tf.function`` per (model, static settings), cached, so repeated
calls with the same input shape do not retrace (budgets, step sizes and seeds are passed as
tensors). Units: pixels (0..255) for images, budgets and step sizes. Every returned image lies in
its L-inf ball and in the box [0, 255].
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

from manifold_tf import projected
from manifold_tf.carlini_wagner import (
    CW_CPU,
    CW_PAPER,
    cw_inner,
    cw_schedule,
    from_tanh_space,
    to_tanh_space,
)
from manifold_tf.validation import check_logits, validate_images, validate_labels, validate_radius

__all__ = [
    "CW_CPU",
    "CW_PAPER",
    "cw_inner",
    "cw_linf",
    "cw_linf_details",
    "from_tanh_space",
    "high_confidence",
    "pgd",
    "to_tanh_space",
    "tracing_counts",
]

LOSSES = ("xent", "cw")
# XLA measured on the narrow ResNet, 2 CPU cores: see bench/bench_attacks.py and the module notes.
DEFAULT_JIT_COMPILE = False
_CHECK_ROWS = 8

# model -> {static settings: tf.function}. Weak keys: a cache entry dies with its model.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# model -> number of classes, once check_logits has accepted its outputs.
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(model, key: tuple, build, jit_compile: bool):
    """The cached ``tf.function`` of ``build(net)`` for ``key`` (one trace per input shape).

    ``net(z, training=False)`` calls ``model`` through a weak reference: a strong one inside the
    cached function would keep the model (the cache's key) alive forever.
    """
    per_model = _CACHE.setdefault(model, {})
    key = key + (("jit_compile", bool(jit_compile)),)
    if key not in per_model:
        ref = weakref.ref(model)

        def net(z, training=False):
            return ref()(z, training=training)

        per_model[key] = tf.function(build(net), jit_compile=bool(jit_compile), reduce_retracing=False)
    return per_model[key]


def tracing_counts(model) -> dict:
    """``{static settings: number of traces}`` of every attack compiled for ``model`` (diagnostics)."""
    return {k: f.experimental_get_tracing_count() for k, f in _CACHE.get(model, {}).items()}


def _seed_tensor(seed: int) -> tf.Tensor:
    return tf.constant([int(seed), 0], dtype=tf.int64)


def _prepare(model, x, y, budget: float, budget_name: str):
    """Validates inputs; returns ``(x float32 [N, ...], y int32 [N], num_classes, budget)``."""
    budget = validate_radius(budget, budget_name)
    x = validate_images(x, image_shape=None)
    num_classes = _CHECKED.get(model)
    if num_classes is None:
        # Logits vs probabilities is a property of the model: check it once, on a few rows (an
        # eager forward pass costs about as much as a few attack steps).
        num_classes = int(check_logits(model, x[:_CHECK_ROWS]).shape[-1])
        if x.shape[0]:
            _CHECKED[model] = num_classes
    y = validate_labels(y, num_examples=int(x.shape[0]), num_classes=num_classes)
    return x, y, num_classes, budget


def _margin(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """``Z_label - max_{j != label} Z_j`` per example, ``[N]``."""
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    own = tf.reduce_sum(onehot * logits, axis=-1)
    other = tf.reduce_max(logits - onehot * 1e9, axis=-1)
    return own - other


def _goal(logits: tf.Tensor, labels: tf.Tensor, targeted: bool) -> tf.Tensor:
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.equal(pred, labels) if targeted else tf.not_equal(pred, labels)


def _check_positive_int(value, name: str) -> int:
    if int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


# ----------------------------------------------------------------------------------------------
# PGD


def pgd(
    model,
    x,
    y,
    *,
    epsilon: float,
    steps: int,
    step_size: float,
    loss: str = "xent",
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    seed: int = 0,
    jit_compile: bool = DEFAULT_JIT_COMPILE,
) -> tf.Tensor:
    """L-inf PGD: ``restarts`` runs of ``steps`` signed-gradient steps of ``step_size`` pixels.

    Args:
      model: Keras model, images ``[N, H, W, C]`` (0..255) -> logits ``[N, K]``.
      x: images ``[N, H, W, C]`` float, pixels 0..255.
      y: int labels ``[N]``: the true labels (untargeted: move away from them) or the targets.
      epsilon: L-inf budget in pixels (8 means 8/255 of the range).
      loss: ``"xent"`` ascends the cross-entropy of ``y`` (targeted: ascends ``log F(x)_y``);
        ``"cw"`` ascends ``max_{j != y} Z_j - Z_y`` (targeted: ``Z_y - max_{j != y} Z_j``).
      random_start: start each run at a uniform point of ``N(x, epsilon)`` (else at ``x``).
      restarts: independent runs; per example the best is kept: a successful point (misclassified,
        or classified as the target) before an unsuccessful one, then the highest loss.
      seed: seeds the random starts (deterministic for a given seed).
      jit_compile: compile the loop with XLA.

    Returns:
      ``x_adv`` ``[N, H, W, C]`` float32 inside ``N(x, epsilon)`` and [0, 255]. Cost:
      ``restarts * steps`` forward+backward passes and ``restarts * 2`` (1 if ``restarts == 1``)
      forward passes of the model.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}.")
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}.")
    restarts = _check_positive_int(restarts, "restarts")
    step_size = validate_radius(step_size, "step_size")
    x, y, _, epsilon = _prepare(model, x, y, epsilon, "epsilon")
    if x.shape[0] == 0:
        return x
    key = ("pgd", steps, loss, bool(random_start), restarts, bool(targeted))

    def build(net):
        def objective_fn(labels):
            def objective(z):
                logits = net(z, training=False)
                if loss == "cw":
                    m = _margin(logits, labels)
                    return m if targeted else -m
                logp = tf.gather(tf.nn.log_softmax(logits), labels, batch_dims=1)
                return logp if targeted else -logp

            return objective

        def run(x, labels, eps, step, seed):
            objective = objective_fn(labels)
            expand = [-1] + [1] * (len(x.shape) - 1)

            def one_restart(r, best_z, best_f, best_ok):
                z0 = x
                if random_start:
                    seed_r = tf.random.experimental.stateless_fold_in(seed, r)
                    z0 = projected.random_start(x, eps, seed_r)
                z, f = projected.projected_ascent(
                    objective, x, z0, radius=eps, steps=steps, step_size=step
                )
                if restarts == 1:  # nothing to choose between: skip the forward pass
                    return r + 1, z, f, best_ok
                ok = _goal(net(z, training=False), labels, targeted)
                # A success beats a failure; among equals, the higher loss wins.
                better = (ok & ~best_ok) | ((ok == best_ok) & (f > best_f))
                best_z = tf.where(tf.reshape(better, expand), z, best_z)
                return r + 1, best_z, tf.where(better, f, best_f), best_ok | ok

            n = tf.shape(x)[:1]
            init = (tf.constant(0), x, tf.fill(n, -np.inf), tf.zeros(n, tf.bool))
            _, z, _, _ = tf.while_loop(
                lambda r, *_: r < restarts, one_restart, init, maximum_iterations=restarts
            )
            return projected.project(z, x, eps)

        return run

    fn = _compiled(model, key, build, jit_compile)
    return fn(x, y, tf.constant(epsilon, tf.float32), tf.constant(step_size, tf.float32), _seed_tensor(seed))


# ----------------------------------------------------------------------------------------------
# High-confidence search (separation test)


def high_confidence(
    model,
    x,
    y,
    *,
    delta: float,
    steps: int,
    step_size: float,
    optimizer: str = "sign",
    random_start: bool = False,
    seed: int = 0,
    jit_compile: bool = DEFAULT_JIT_COMPILE,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The most confident wrong prediction reachable in ``N(x, delta)``, per point.

    For every point ``i`` and every wrong label ``t != y_i`` it ascends ``log F(z)_t`` over
    ``N(x_i, delta)`` (:func:`projected.projected_ascent`); all ``N * (K - 1)`` problems run as one
    batch. Each candidate ``z_t`` is scored by its wrong-label confidence ``max_{j != y} F(z_t)_j``
    (usually ``F(z_t)_t``), and the best candidate per point is returned.

    Args:
      model: Keras model, images -> logits ``[N, K]``.
      x: images ``[N, H, W, C]``, pixels 0..255. y: true labels ``[N]``.
      delta: radius of the neighbourhood in pixels.
      steps, step_size: ascent steps and their size (pixels; the Adam learning rate for "adam").
      optimizer: ``"sign"`` (PGD steps) or ``"adam"``.
      random_start: start each ascent at a uniform random point of the ball (else at ``x``).

    Returns:
      ``(x_best [N, H, W, C], confidence [N], label [N])``: the best point, its wrong-label
      confidence ``max_{j != y} F(x_best)_j`` in [0, 1], and that label ``j``. Cost:
      ``(K - 1) * (steps + 2)`` model passes per point, ``(K - 1) * steps`` with a backward pass.
    """
    if optimizer not in projected.OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {projected.OPTIMIZERS}; got {optimizer!r}.")
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}.")
    step_size = validate_radius(step_size, "step_size")
    x, y, num_classes, delta = _prepare(model, x, y, delta, "delta")
    if x.shape[0] == 0:
        return x, tf.zeros([0]), tf.zeros([0], tf.int32)
    key = ("high_confidence", steps, optimizer, bool(random_start))

    def build(net):
        def run(x, labels, radius, step, seed):
            k = num_classes - 1
            n = tf.shape(x)[0]
            # Row i * k + (s - 1) targets label (y_i + s) mod K, s = 1..K-1: every wrong label once.
            shifts = tf.range(1, num_classes, dtype=tf.int32)
            targets = tf.reshape((labels[:, None] + shifts[None, :]) % num_classes, [-1])
            xt = tf.repeat(x, k, axis=0)

            def objective(z):
                logp = tf.nn.log_softmax(net(z, training=False))
                return tf.gather(logp, targets, batch_dims=1)

            z0 = projected.random_start(xt, radius, seed) if random_start else xt
            z, _ = projected.projected_ascent(
                objective, xt, z0, radius=radius, steps=steps, step_size=step, optimizer=optimizer
            )
            z = projected.project(z, xt, radius)
            probs = tf.nn.softmax(net(z, training=False))
            own = tf.one_hot(tf.repeat(labels, k), num_classes, dtype=probs.dtype)
            wrong = probs * (1.0 - own) - own  # the true label can never be chosen
            conf = tf.reshape(tf.reduce_max(wrong, axis=-1), [n, k])
            label = tf.reshape(tf.argmax(wrong, axis=-1, output_type=tf.int32), [n, k])
            best = tf.argmax(conf, axis=-1, output_type=tf.int32)
            rows = tf.range(n) * k + best
            return tf.gather(z, rows), tf.gather(conf, best, batch_dims=1), tf.gather(label, best, batch_dims=1)

        return run

    fn = _compiled(model, key, build, jit_compile)
    return fn(x, y, tf.constant(delta, tf.float32), tf.constant(step_size, tf.float32), _seed_tensor(seed))


# ----------------------------------------------------------------------------------------------
# Carlini-Wagner L-inf


def cw_linf_details(
    model,
    x,
    y,
    *,
    epsilon: float,
    targeted: bool = False,
    max_iterations: int = CW_PAPER["max_iterations"],
    learning_rate: float = CW_PAPER["learning_rate"],
    initial_const: float = CW_PAPER["initial_const"],
    const_factor: float = CW_PAPER["const_factor"],
    largest_const: float = CW_PAPER["largest_const"],
    initial_tau: float = CW_PAPER["initial_tau"],
    decrease_factor: float = CW_PAPER["decrease_factor"],
    min_tau: float = CW_PAPER["min_tau"],
    stop_within_epsilon: bool = False,
    max_total_iterations: int | None = None,
    jit_compile: bool = DEFAULT_JIT_COMPILE,
) -> dict:
    """Carlini & Wagner's L-inf attack (their ``li_attack.py``), batched (:mod:`carlini_wagner`).

    The defaults are the paper's settings (``CW_PAPER``); ``**CW_CPU`` is a ~10x cheaper preset.
    A success is the last point of the tau schedule (Carlini & Wagner's answer) whose L-inf
    distance is ``<= epsilon``; it is clipped into ``N(x, epsilon)`` (a no-op up to rounding) and
    checked again with the model.

    Args:
      model: Keras model, images -> logits ``[N, K]``.
      x: images ``[N, H, W, C]``, pixels 0..255.
      y: labels ``[N]``: untargeted, the labels to move away from (true labels, or the model's
        predictions as in the paper's Table 2); targeted, the targets.
      epsilon: L-inf budget in pixels for a success.
      max_iterations ... min_tau: the schedule (pixel units for taus); see :data:`CW_PAPER`.
      stop_within_epsilon: stop an example once it has a success within ``epsilon`` (the success
        mask is unchanged, ``x_adv`` is then that point instead of the smallest one): cheaper, not
        in the original.
      max_total_iterations: safety cap on the loop length (``None``: none).

    Returns:
      dict with ``x_adv`` ``[N, ...]`` (``x`` where no success), ``success`` bool ``[N]``,
      ``distance`` float ``[N]`` (L-inf of the last success of the schedule, pixels; ``inf`` if
      none), ``iterations`` int ``[N]`` (forward+backward passes spent on each example),
      ``total_steps`` (length of the batched loop) and ``settings`` (every knob used).
    """
    settings = dict(
        targeted=bool(targeted),
        max_iterations=_check_positive_int(max_iterations, "max_iterations"),
        learning_rate=float(learning_rate),
        initial_const=float(initial_const),
        const_factor=float(const_factor),
        largest_const=float(largest_const),
        initial_tau=validate_radius(initial_tau, "initial_tau"),
        decrease_factor=float(decrease_factor),
        min_tau=validate_radius(min_tau, "min_tau"),
        stop_within_epsilon=bool(stop_within_epsilon),
        max_total_iterations=None if max_total_iterations is None else int(max_total_iterations),
    )
    if not 0.0 < settings["decrease_factor"] < 1.0:
        raise ValueError(f"decrease_factor must be in (0, 1); got {decrease_factor}.")
    if settings["const_factor"] <= 1.0:
        raise ValueError(f"const_factor must be > 1; got {const_factor}.")
    if not 0.0 < settings["initial_const"] < settings["largest_const"]:
        raise ValueError(
            f"need 0 < initial_const < largest_const; got {initial_const} and {largest_const}."
        )
    if settings["learning_rate"] <= 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
    x, y, _, epsilon = _prepare(model, x, y, epsilon, "epsilon")
    settings["epsilon"] = epsilon
    if x.shape[0] == 0:
        n0 = tf.zeros([0])
        return dict(x_adv=x, success=tf.zeros([0], tf.bool), distance=n0,
                    iterations=tf.zeros([0], tf.int32), total_steps=0, settings=settings)
    static = {k: v for k, v in settings.items() if k != "epsilon"}
    key = ("cw_linf",) + tuple(sorted(static.items()))

    def build(net):
        def run(x, labels, eps):
            out = cw_schedule(net, x, labels, epsilon=eps, **static)
            x_adv = projected.project(tf.where(_bcast(out["within"], x), out["x_within"], x), x, eps)
            ok = out["within"] & _goal(net(x_adv, training=False), labels, static["targeted"])
            x_adv = tf.where(_bcast(ok, x), x_adv, x)
            return x_adv, ok, out["distance"], out["iterations"], out["total_steps"]

        return run

    fn = _compiled(model, key, build, jit_compile)
    x_adv, ok, dist, iters, total = fn(x, y, tf.constant(epsilon, tf.float32))
    return dict(x_adv=x_adv, success=ok, distance=dist, iterations=iters,
                total_steps=int(total), settings=settings)


def _bcast(mask: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(mask, [-1] + [1] * (len(x.shape) - 1))


def cw_linf(model, x, y, *, epsilon: float, **kwargs) -> tf.Tensor:
    """``cw_linf_details(...)["x_adv"]``: per example the attack's point if within ``epsilon``, else ``x``."""
    return cw_linf_details(model, x, y, epsilon=epsilon, **kwargs)["x_adv"]
