"""The strengthened attacks on a shell: chains of BPDA runs, and the ``lift`` attack on MCN_delta.

Each function runs several attacks AutoAttack-style with
:func:`~manifold_tf.attacks.runner.run_standing`: every run sees only the points still standing,
and per point the first verified success is kept (a point never broken keeps the result with the
highest shell margin). All return the
:class:`~manifold_tf.attacks.result.AttackResult` of :func:`~manifold_tf.attacks.bpda.bpda` with
costs summed over runs, ``details["run"]`` the index of the run that produced ``x_adv`` and
``details["target"]`` its target (-1: untargeted).

- :func:`bpda_restarts`: BPDA from ``x``, from a given ``x_init`` (a transfer attack's ``x'``) and
  from seeded random points of the ball.
- :func:`bpda_targeted`: targeted BPDA (with those restarts) for the top-k wrong labels by the
  shell's own ranking at ``x``.
- :func:`lift`: "think as the attacker of MCN" (see its docstring).

Units: pixels (0..255).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from manifold_tf import compiled, projected, seeds
from manifold_tf.attacks.bpda import (
    bpda,
    check_progress,
    check_x_init,
    prepare,
    surrogate_rows,
)
from manifold_tf.attacks.bpda_settings import (
    DEFAULT_CHAIN,
    DEFAULT_LIFT,
    BPDASettings,
    LiftSettings,
    check_num_targets,
)
from manifold_tf.attacks.known import KnownOutputs, embed
from manifold_tf.attacks.result import AttackResult
from manifold_tf.attacks.runner import Step, run_standing
from manifold_tf.attacks.surrogate import rank_labels
from manifold_tf.projected import madry_step_size
from manifold_tf.shells import log_odds
from manifold_tf.validation import PIXEL_MAX, validate_radius

__all__ = ["LiftSettings", "bpda_restarts", "bpda_targeted", "lift", "target_order"]


def _sub_progress(progress, offset: int, total: int):
    if progress is None:
        return None
    return lambda done, _, standing: progress(offset + done, total, standing)


def target_order(
    shell, x, y, out: dict | None = None, known: KnownOutputs | None = None
) -> np.ndarray:
    """The wrong labels ``[N, C - 1]`` of each point, best first by the shell's ranking at ``x``.

    MCN: by ``lo_t(z_t)``; NCN: labels meeting ``p`` first, nearest first, then by log-odds; CW
    ``paper_code``: by the best candidate whose top label is ``t``, then (labels no candidate has as
    its top label) the candidate searched for ``t``, least confident in its top label first.
    ``out`` is ``shell.embed(x)`` if already computed (or ``known`` holds it).
    """
    x, y, _, _ = prepare(shell, x, y, 0.0)
    sc = shell.scores(embed(shell, x, known)[0] if out is None else out)
    m, c = len(y), int(shell.num_classes)
    order = rank_labels(sc, c)
    return order[order != y[:, None]].reshape(m, c - 1).astype(np.int32)


def _starts(shell, x, epsilon, x_init, settings: BPDASettings, seed) -> list[np.ndarray]:
    """The chain's starts ``[N, ...]`` in order: ``x``, ``x_init``, then seeded random points."""
    if settings.random_start:
        raise ValueError(
            "random_start is one run's start; a chain takes random_restarts (seeded points of "
            "the ball) instead."
        )
    starts = [x] if settings.from_x else []
    if x_init is not None:
        starts.append(check_x_init(shell, x, x_init))
    for r in range(settings.random_restarts):
        keys = seeds.row_keys(seed, len(x), "bpda restart", r + 1)
        starts.append(projected.random_start_rows(tf.constant(x), epsilon, keys).numpy())
    if not starts:
        raise ValueError("no start: set from_x=True, give x_init, or random_restarts >= 1.")
    return starts


def _chain(
    shell, x, y, epsilon, settings: BPDASettings, runs, seed, known, progress
) -> AttackResult:
    """Runs ``runs`` = [(start [N, ...], target [N] or None)] in order on the points standing."""
    steps = settings.steps
    total = len(runs) * steps

    def step(r: int, start, target) -> Step:
        def attack(xs, ys, idx):
            return bpda(
                shell,
                xs,
                ys,
                epsilon=epsilon,
                settings=settings,
                x_init=start[idx],
                target=None if target is None else target[idx],
                seed=seeds.take(seed, idx),
                known=known,
                progress=_sub_progress(progress, r * steps, total),
            )

        return Step(f"run {r}", attack)

    suite = run_standing([step(r, s, t) for r, (s, t) in enumerate(runs)], x, y)
    if progress is not None:
        progress(total, total, int(suite.standing.sum()))
    return suite.result


