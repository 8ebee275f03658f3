"""Adaptive attacks on the model shells: BPDA with the identity approximation of the search factor.

A factor shell ``G(x) = F(z_t*(x))`` is not differentiable in ``x`` (an argmax over a ball, then
over labels). BPDA (Athalye, Carlini & Wagner, 2018) runs the real search on the forward pass and
replaces it by the identity on the backward pass, ``z_t(x') ~ x' + (z_t(x') - x')`` with the offset
held constant: ``d/dx' F(z_t) ~ F'(z_t)``, the base's gradient *at the shell's own point*. For
MCN_delta that is Danskin's theorem (away from the box), so the surrogate is principled there.

Each step ascends a difference of two rows, each a (point of the shell, label) pair:

    L(x') = s_up * lo_up(z_up) - s_down * lo_down(z_down)

``lo`` the log-odds of :func:`shells.log_odds` (the score the shells rank by). Untargeted, ``up`` is
the best wrong label by the shell's own ranking at ``x'`` and ``down`` is ``y``; targeted (a fixed
wrong ``target`` per point), ``up`` is the target and ``down`` the best other label. The shell's
decision rule decides what "best" and the scales mean:

* MCN (and CW ``all_labels``): labels ranked by ``lo_t(z_t)``; ``s = 1``.
* NCN: a label meeting ``p`` outranks every label that does not, met labels ranked by distance
  ``d_t``, the rest by log-odds (its fallback). While ``down`` does not meet ``p`` the race is one
  of log-odds, as for MCN (``s = 1``; raising ``lo_up`` also makes ``up`` meet ``p``, which wins).
  Once ``down`` meets ``p`` at ``d_down`` the race is one of distances: ``up`` must meet ``p``
  nearer than ``d_down``. By the envelope theorem (KKT of
  ``min ||z - x'||_inf s.t. lo_t(z) >= logit p``),
  ``d d_t / d x' = -lo_t'(z_t) / ||lo_t'(z_t)||_1``; for a label not yet meeting ``p`` the same
  holds for its linearised distance ``d_t + (logit p - lo_t) / ||lo_t'||_1``. So the ascended
  surrogate is ``d_down - d_up``: ``s = 1 / ||lo'||_1`` per row (both terms in pixels of distance).
* CW ``paper_code``: every candidate is scored by its *own top label* (``candidate_labels``), so a
  row is a (candidate, its top label) pair: ``up`` the best candidate whose top label is wrong
  (targeted: is the target), ``down`` the best candidate whose top label is ``y`` (targeted: is not
  the target). When no candidate has the wanted top label, ``up`` is the candidate searched for the
  wanted label ``t`` (untargeted: the one where ``y`` is least confident), ascending ``lo_t`` there.

Steps are signed: fixed (``schedule="sign"``, L-inf PGD) or Auto-PGD's (``"apgd"``: step
``2 epsilon`` halved at the checkpoints of :func:`projected.apgd_checkpoints` when progress stalls,
restart from the best point, momentum 0.75; Croce & Hein 2020), the progress measure being the
shell's own margin (below). Every iterate is projected onto ``N(x, epsilon)`` and the box.

Verification: the real shell is evaluated at every iterate (through a proxy, a cheaper copy of
the shell, at the first and last, and wherever the proxy claims a success), and per point the
first iterate where the shell's label is not ``y`` is kept and frozen; a reported success is a
misclassification by the shell, never a property of the surrogate (also for targeted runs, as in
AutoAttack's APGD-T). A shell with
randomness (``random_start``) is attacked with EOT when ``eot_samples > 0``: the gradient and the
progress measure are averaged over copies of the shell with other seeds, and success is judged by
the shell itself, whose draw the attack never used otherwise. BPDA success rates are lower bounds.

Units: pixels (0..255). :mod:`manifold_tf.attacks.bpda_suite` chains runs and adds ``lift``.
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

from manifold_tf import compiled, projected, seeds
from manifold_tf.attacks.common import check_progress
from manifold_tf.attacks.known import KnownOutputs, embed
from manifold_tf.attacks.proxied import check_best, check_proxy, confirmed
from manifold_tf.attacks.result import AttackResult
from manifold_tf.attacks.surrogate import proxy_slots, surrogate_rows
from manifold_tf.projected import SCHEDULES, madry_step_size
from manifold_tf.shells import FactorShell, log_odds
from manifold_tf.validation import (
    PIXEL_MAX,
    PIXEL_MIN,
    check_choice,
    check_int,
    validate_images,
    validate_labels,
    validate_radius,
)

__all__ = ["SCHEDULES", "bpda", "check_progress"]

APGD_RHO, APGD_MOMENTUM = 0.75, 0.75  # Croce & Hein 2020
# shell -> {seed: copy of the shell with that seed} (EOT samples; one trace per copy).
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _grad_function(base, image_shape: tuple[int, ...], num_classes: int):
    """The cached compiled surrogate gradient for ``base``: a forward+backward pass on ``2 M`` rows.

    ``(z [M, C, ...], up_slot, up_label, down_slot, down_label [M], scaled [M] bool)`` ->
    ``s_up lo_up'(z_up) - s_down lo_down'(z_down)`` ``[M, ...]`` (the identity approximation: this
    is the surrogate's gradient in ``x'``), ``s = 1 / ||lo'||_1`` where ``scaled``, else 1. The
    batch axis is ``None``: traced once although the batch shrinks as points succeed.
    """
    ints = tf.TensorSpec((None,), tf.int32)
    signature = [
        tf.TensorSpec((None, None) + tuple(image_shape), tf.float32),
        ints,
        ints,
        ints,
        ints,
        tf.TensorSpec((None,), tf.bool),
    ]
    expand = [-1] + [1] * len(image_shape)

    def build(net):
        def grad(z, up_slot, up_label, down_slot, down_label, scaled):
            m = tf.shape(z)[0]
            points = tf.concat(
                [tf.gather(z, up_slot, batch_dims=1), tf.gather(z, down_slot, batch_dims=1)], 0
            )
            with tf.GradientTape() as tape:
                tape.watch(points)
                logits = tf.cast(net(points, training=False), tf.float32)
                # Rows are independent: the gradient of the sum is each row's own.
                total = tf.reduce_sum(log_odds(logits, tf.concat([up_label, down_label], 0)))
            g = tape.gradient(total, points, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            l1 = tf.reduce_sum(tf.abs(g), axis=list(range(1, len(image_shape) + 1)))
            scale = tf.where(tf.concat([scaled, scaled], 0), 1.0 / (l1 + 1e-30), tf.ones_like(l1))
            g = g * tf.reshape(scale, expand)
            return g[:m] - g[m:]

        return grad

    return compiled.cached(
        base, ("bpda", tuple(image_shape), int(num_classes)), build, input_signature=signature
    )


def check_shell(shell) -> None:
    if not isinstance(shell, FactorShell):
        raise ValueError(
            f"shell must be a model shell (a manifold_tf.shells.FactorShell: MCNShell, NCNShell, "
            f"CarliniWagnerShell or a registered one); got {type(shell).__name__}. To attack a "
            f"plain base model use manifold_tf.attacks.pgd or apgd_ce."
        )


def prepare(shell, x, y, epsilon, target=None):
    """Validated ``(x float32 numpy, y int32, epsilon, target int32 or None)``."""
    check_shell(shell)
    epsilon = validate_radius(epsilon, "epsilon")
    x = validate_images(x, image_shape=tuple(shell.image_shape)).numpy()
    c = int(shell.num_classes)
    y = validate_labels(y, num_examples=len(x), num_classes=c).numpy()
    if target is not None:
        target = validate_labels(target, num_examples=len(x), num_classes=c, name="target").numpy()
        if (target == y).any():
            raise ValueError(
                f"target must differ from y (a wrong label per point); target == y "
                f"at indices {np.flatnonzero(target == y).tolist()}."
            )
    return x, y, epsilon, target


def eot_shells(shell, eot_samples: int, seed) -> list:
    """``eot_samples`` copies of a random shell with seeds other than its own (cached); ``[]`` for a
    deterministic shell (nothing to average) or ``eot_samples == 0``. Per-point seeds (an array):
    from the shell's seed alone, so the batch does not matter (a copy keys a point's draw by it)."""
    eot_samples = check_int(eot_samples, "eot_samples", 0)
    if not eot_samples or not shell.is_random:
        return []
    seed = int(seed) if np.ndim(seed) == 0 else 0
    rng = np.random.default_rng([seed & 0x7FFFFFFF, int(shell.seed) & 0x7FFFFFFF, 17])
    draws = rng.integers(0, 2**31 - 1, 2 * eot_samples + 1)
    seeds = [s for s in dict.fromkeys(draws.tolist()) if s != shell.seed]
    copies = _COPIES.setdefault(shell, {})
    for s in seeds[:eot_samples]:
        if int(s) not in copies:
            copies[int(s)] = shell.with_seed(int(s))
    return [copies[int(s)] for s in seeds[:eot_samples]]


def check_x_init(shell, x: np.ndarray, x_init) -> np.ndarray:
    x_init = validate_images(x_init, image_shape=tuple(shell.image_shape), name="x_init").numpy()
    if x_init.shape != x.shape:
        raise ValueError(f"x_init must have shape {x.shape} (like x); got {x_init.shape}.")
    return x_init


def empty_result(x: np.ndarray, steps: int, target=None) -> dict:
    """The working state of a BPDA run (numpy arrays ``[N]``), turned into an
    :class:`AttackResult` by :func:`as_result`."""
    n = len(x)
    return dict(
        x_adv=x.copy(),
        success=np.zeros(n, bool),
        shell_label=np.zeros(n, np.int32),
        margin=np.full(n, -np.inf, np.float32),
        steps_used=np.full(n, steps, np.int32),
        shell_evals=np.zeros(n, np.int64),
        base_passes=np.zeros(n, np.int64),
        target=np.full(n, -1, np.int32) if target is None else np.array(target, np.int32),
    )


def as_result(res: dict) -> AttackResult:
    """:class:`AttackResult` of a BPDA state: ``score`` is the shell's margin, ``details`` hold
    ``shell_label``, ``steps_used`` and ``target``."""
    return AttackResult(
        res["x_adv"],
        res["success"],
        base_passes=res["base_passes"],
        shell_predictions=res["shell_evals"],
        score=res["margin"],
        details={k: res[k] for k in ("shell_label", "steps_used", "target")},
    )


# ---- one run ------------------------------------------------------------------------------------


def bpda(
    shell,
    x,
    y,
    *,
    epsilon: float,
    steps: int = 20,
    step_size: float | None = None,
    x_init=None,
    random_start: bool = False,
    seed: int = 0,
    target=None,
    schedule: str = "sign",
    eot_samples: int = 0,
    warm_steps: int = 0,
    proxy=None,
    known: KnownOutputs | None = None,
    progress=None,
) -> AttackResult:
    """One L-inf BPDA run on a factor shell (identity approximation of its search; see the module).

    Per step, on the points not yet fooled: evaluate the shell at ``x'``; a point it gets wrong is
    done and keeps that ``x'``; the others step along the surrogate's gradient, projected.

    Args:
      shell: an MCNShell, NCNShell or CarliniWagnerShell (``embed_function``, ``base``).
      x: clean images ``[N, H, W, 3]``, float, pixels 0..255. y: true labels ``[N]`` (int).
      epsilon: L-inf budget in pixels (8 means 8/255). steps: attack steps ``>= 0``.
      step_size: pixels per signed step of ``schedule="sign"``; default ``2.5 * epsilon / steps``.
        Not for ``"apgd"`` (which starts at ``2 * epsilon`` and halves it).
      x_init: optional start ``[N, H, W, 3]`` (e.g. a transfer ``x'``), projected into the ball.
      random_start: start uniformly in ``N(x, epsilon)`` (from ``seed``); not with ``x_init``.
      seed: seeds the random start and the choice of EOT seeds: an int, or an int array ``[N]``
        of per-point seeds (a point's start then ignores its batch: :func:`manifold_tf.seeds`).
      target: optional wrong labels ``[N]``: a targeted run (the surrogate raises the target
        against the best other label); success is still any wrong answer of the shell.
      schedule: ``"sign"`` (fixed steps) or ``"apgd"`` (Auto-PGD's schedule and momentum).
      eot_samples: for a shell with ``random_start``: average the gradient and the progress
        measure over this many copies with other seeds (0: use the shell's own evaluation).
        Ignored for deterministic shells.
      warm_steps: with ``> 0`` (a deterministic shell that offers
        :meth:`~manifold_tf.shells.FactorShell.warm_search`), the steps between the first and
        the last evaluate the attacker's approximation of the shell instead of the shell: its
        search warm-started from the previous step's points, ``warm_steps`` steps per label.
        Every success it claims is checked with the shell itself (and the last iterate is
        always the shell's), so reported successes stay the shell's; only the gradient and
        the progress measure come from the approximation.
      proxy: a cheaper copy of the shell (``shell.proxy(steps=..., labels=...)``, issue 22's
        surrogate) to steer by: the steps between the first and the last take their gradient,
        progress measure and decisions from it (and EOT's copies are its copies); every success
        it claims is checked on the shell before the point is frozen (the point goes on if the
        shell disagrees), the first and last iterates are the shell's, and at the end each
        point's best iterate by the proxy's margin is checked on the shell too. A proxy
        searching some labels only searches ``y``, the target and the best wrong labels by the
        shell's ranking at the start. ``None`` (or the shell itself): the shell at every step.
      known: the shell's outputs at images already evaluated
        (:class:`~manifold_tf.attacks.known.KnownOutputs`): an iterate is read from it when it
        holds every row (no shell prediction paid: the first, at x or at a transfer x'), else
        predicted; every shell prediction the attack makes is recorded in it (the suite's
        verification of a failed point reads it).
      progress: optional callable ``(done_steps, total_steps, points_standing)``.

    Returns:
      :class:`AttackResult`: ``x_adv`` float32 ``[N, H, W, 3]`` (the first iterate where the
      shell was wrong, else the last; in ``N(x, epsilon)`` and the box), ``success`` (the shell's
      label at ``x_adv`` is not ``y``), ``score`` (the shell's untargeted margin at ``x_adv``,
      :func:`surrogate_rows`: ``> 0`` iff wrong, up to ties), ``shell_predictions`` (of the
      shell itself only) and ``base_passes`` (forward+backward base passes outside them: the
      gradients, and a proxy's predictions at the proxy's own ``passes_per_prediction``),
      ``details``:
      ``shell_label``, ``steps_used`` (the step of the success, 0 = the start; ``steps`` if none)
      and ``target`` (-1: untargeted).

    The label is the shell's on the batch of points still running; a random shell keys its draw
    by the point's input, whatever the batch (EOT copies are cached per seed: one trace each).

    Cost per point: at most ``steps + 1`` shell predictions (each about ``C * K`` forward+backward
    passes of the base, ``K`` the shell's steps) plus ``steps * eot`` for EOT copies, and
    ``2 * steps * max(1, eot)`` forward+backward base passes (two rows per step and sample).
    Through a proxy: 2 shell predictions (plus one per success the proxy claims and one for the
    best iterate), and ``(steps - 1 + steps * eot) * proxy.passes_per_prediction()`` more base
    passes.
    """
    x, y, epsilon, target = prepare(shell, x, y, epsilon, target)
    steps = check_int(steps, "steps", 0)
    warm_steps = check_int(warm_steps, "warm_steps", 0)
    schedule = check_choice(schedule, "schedule", SCHEDULES)
    if schedule == "apgd" and step_size is not None:
        raise ValueError(
            f"step_size is for schedule='sign'; APGD starts at 2 * epsilon and halves "
            f"it (got step_size={step_size})."
        )
    step_size = validate_radius(
        madry_step_size(epsilon, steps) if step_size is None else step_size, "step_size"
    )
    progress = check_progress(progress)
    sur = check_proxy(shell, proxy)
    if sur is not shell and warm_steps:
        raise ValueError("give a proxy or warm_steps, not both (two approximations of the shell).")
    seeds.per_point(seed, len(x))  # a clear error for a seed array of the wrong shape
    copies = eot_shells(sur, eot_samples, seed)
    if x_init is not None:
        if random_start:
            raise ValueError("give either x_init or random_start=True, not both.")
        start = np.clip(check_x_init(shell, x, x_init), x - epsilon, x + epsilon)
    elif random_start:
        keys = seeds.row_keys(seed, len(x), "bpda", 0)
        start = projected.random_start_rows(tf.constant(x), epsilon, keys).numpy()
    else:
        start = x
    res = empty_result(start, steps, target)
    if len(x) == 0:
        return as_result(res)
    lo_box, hi_box = np.maximum(x - epsilon, PIXEL_MIN), np.minimum(x + epsilon, PIXEL_MAX)
    grad_fn = _grad_function(shell.base, tuple(shell.image_shape), int(shell.num_classes))
    x_adv = res["x_adv"]
    apgd = _Apgd(start, epsilon, steps) if schedule == "apgd" else None
    active = np.arange(len(x))
    warm = None if copies or not warm_steps else shell.warm_search(warm_steps)
    z_prev = None  # the search's points at the previous iterate (warm start), [active, C, ...]
    slots = None  # [N, S]: the labels a proxy searching some labels only searches per point
    if sur is not shell:  # its best iterate by its own margin, checked on the shell at the end
        best = dict(x=start.copy(), margin=np.full(len(x), -np.inf), k=np.zeros(len(x), np.int32))

    def search(net, xs, idx):
        if slots is None:
            return net.embed_function(tf.constant(xs))
        return net.embed_labels(xs, slots[idx])

    for k in range(steps + 1):
        current = x_adv[active]
        approx = 0 < k < steps and (sur is not shell or (warm is not None and z_prev is not None))
        if approx:  # the approximation decides, each success it claims checked on the shell
            if sur is not shell:
                out = search(sur, current, active)
                res["base_passes"][active] += sur.passes_per_prediction()
            else:
                out = warm(tf.constant(current), tf.constant(z_prev))
                res["base_passes"][active] += shell.rows_per_image * warm_steps
            sc = sur.scores(out)
            pick, margin, claimed = confirmed(shell, current, y[active], sc, res, active, known)
            if sur is not shell:
                own = np.where(claimed, -np.inf, surrogate_rows(sc, y[active]).margin)
                better = own > best["margin"][active]
                best["x"][active[better]] = current[better]
                best["margin"][active[better]], best["k"][active[better]] = own[better], k
        else:
            out, paid = embed(shell, current, known)
            res["shell_evals"][active] += int(paid)
            sc = shell.scores(out)
            pick, margin = sc.pick, surrogate_rows(sc, y[active]).margin
            if k == 0 and sur is not shell and sur.proxy_labels is not None:
                slots = proxy_slots(sc, y, sur.proxy_labels, int(shell.num_classes), target)
        res["shell_label"][active], res["margin"][active] = pick, margin
        done = pick != y[active]
        res["success"][active[done]] = True
        res["steps_used"][active[done]] = k
        keep, active = ~done, active[~done]
        if progress is not None:
            progress(k if active.size else steps, steps, int(active.size))
        if k == steps or active.size == 0:
            break
        if warm is not None:
            z_prev = out["z"].numpy()[keep]
        current = current[keep]
        tk = None if target is None else target[active]
        if copies:
            samples = [(c, search(c, current, active)) for c in copies]
            if sur is shell:
                res["shell_evals"][active] += len(copies)
            else:
                res["base_passes"][active] += len(copies) * sur.passes_per_prediction()
        else:
            net = sur if approx else shell
            samples = [(net, {key: tf.boolean_mask(v, keep) for key, v in out.items()})]
        rows = [surrogate_rows(c.scores(o), y[active], tk) for c, o in samples]

        def cat(f, rows=rows):
            return tf.constant(np.concatenate([getattr(r, f) for r in rows]))

        g = grad_fn(
            tf.concat([o["z"] for _, o in samples], 0),
            cat("up"),
            cat("up_label"),
            cat("down"),
            cat("down_label"),
            cat("scaled"),
        ).numpy()
        g = g.reshape((len(samples), len(active)) + g.shape[1:]).mean(0)
        # The shell's declared stand-in for its search (identity by default: g unchanged).
        g = np.asarray(shell.bpda_vjp(current, g))
        res["base_passes"][active] += 2 * len(samples)
        lo, hi = lo_box[active], hi_box[active]
        if apgd is None:
            nxt = np.clip(current + step_size * np.sign(g), lo, hi)
        else:
            f = np.mean(np.clip([r.margin for r in rows], -1e9, 1e9), axis=0)  # no inf - inf
            nxt = apgd.step(k, active, current, g, f, lo, hi)
        x_adv[active] = nxt
    if sur is not shell:
        check_best(shell, y, res, best, known)
    return as_result(res)


class _Apgd:
    """Auto-PGD's step-size schedule and momentum (as :func:`projected.apgd_ascent`), per point, in
    numpy: the BPDA loop evaluates the real shell between steps, so it cannot be one compiled loop.
    The objective ``f`` is the shell's margin at the current iterate (higher is better)."""

    def __init__(self, start: np.ndarray, epsilon: float, steps: int):
        n = len(start)
        self.eta = np.full(n, 2.0 * epsilon, np.float32)
        self.x_prev, self.x_best = start.copy(), start.copy()
        self.g_best = np.zeros_like(start)
        self.f_prev, self.f_best = np.full(n, np.inf), np.full(n, -np.inf)
        self.f_last = np.full(n, -np.inf)
        self.count, self.reduced_last = np.zeros(n), np.zeros(n, bool)
        checks = [w for w in projected.apgd_checkpoints(steps) if w < steps]
        self.since = {w: float(w - prev) for prev, w in zip(checks, checks[1:], strict=False)}

    def step(self, i, a, z, g, f, lo, hi):
        expand = (-1,) + (1,) * (z.ndim - 1)
        self.count[a] += f > self.f_prev[a]
        better = f > self.f_best[a]
        self.x_best[a[better]], self.g_best[a[better]] = z[better], g[better]
        self.f_best[a[better]] = f[better]
        if i in self.since:
            reduce = (self.count[a] < APGD_RHO * self.since[i]) | (
                ~self.reduced_last[a] & (self.f_best[a] <= self.f_last[a])
            )
            self.eta[a[reduce]] /= 2.0
            z = np.where(reduce.reshape(expand), self.x_best[a], z)
            g = np.where(reduce.reshape(expand), self.g_best[a], g)
            f = np.where(reduce, self.f_best[a], f)
            self.f_last[a], self.reduced_last[a], self.count[a] = self.f_best[a], reduce, 0.0
        alpha = APGD_MOMENTUM if i > 0 else 1.0  # the first step has no previous point
        z_step = np.clip(z + self.eta[a].reshape(expand) * np.sign(g), lo, hi)
        z_new = np.clip(z + alpha * (z_step - z) + (1.0 - alpha) * (z - self.x_prev[a]), lo, hi)
        self.x_prev[a], self.f_prev[a] = z, f
        return z_new.astype(np.float32)
