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
from manifold_tf.attacks.bpda_apgd import ApgdSchedule
from manifold_tf.attacks.bpda_settings import DEFAULT_BPDA, BPDASettings
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
    check_int,
    validate_images,
    validate_labels,
    validate_radius,
)

__all__ = ["SCHEDULES", "BPDASettings", "bpda", "check_progress"]

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
    settings: BPDASettings = DEFAULT_BPDA,
    x_init=None,
    target=None,
    seed: int = 0,
    known: KnownOutputs | None = None,
    progress=None,
) -> AttackResult:
    """One L-inf BPDA run on a factor shell (identity approximation of its search; see the module).

    Per step, on the points not yet fooled: evaluate the shell at ``x'``; a point it gets wrong is
    done and keeps that ``x'``; the others step along the surrogate's gradient, projected.

    Args:
      shell: a factor shell (:class:`~manifold_tf.shells.FactorShell`: ``embed_function``,
        ``base``).
      x: clean images ``[N, H, W, 3]``, float, pixels 0..255. y: true labels ``[N]`` (int).
      epsilon: L-inf budget in pixels (8 means 8/255).
      settings: the attack's knobs, :class:`BPDASettings` (default: 20 signed steps of
        ``2.5 * epsilon / steps``, no EOT, the shell at every step; its docstring tells what the
        schedules, EOT, ``warm_steps`` and a ``proxy`` do).
      x_init: optional start ``[N, H, W, 3]`` (e.g. a transfer ``x'``), projected into the ball.
      target: optional wrong labels ``[N]``: a targeted run (the surrogate raises the target
        against the best other label); success is still any wrong answer of the shell.
      seed: seeds the random start and the choice of EOT seeds: an int, or an int array ``[N]``
        of per-point seeds (a point's start then ignores its batch: :func:`manifold_tf.seeds`).
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
    steps = settings.steps
    step_size = validate_radius(
        madry_step_size(epsilon, steps) if settings.step_size is None else settings.step_size,
        "step_size",
    )
    progress = check_progress(progress)
    sur = check_proxy(shell, settings.proxy)
    if sur is not shell and settings.warm_steps:
        raise ValueError("give a proxy or warm_steps, not both (two approximations of the shell).")
    seeds.per_point(seed, len(x))  # a clear error for a seed array of the wrong shape
    copies = eot_shells(sur, settings.eot_samples, seed)
    start = _start(shell, x, epsilon, x_init, settings.random_start, seed)
    res = empty_result(start, steps, target)
    if len(x) == 0:
        return as_result(res)
    run = _Run(shell, sur, x, y, target, epsilon, settings, copies, known, res)
    for k in range(steps + 1):
        current = run.x_adv[run.active]
        out, approx = run.evaluate(k, current)
        keep = run.retire(k)
        if progress is not None:
            progress(k if run.active.size else steps, steps, int(run.active.size))
        if k == steps or run.active.size == 0:
            break
        if run.warm is not None:
            run.z_prev = out["z"].numpy()[keep]
        current = current[keep]
        run.ascend(k, current, run.samples(current, keep, out, approx), step_size)
    if sur is not shell:
        check_best(shell, y, res, run.best, known)
    return as_result(res)


def _start(shell, x: np.ndarray, epsilon: float, x_init, random_start: bool, seed) -> np.ndarray:
    """The first iterate ``[N, ...]``: ``x_init`` projected into the ball, a seeded uniform point
    of ``N(x, epsilon)``, or ``x``."""
    if x_init is not None:
        if random_start:
            raise ValueError("give either x_init or random_start=True, not both.")
        return np.clip(check_x_init(shell, x, x_init), x - epsilon, x + epsilon)
    if random_start:
        keys = seeds.row_keys(seed, len(x), "bpda", 0)
        return projected.random_start_rows(tf.constant(x), epsilon, keys).numpy()
    return x


class _Run:
    """The working state of one BPDA run between its steps (numpy, per point): the points still
    standing (``active``), the shell's or the approximation's outputs, the step schedule."""

    def __init__(
        self, shell, sur, x, y, target, epsilon, settings: BPDASettings, copies, known, res
    ):
        self.shell, self.sur, self.y, self.target = shell, sur, y, target
        self.copies, self.known, self.res = copies, known, res
        self.steps, self.warm_steps = settings.steps, settings.warm_steps
        start = res["x_adv"]  # the first iterate: nothing has stepped yet (copied below)
        self.lo_box = np.maximum(x - epsilon, PIXEL_MIN)
        self.hi_box = np.minimum(x + epsilon, PIXEL_MAX)
        self.grad_fn = _grad_function(shell.base, tuple(shell.image_shape), int(shell.num_classes))
        self.x_adv = res["x_adv"]
        self.apgd = (
            ApgdSchedule(start, epsilon, self.steps) if settings.schedule == "apgd" else None
        )
        self.active = np.arange(len(x))
        self.warm = None if copies or not self.warm_steps else shell.warm_search(self.warm_steps)
        self.z_prev = (
            None  # the search's points at the previous iterate (warm start), [active, C, ...]
        )
        self.slots = (
            None  # [N, S]: the labels a proxy searching some labels only searches per point
        )
        self.best = None
        self.pick = self.margin = None
        if sur is not shell:  # its best iterate by its own margin, checked on the shell at the end
            n = len(x)
            self.best = dict(x=start.copy(), margin=np.full(n, -np.inf), k=np.zeros(n, np.int32))

    def search(self, net, xs, idx):
        if self.slots is None:
            return net.embed_function(tf.constant(xs))
        return net.embed_labels(xs, self.slots[idx])

    def evaluate(self, k: int, current: np.ndarray) -> tuple[dict, bool]:
        """The outputs at the iterate ``current`` of the active points (the approximation's between
        the first and the last step, each success it claims checked on the shell; else the
        shell's) and whether they are the approximation's; sets ``pick`` and ``margin``."""
        shell, sur, res, active = self.shell, self.sur, self.res, self.active
        approx = 0 < k < self.steps and (
            sur is not shell or (self.warm is not None and self.z_prev is not None)
        )
        if approx:  # the approximation decides, each success it claims checked on the shell
            if sur is not shell:
                out = self.search(sur, current, active)
                res["base_passes"][active] += sur.passes_per_prediction()
            else:
                out = self.warm(tf.constant(current), tf.constant(self.z_prev))
                res["base_passes"][active] += shell.rows_per_image * self.warm_steps
            sc = sur.scores(out)
            self.pick, self.margin, claimed = confirmed(
                shell, current, self.y[active], sc, res, active, self.known
            )
            if sur is not shell:
                self._track_best(k, current, sc, claimed)
        else:
            out, paid = embed(shell, current, self.known)
            res["shell_evals"][active] += int(paid)
            sc = shell.scores(out)
            self.pick, self.margin = sc.pick, surrogate_rows(sc, self.y[active]).margin
            if k == 0 and sur is not shell and sur.proxy_labels is not None:
                c = int(shell.num_classes)
                self.slots = proxy_slots(sc, self.y, sur.proxy_labels, c, self.target)
        return out, approx

    def _track_best(self, k: int, current: np.ndarray, sc, claimed: np.ndarray) -> None:
        """Keeps each active point's best iterate by the proxy's own margin (not a claimed one)."""
        active, best = self.active, self.best
        own = np.where(claimed, -np.inf, surrogate_rows(sc, self.y[active]).margin)
        better = own > best["margin"][active]
        best["x"][active[better]] = current[better]
        best["margin"][active[better]], best["k"][active[better]] = own[better], k

    def retire(self, k: int) -> np.ndarray:
        """Records the label and margin of step ``k``; the points now wrong are done (frozen at
        this iterate). Returns ``keep`` ``[active before]`` bool, the points still standing."""
        res, active = self.res, self.active
        res["shell_label"][active], res["margin"][active] = self.pick, self.margin
        done = self.pick != self.y[active]
        res["success"][active[done]] = True
        res["steps_used"][active[done]] = k
        self.active = active[~done]
        return ~done

    def samples(self, current: np.ndarray, keep: np.ndarray, out: dict, approx: bool) -> list:
        """``[(net, outputs at current)]`` the gradient averages over: EOT's copies, else the
        outputs of this step's evaluation on the points still standing."""
        active, res, shell, sur = self.active, self.res, self.shell, self.sur
        if not self.copies:
            net = sur if approx else shell
            return [(net, {key: tf.boolean_mask(v, keep) for key, v in out.items()})]
        samples = [(c, self.search(c, current, active)) for c in self.copies]
        if sur is shell:
            res["shell_evals"][active] += len(self.copies)
        else:
            res["base_passes"][active] += len(self.copies) * sur.passes_per_prediction()
        return samples

    def ascend(self, k: int, current: np.ndarray, samples: list, step_size: float) -> None:
        """One projected step of the active points from ``current`` along the surrogate's
        gradient averaged over ``samples`` (signed, or APGD's)."""
        active, res = self.active, self.res
        tk = None if self.target is None else self.target[active]
        rows = [surrogate_rows(c.scores(o), self.y[active], tk) for c, o in samples]

        def cat(f):
            return tf.constant(np.concatenate([getattr(r, f) for r in rows]))

        g = self.grad_fn(
            tf.concat([o["z"] for _, o in samples], 0),
            cat("up"),
            cat("up_label"),
            cat("down"),
            cat("down_label"),
            cat("scaled"),
        ).numpy()
        g = g.reshape((len(samples), len(active)) + g.shape[1:]).mean(0)
        # The shell's declared stand-in for its search (identity by default: g unchanged).
        g = np.asarray(self.shell.bpda_vjp(current, g))
        res["base_passes"][active] += 2 * len(samples)
        lo, hi = self.lo_box[active], self.hi_box[active]
        if self.apgd is None:
            nxt = np.clip(current + step_size * np.sign(g), lo, hi)
        else:
            f = np.mean(np.clip([r.margin for r in rows], -1e9, 1e9), axis=0)  # no inf - inf
            nxt = self.apgd.step(k, active, current, g, f, lo, hi)
        self.x_adv[active] = nxt