def bpda_restarts(
    shell,
    x,
    y,
    *,
    epsilon: float,
    settings: BPDASettings = DEFAULT_CHAIN,
    x_init=None,
    target=None,
    seed: int = 0,
    known: KnownOutputs | None = None,
    progress=None,
) -> AttackResult:
    """BPDA from several starts, in order: ``x`` (if ``settings.from_x``), ``x_init`` (if given),
    then ``settings.random_restarts`` seeded uniform points of ``N(x, epsilon)``; each run attacks
    only the points still standing. ``settings`` (:class:`BPDASettings`; default: 20 APGD steps
    from ``x``) is every run's; other arguments as :func:`~manifold_tf.attacks.bpda.bpda`
    (``target`` makes every run targeted; ``settings.proxy``: every run steers by that copy of the
    shell). Cost per point: the sum over the runs it took part in (at most
    ``runs * (steps + 1)`` shell predictions, plus EOT's, and ``2 * runs * steps * max(1, eot)``
    base passes).
    """
    x, y, epsilon, target = prepare(shell, x, y, epsilon, target)
    starts = _starts(shell, x, epsilon, x_init, settings, seed)
    runs = [(s, target) for s in starts]
    return _chain(shell, x, y, epsilon, settings, runs, seed, known, check_progress(progress))


def bpda_targeted(
    shell,
    x,
    y,
    *,
    epsilon: float,
    settings: BPDASettings = DEFAULT_CHAIN,
    x_init=None,
    seed: int = 0,
    known: KnownOutputs | None = None,
    progress=None,
) -> AttackResult:
    """Targeted BPDA for the ``settings.num_targets`` best wrong labels (int, or ``"all"``;
    default 3) by the shell's ranking at ``x`` (:func:`target_order`), best first; for each
    target the starts of :func:`bpda_restarts`, with the same ``settings``. Every run attacks
    only the points still standing; success is any wrong answer of the shell. Cost per point: one
    shell prediction at ``x`` for the ranking, then at most ``num_targets * starts`` runs, each
    as :func:`~manifold_tf.attacks.bpda.bpda`.
    """
    x, y, epsilon, _ = prepare(shell, x, y, epsilon)
    k = check_num_targets(settings.num_targets, int(shell.num_classes))
    starts = _starts(shell, x, epsilon, x_init, settings, seed)
    if len(x) == 0:
        return bpda(shell, x, y, epsilon=epsilon, settings=BPDASettings(steps=settings.steps))
    at_x, paid = embed(shell, x, known)
    order = target_order(shell, x, y, at_x)
    runs = [(s, order[:, j]) for j in range(k) for s in starts]
    res = _chain(shell, x, y, epsilon, settings, runs, seed, known, check_progress(progress))
    return res.with_cost(shell_predictions=int(paid))  # the ranking at x


# ---- lift ---------------------------------------------------------------------------------------


def _lift_function(base, image_shape, steps: int, schedule: str):
    """Cached compiled ``(x [M, ...], t [M], radius) -> argmax_{z in N(x, radius)} lo_t(z)``."""
    signature = [
        tf.TensorSpec((None,) + tuple(image_shape), tf.float32),
        tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((), tf.float32),
    ]

    def build(net):
        def run(x, t, radius):
            def objective(z):
                return log_odds(tf.cast(net(z, training=False), tf.float32), t)

            if schedule == "apgd":
                z, _ = projected.apgd_ascent(objective, x, x, radius=radius, steps=steps)
            else:
                z, _ = projected.projected_ascent(
                    objective,
                    x,
                    x,
                    radius=radius,
                    steps=steps,
                    step_size=madry_step_size(radius, steps),
                )
            return z

        return run

    return compiled.cached(
        base, ("bpda_lift", tuple(image_shape), steps, schedule), build, input_signature=signature
    )


