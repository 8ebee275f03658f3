"""FAB (Croce & Hein, ICML 2020), L-inf: the fast adaptive boundary attack, untargeted and FAB-T.

"Minimally distorted adversarial examples with a fast adaptive boundary attack". FAB looks for the
adversarial point of smallest L-inf distance to ``x``; ``epsilon`` only decides success (the best
point found lies within ``epsilon``) and the scale of the random restarts. Units: pixels (0..255)
for images, ``epsilon`` and the reported norms.

One run (AutoAttack's ``attack_single_run``), for ``steps`` iterations, on every point still
standing at once:

1. linearise, at the iterate ``x_k``, the boundary between the true label ``y`` and a label ``l``:
   ``f(z) ~ f(x_k) + w . (z - x_k)`` with ``f = Z_l - Z_y`` and ``w = grad f``. Untargeted: ``l``
   minimises ``|f_l| / ||w_l||_1`` over ``l != y`` (the nearest linearised boundary, needing the
   whole Jacobian); FAB-T: ``l`` is the run's target;
2. ``delta_k``, ``delta_0``: the smallest L-inf steps from ``x_k`` and from ``x`` onto that
   hyperplane inside the box [0, 255] (:func:`project_linf_hyperplane`, the box-aware projection);
3. the biased step ``x_{k+1} = clip((1 - a)(x_k + eta delta_k) + a (x + eta delta_0), 0, 255)``
   with ``a = min(|delta_k| / (|delta_k| + |delta_0|), alpha_max)`` (L-inf norms);
4. if ``x_{k+1}`` is misclassified it is a candidate (the one of smallest ``|x_{k+1} - x|_inf``
   is kept) and the backward step ``x_{k+1} = x + beta (x_{k+1} - x)`` moves it back toward ``x``.

As in AutoAttack, the first run of each target starts at ``x`` and a restart starts at
``x + epsilon / 2 * u / |u|_inf`` (``u`` uniform in ``[-1, 1]``, clipped to the box); FAB-T's
targets are the ``num_targets`` highest wrong labels of the clean logits, highest first; every run
attacks only the points still standing (:func:`~manifold_tf.attacks.runner.run_standing`) and
success is misclassification (also for FAB-T). Each run is one call of a ``tf.function`` compiled
once per (model, steps, targeted, image shape) with a ``None`` batch axis, its iterations one
``tf.while_loop``.

Choice where AutoAttack leaves room: a point not broken within ``epsilon`` gets its smallest
adversarial point projected onto ``N(x, epsilon)`` (for a linear model the point of the ball that
lowers the margin most), or ``x`` when no adversarial point was found; its success is then what a
forward pass at that point says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from manifold_tf import compiled, projected, seeds
from manifold_tf.attacks.common import DEFAULT_JIT_COMPILE, checkpoint_stops, prepare
from manifold_tf.attacks.fab_projection import project_linf_hyperplane
from manifold_tf.attacks.result import AttackResult
from manifold_tf.attacks.runner import Suite, TargetRun, check_num_targets, run_targets
from manifold_tf.validation import PIXEL_MAX, PIXEL_MIN, check_int

__all__ = ["FABSettings", "fab", "fab_t", "project_linf_hyperplane"]

_TINY = 1e-12  # AutoAttack's guard for ||w||_1 = 0 (a flat logit difference)
_MIN_STEP = 1e-8  # AutoAttack's floor on |delta| in alpha (both steps zero: alpha = 1/2)
# A model that is flat at a point (or reads its input through a cast) has a zero gradient there,
# not a missing one: FAB then takes no step (d = 0) instead of failing.
_ZERO = tf.UnconnectedGradients.ZERO


def _build_iterate(steps: int, targeted: bool):
    def build(net):
        def run(x, y, target, state, stop, knobs):
            # Iterations k..stop-1 of a run; state (k, x1, best, best_norm): the iteration, the
            # iterate and the best adversarial point, flat [n, D], and its norm [n]; knobs
            # (alpha_max, eta, beta).
            alpha_max, eta, beta = knobs
            shape = tf.shape(x)
            n = shape[0]
            x0 = tf.reshape(x, [n, -1])

            def logits_at(z):
                return net(tf.reshape(z, shape), training=False)

            def linearise(z):
                # (f [n], w [n, D]): the logit difference Z_l - Z_y at z and its gradient.
                with tf.GradientTape() as tape:
                    tape.watch(z)
                    logits = logits_at(z)
                    own = tf.gather(logits, y, batch_dims=1)
                    if targeted:
                        f = tf.gather(logits, target, batch_dims=1) - own
                if targeted:
                    return f, tape.gradient(f, z, unconnected_gradients=_ZERO)
                # Untargeted: every label's linearised distance, so all K gradients (one forward
                # and K backward passes, vectorised; on CPU as fast as a loop of K gradients or
                # one pass of the batch repeated K times, and the lightest in memory).
                jac = tape.batch_jacobian(logits, z, unconnected_gradients=_ZERO)  # [n, K, D]
                f_all = logits - own[:, None]
                w_all = jac - tf.gather(jac, y, batch_dims=1)[:, None]
                dist = tf.abs(f_all) / (_TINY + tf.reduce_sum(tf.abs(w_all), axis=-1))
                dist = tf.where(tf.one_hot(y, tf.shape(logits)[1]) > 0, tf.constant(np.inf), dist)
                label = tf.argmin(dist, axis=1, output_type=tf.int32)
                return tf.gather(f_all, label, batch_dims=1), tf.gather(w_all, label, batch_dims=1)

            def body(k, x1, best, best_norm):
                f, w = linearise(x1)
                # Hyperplane {z : f + w . (z - x1) = 0}: from x1 the step needs w . d = -f, from
                # x0 it needs w . d = -f - w . (x0 - x1). Both in one batch of 2n rows.
                r1 = -f
                r0 = -f - tf.reduce_sum(w * (x0 - x1), axis=1)
                d = project_linf_hyperplane(
                    tf.concat([x1, x0], 0), tf.concat([w, w], 0), tf.concat([r1, r0], 0)
                )
                d1, d0 = d[:n], d[n:]
                a1 = tf.maximum(tf.reduce_max(tf.abs(d1), axis=1), _MIN_STEP)
                a0 = tf.maximum(tf.reduce_max(tf.abs(d0), axis=1), _MIN_STEP)
                alpha = tf.minimum(a1 / (a1 + a0), alpha_max)[:, None]
                x1 = (1.0 - alpha) * (x1 + eta * d1) + alpha * (x0 + eta * d0)
                x1 = tf.clip_by_value(x1, PIXEL_MIN, PIXEL_MAX)
                adv = _misclassified(logits_at(x1), y)
                norm = tf.reduce_max(tf.abs(x1 - x0), axis=1)
                better = adv & (norm < best_norm)
                best = tf.where(better[:, None], x1, best)
                best_norm = tf.where(better, norm, best_norm)
                # The backward step: an adversarial iterate is pulled toward x, so the search
                # goes on closer to x instead of staying where it crossed.
                x1 = tf.where(adv[:, None], x0 + beta * (x1 - x0), x1)
                return k + 1, x1, best, best_norm

            return tf.while_loop(
                lambda k, *_: k < tf.minimum(stop, steps),
                body,
                tuple(state),
                maximum_iterations=steps,
            )

        return run

    return build


def _misclassified(logits, y):
    return tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)


def _build_finish():
    def build(net):
        def run(x, y, best, best_norm, eps):
            # Inside the ball the best point is kept as is (projection is then the identity);
            # outside, its projection onto N(x, eps); x when nothing adversarial was found.
            n = tf.shape(x)[0]
            x0 = tf.reshape(x, [n, -1])
            found = best_norm < np.inf
            x_adv = projected.project(tf.where(found[:, None], best, x0), x0, eps)
            success = _misclassified(net(tf.reshape(x_adv, tf.shape(x)), training=False), y)
            # A projected point the model gets wrong is an adversarial point found too.
            inside = tf.reduce_max(tf.abs(x_adv - x0), axis=1)
            best_norm = tf.where(success, tf.minimum(best_norm, inside), best_norm)
            return tf.reshape(x_adv, tf.shape(x)), success, best_norm

        return run

    return build


def _start(x: np.ndarray, eps: float, keys: np.ndarray, random: bool) -> tf.Tensor:
    """A run's first iterate ``[M, D]``: ``x``, or ``x + eps / 2 * u / |u|_inf`` in the box, ``u``
    drawn per point from ``keys`` int64 ``[M]``."""
    x0 = tf.reshape(tf.constant(x), [len(x), -1])
    if not random:
        return x0
    u = 2.0 * seeds.tf_uniform_rows(keys, tf.shape(x0)[1:]) - 1.0
    u = u / tf.maximum(tf.reduce_max(tf.abs(u), axis=1, keepdims=True), _TINY)
    return tf.clip_by_value(x0 + 0.5 * eps * u, PIXEL_MIN, PIXEL_MAX)


def _run(fns, x, y, target, eps, keys, restart, stops, knobs):
    """One FAB run on ``M`` points: ``(x_adv, success, norm, iterations)``, each ``[M]`` rows.

    ``fns``: the compiled ``(iterate, finish)``; ``knobs``: ``(alpha_max, eta, beta)`` float32
    scalars. The run pauses at ``stops`` (the last is ``steps``); at each pause before the last,
    the points with an adversarial point within ``eps`` leave with their best so far, the others
    go on alone.
    """
    iterate, finish = fns
    m = len(x)
    xt, yt, tt = tf.constant(x), tf.constant(y, tf.int32), tf.constant(target, tf.int32)
    x1 = _start(x, eps, keys, restart > 0)
    best, best_norm = tf.reshape(xt, [m, -1]), tf.fill([m], tf.constant(np.inf, tf.float32))
    best_out, norm_out = best.numpy(), best_norm.numpy()
    iterations, rows, done, k = np.zeros(m, np.int64), np.arange(m), 0, tf.constant(0)
    for stop in stops:
        k, x1, best, best_norm = iterate(
            xt, yt, tt, (k, x1, best, best_norm), tf.constant(stop, tf.int32), knobs
        )
        iterations[rows] += stop - done
        done = stop
        if stop == stops[-1]:
            break
        left = best_norm.numpy() <= np.float32(eps)
        if not left.any():
            continue
        best_out[rows[left]], norm_out[rows[left]] = best.numpy()[left], best_norm.numpy()[left]
        keep = np.flatnonzero(~left)
        rows = rows[keep]
        if not rows.size:
            break
        xt, yt, tt, x1, best, best_norm = (
            tf.gather(v, keep) for v in (xt, yt, tt, x1, best, best_norm)
        )
    if rows.size:
        best_out[rows], norm_out[rows] = best.numpy(), best_norm.numpy()
    z, ok, norm = finish(
        tf.constant(x),
        tf.constant(y, tf.int32),
        tf.constant(best_out),
        tf.constant(norm_out),
        tf.constant(eps, tf.float32),
    )
    return z.numpy(), ok.numpy(), norm.numpy(), iterations


def _check_unit(value, name: str, low: float, high: float, low_open: bool = False) -> float:
    value = float(value)
    ok = np.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"{name} must lie in {bracket}{low:g}, {high:g}]; got {value} "
            f"(AutoAttack's FAB uses alpha_max=0.1, eta=1.05, beta=0.9)."
        )
    return value


@dataclass(frozen=True)
class FABSettings:
    """FAB's knobs, for :func:`fab` and :func:`fab_t` (AutoAttack's values by default); refused
    with a ValueError naming the field when out of range.

    Attributes:
      steps: FAB iterations per run (AutoAttack: 100), >= 0.
      restarts: runs per target, >= 1; the first starts at ``x``, the others at random points
        (see the module docstring). Each run attacks only the points still standing.
      num_targets: FAB-T only: its targets, the highest wrong labels of the clean logits
        (AutoAttack: 9; at most ``K - 1``, checked against the model).
      alpha_max: cap of the bias toward ``x``, in [0, 1]. eta: overshoot, in [1, 2]. beta:
        backward step, in (0, 1].
      early_exit: stop searching a point once it has an adversarial point within ``epsilon``
        (checked at APGD's checkpoints, 22%, 41%, ... of a run: ``common.checkpoint_stops``):
        the same points succeed, at less cost, but ``norm`` is then the smallest norm found up to
        that checkpoint, not over the whole run. Off by default (FAB is a minimal-norm attack);
        an evaluation that needs only success turns it on.
      jit_compile: compile each run with XLA (XLA then compiles once per batch size it meets).
    """

    steps: int = 100
    restarts: int = 1
    num_targets: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    early_exit: bool = False
    jit_compile: bool = DEFAULT_JIT_COMPILE

    def __post_init__(self) -> None:
        checked = dict(
            steps=check_int(self.steps, "steps", 0),
            restarts=check_int(self.restarts, "restarts", 1),
            num_targets=check_int(self.num_targets, "num_targets", 1),
            alpha_max=_check_unit(self.alpha_max, "alpha_max", 0.0, 1.0),
            eta=_check_unit(self.eta, "eta", 1.0, 2.0),
            beta=_check_unit(self.beta, "beta", 0.0, 1.0, low_open=True),
            # Flags are read for their truth value, as they always were.
            early_exit=bool(self.early_exit),
            jit_compile=bool(self.jit_compile),
        )
        for name, value in checked.items():
            object.__setattr__(self, name, value)


_DEFAULTS = FABSettings()


def _compile(model, settings: FABSettings, targeted: bool, image_shape: tuple):
    """``(iterate, finish)``: a run's iterations and its last forward pass, cached per (model,
    steps, targeted, image shape)."""
    # A None batch axis: one trace serves every number of points still standing.
    images, labels = (
        tf.TensorSpec((None,) + image_shape, tf.float32),
        tf.TensorSpec([None], tf.int32),
    )
    flat, rows = tf.TensorSpec([None, int(np.prod(image_shape))], tf.float32), tf.TensorSpec([None])
    scalar, count = tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int32)
    iterate = compiled.cached(
        model,
        ("fab", settings.steps, targeted, image_shape),
        _build_iterate(settings.steps, targeted),
        jit_compile=settings.jit_compile,
        input_signature=[
            images,
            labels,
            labels,
            (count, flat, flat, rows),
            count,
            (scalar,) * 3,
        ],
    )
    finish = compiled.cached(
        model,
        ("fab_finish", image_shape),
        _build_finish(),
        jit_compile=settings.jit_compile,
        input_signature=[images, labels, flat, rows, scalar],
    )
    return iterate, finish


def _with_norms(suite: Suite, wrong: np.ndarray) -> AttackResult:
    """The merged result of FAB's runs, with ``norm`` and ``target`` for the points no run
    attacked (``wrong`` ``[N]``: misclassified at ``x``, norm 0; else ``inf``, target -1) and
    ``score = -norm``."""
    result = suite.result
    n = len(wrong)
    details = dict(result.details)
    unattacked = details["run"] < 0
    norm = details.get("norm", np.full(n, np.inf, np.float32)).astype(np.float32)
    norm[unattacked] = np.where(wrong[unattacked], 0.0, np.inf)
    target = details.get("target", np.full(n, -1, np.int32)).astype(np.int32)
    target[unattacked] = -1
    details.update(norm=norm, target=target)
    return result.replace(score=-norm, details=details)


def fab(
    model,
    x,
    y,
    *,
    epsilon: float,
    settings: FABSettings = _DEFAULTS,
    targeted: bool = False,
    seed=0,
) -> AttackResult:
    """FAB, L-inf: the smallest adversarial perturbation found, and success within ``epsilon``.

    Args:
      model: Keras model, images ``[N, H, W, C]`` (0..255) -> logits ``[N, K]``.
      x: images ``[N, H, W, C]`` float, pixels 0..255.
      y: true int labels ``[N]``.
      epsilon: L-inf budget in pixels (8 means 8/255 of the range): decides success and scales
        the restarts' random starts; the search itself minimises the norm.
      settings: :class:`FABSettings` (steps, restarts, num_targets, alpha_max, eta, beta, early
        exit, XLA).
      targeted: FAB-T (AutoAttack's standard version): one set of runs per target label, the
        ``settings.num_targets`` highest wrong labels of the clean logits (``<= K - 1``;
        AutoAttack: 9). Success is still misclassification.
      seed: seeds the restarts' starts: an int, or an int array ``[N]`` of per-point seeds (a
        point's starts then depend on its own seed only, not on the batch). Stateless.

    Returns:
      An :class:`~manifold_tf.attacks.result.AttackResult` of ``N`` rows: ``x_adv`` inside
      ``N(x, epsilon)`` and [0, 255] (the smallest adversarial point found when its norm is
      ``<= epsilon``, else that point projected onto the ball, else ``x``); ``success``: the
      model misclassifies ``x_adv`` (a forward pass at it); ``score``: ``-norm``;
      ``details["norm"]``: L-inf norm in pixels of the smallest adversarial point found over the
      runs on the point (``inf``: none; 0 for points misclassified at ``x``, which are returned
      at no cost), ``details["target"]``: the label of the run the point keeps (-1 untargeted or
      not attacked), ``details["run"]``: that run's index (-1: not attacked).

    Cost: one forward pass over the ``N`` points, then per run and point still standing
    ``steps`` gradient evaluations (with ``early_exit``, those up to the checkpoint where the
    point left) plus as many forward passes and one more. A FAB-T gradient is one
    forward+backward pass; an untargeted one is the Jacobian, one forward and ``K`` backward
    passes, counted as ``K``. ``base_passes`` counts these gradient passes: at most
    ``num_targets * restarts * steps`` (FAB-T) or ``restarts * steps * K`` (untargeted) per point.
    """
    targeted = bool(targeted)
    x, y, num_classes, epsilon = prepare(model, x, y, epsilon, "epsilon")
    if targeted:
        check_num_targets(settings.num_targets, num_classes)
    x_np, y_np = x.numpy(), y.numpy()
    n = len(x_np)
    point_seed = seeds.per_point(seed, n)
    if n == 0:
        return AttackResult.unattacked(
            x_np, norm=np.zeros(0, np.float32), target=np.zeros(0, np.int32)
        )
    # The clean forward pass: misclassified points are successes at x, and FAB-T's targets are
    # the top wrong labels of the clean logits.
    clean = model(x, training=False).numpy()
    fns = _compile(model, settings, targeted, tuple(int(d) for d in x.shape[1:]))
    per_step = 1 if targeted else num_classes
    knobs = tuple(
        tf.constant(v, tf.float32) for v in (settings.alpha_max, settings.eta, settings.beta)
    )
    stops = checkpoint_stops(settings.steps, settings.early_exit)

    def attack(xs, ys, idx, target, run: TargetRun) -> AttackResult:
        keys = seeds.fold(point_seed[idx], "fab", run.index)
        z, ok, norm, iterations = _run(
            fns, xs, ys, np.maximum(target, 0), epsilon, keys, run.restart, stops, knobs
        )
        return AttackResult(
            z,
            ok,
            base_passes=iterations * per_step,
            score=-norm,
            details={"norm": norm, "target": target},
        )

    suite = run_targets(
        attack,
        x_np,
        y_np,
        clean,
        num_targets=settings.num_targets if targeted else None,
        # epsilon 0: only x is in the ball, nothing to search (no run at all)
        restarts=settings.restarts if epsilon != 0.0 else 0,
        name=lambda run: f"fab-t{run.rank}-r{run.restart}" if targeted else f"fab-r{run.restart}",
    )
    return _with_norms(suite, np.argmax(clean, axis=1) != y_np)


def fab_t(
    model, x, y, *, epsilon: float, settings: FABSettings = _DEFAULTS, seed=0
) -> AttackResult:
    """FAB-T, AutoAttack's targeted FAB: :func:`fab` with ``targeted=True`` (see there)."""
    return fab(model, x, y, epsilon=epsilon, settings=settings, targeted=True, seed=seed)