def lift(
    shell,
    x,
    y,
    *,
    epsilon: float,
    settings: LiftSettings = DEFAULT_LIFT,
    seed: int = 0,
    known: KnownOutputs | None = None,
    progress=None,
) -> AttackResult:
    """ "Think as the attacker of MCN": lift a confident point of the base into the shell's reach.

    MCN_delta answers the label that can be made most confident within ``delta`` of its input. For
    each point and each of the ``num_targets`` best wrong labels ``t`` (:func:`target_order`; an
    int or ``"all"``), in order and only on the points still standing:

    1. ``z* = argmax lo_t(z)`` over ``N(x, epsilon + delta)`` with the base alone (``steps`` APGD
       or signed steps from ``x``), the high-confidence search of a wider ball;
    2. ``x' = clip(z*, x - epsilon, x + epsilon)`` (in the box): then ``|z* - x'|_inf <= delta``
       coordinate-wise, so ``z*`` lies in ``N(x', delta)`` and MCN at ``x'`` can reach a point at
       least as confident in ``t`` as ``z*`` (it finds it if its own optimiser does). If that beats
       every other label's best confidence within ``delta`` of ``x'`` (``y``'s above all), MCN
       answers ``t``. The attack exploits the very property the shell is built on, and it needs
       no gradient through the shell;
    3. verify with the real shell at ``x'``; with ``bpda_steps > 0``, targeted BPDA at ``t`` from
       ``x'`` instead (its first step verifies ``x'``).

    For NCN_p (``delta`` = its ``delta_max`` by default) it is a heuristic: NCN answers the label
    meeting ``p`` nearest to ``x'``, and a confident ``z*`` within ``delta`` says nothing about
    ``y``'s distance. For the CarliniWagnerShell likewise (its search is CW's, not a maximisation).

    Args:
      settings: :class:`LiftSettings` (default: every wrong label, 20 APGD steps, no BPDA):
        ``delta`` the shell's radius in pixels; default ``shell.search_radius`` (MCN: ``delta``,
        NCN: ``delta_max``). ``epsilon + delta`` must be ``<= 255``.
        ``steps``, ``schedule``: the base ascent's (``"apgd"``: 2 (epsilon + delta) halved on
        APGD's schedule; ``"sign"``: ``2.5 (epsilon + delta) / steps`` per step).
        ``bpda_steps``, ``eot_samples``: of the follow-up BPDA (APGD schedule).
      seed: of the follow-up BPDA.
      known: the shell's outputs at images already evaluated
        (:class:`~manifold_tf.attacks.known.KnownOutputs`): the ranking at ``x`` is read from
        it when it holds every point (no shell prediction paid).
      Others as :func:`~manifold_tf.attacks.bpda.bpda`.

    Returns:
      The :class:`AttackResult` of :func:`~manifold_tf.attacks.bpda.bpda`; ``details["run"]`` is
      the target's rank (-1: the shell was already wrong at ``x``), ``details["steps_used"]`` the
      BPDA step of the success (0: ``x'``).

    Cost per point: one shell prediction at ``x``, then per target tried ``steps`` forward+backward
    (and one forward) base passes and one shell prediction, plus the follow-up BPDA's cost.
    """
    x, y, epsilon, _ = prepare(shell, x, y, epsilon)
    steps, bpda_steps = settings.steps, settings.bpda_steps
    progress = check_progress(progress)
    delta = shell.search_radius if settings.delta is None else settings.delta
    radius = validate_radius(epsilon + validate_radius(delta, "delta"), "epsilon + delta")
    k = check_num_targets(settings.num_targets, int(shell.num_classes))
    if len(x) == 0:
        return bpda(shell, x, y, epsilon=epsilon, settings=BPDASettings(steps=bpda_steps))
    out, paid = embed(shell, x, known)
    at_x = shell.scores(out)
    wrong_at_x = at_x.pick != y
    order = target_order(shell, x, y, out)
    fn = _lift_function(shell.base, tuple(shell.image_shape), steps, settings.schedule)
    total = k * (steps + bpda_steps)
    lo, hi = np.maximum(x - epsilon, 0.0), np.minimum(x + epsilon, PIXEL_MAX)
    # The follow-up targeted BPDA from x' (APGD), or zero steps: the shell's check of x' alone.
    follow = BPDASettings(steps=bpda_steps, schedule="apgd", eot_samples=settings.eot_samples)
    check_only = BPDASettings(steps=0)

    def step(j: int) -> Step:
        def attack(xs, ys, idx):
            t = order[idx, j]
            z = fn(tf.constant(xs), tf.constant(t), tf.constant(radius, tf.float32)).numpy()
            start = np.clip(z, lo[idx], hi[idx]).astype(np.float32)
            if progress is not None:
                progress(j * (steps + bpda_steps) + steps, total, int(idx.size))
            if bpda_steps:
                got = bpda(
                    shell,
                    xs,
                    ys,
                    epsilon=epsilon,
                    settings=follow,
                    x_init=start,
                    target=t,
                    seed=seeds.take(seed, idx),
                    known=known,
                    progress=_sub_progress(progress, j * (steps + bpda_steps) + steps, total),
                )
            else:  # zero BPDA steps: the verification of x' alone, with the target recorded
                got = bpda(
                    shell,
                    xs,
                    ys,
                    epsilon=epsilon,
                    settings=check_only,
                    x_init=start,
                    target=t,
                    known=known,
                )
            return got.with_cost(base_passes=steps)

        return Step(f"target {j + 1}", attack)

    suite = run_standing([step(j) for j in range(k)], x, y, broken=wrong_at_x)
    if progress is not None:
        progress(total, total, int(suite.standing.sum()))
    # Points the shell already gets wrong at x keep x, with the shell's answer and margin there.
    n = len(x)
    details = dict(suite.result.details)  # empty of the steps' keys when no step ran
    details["shell_label"] = np.where(
        wrong_at_x, at_x.pick, details.get("shell_label", np.full(n, -1, np.int32))
    )
    details["target"] = np.where(wrong_at_x, -1, details.get("target", np.full(n, -1, np.int32)))
    details["steps_used"] = np.where(
        wrong_at_x, 0, details.get("steps_used", np.zeros(n, np.int32))
    )
    score = np.where(wrong_at_x, surrogate_rows(at_x, y).margin, suite.result.score)
    return suite.result.replace(score=score, details=details).with_cost(shell_predictions=int(paid))
