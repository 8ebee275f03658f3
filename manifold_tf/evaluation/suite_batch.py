"""One batch of the verdict: the base's suite (:func:`base_batch`), then the shell's
(:func:`shell_batch`) on the same points, and the record both make (:func:`adaptive_batch`).

The two halves are separate so that a comparison of several shells
(:mod:`~manifold_tf.evaluation.compare`) runs the base's suite once per batch, keeps its half as a
record of its own, and gives each shell's suite the same half: each shell's record is then the one
a single-shell run writes. A base half is JSON-ready (it is saved and read back on resume).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from absl import logging

from manifold_tf import attacks, seeds
from manifold_tf.attacks import run_standing
from manifold_tf.attacks.known import KnownOutputs
from manifold_tf.evaluation import adaptive_suites, random_draws
from manifold_tf.evaluation.adaptive_config import AdaptiveConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.inputs import predict_logits
from manifold_tf.evaluation.ledger import attempted_masks, batch_ledger
from manifold_tf.shells import answer


def shell_labels(
    shell, x: np.ndarray, batch_size: int = 30, record: KnownOutputs | None = None
) -> np.ndarray:
    """The shell's labels on ``x`` (:func:`~manifold_tf.shells.answer`), batch by batch: a fresh
    evaluation, what every success is checked on (never read from ``record``; the outputs are
    added to it, so that an attack starting from ``x`` need not predict it again)."""
    if not len(x):
        return np.zeros(0, np.int64)
    labels = []
    for i in range(0, len(x), batch_size):
        rows = np.asarray(x[i : i + batch_size], np.float32)
        out = shell.embed_function(rows)
        if record is not None:
            record.add(rows, out)
        labels.append(answer(out))
    return np.concatenate(labels)


def verified_labels(
    shell, x_adv: np.ndarray, y: np.ndarray, known: KnownOutputs
) -> tuple[np.ndarray, np.ndarray]:
    """The shell's labels at an attack's ``x_adv`` ``[M]`` for the verdict, and ``[M]`` bool: the
    rows predicted afresh (and recorded in ``known``).

    A success counts only from a fresh prediction: every row ``known`` does not hold, or holds
    with a wrong label, is predicted again. A row the attack itself evaluated on the shell and
    found right (``known``, a deterministic shell, the same bytes) is a failure already known and
    is not paid for twice.
    """
    got = known.labels(x_adv)
    fresh = got != y  # unknown (-1) or known wrong
    if fresh.any():
        got[fresh] = shell_labels(shell, x_adv[fresh], record=known)
    return got, fresh


class TransferPoint(NamedTuple):
    """CW's result on one point: ``x_adv`` ``[H, W, C]`` (``x`` where it failed), ``success`` and
    ``iterations`` (forward+backward passes; -1 when taken from an older Table-2 record)."""

    x_adv: np.ndarray
    success: bool
    iterations: int


def cw_transfer(base, x, y, epsilon, cw_kwargs, known: dict, indices) -> attacks.AttackResult:
    """The paper's CW x' on the base: from Table 2's run where it has the point, else computed."""
    x_adv, success = x.copy(), np.zeros(len(x), bool)
    iterations = np.full(len(x), -1, np.int64)
    todo = [k for k, i in enumerate(indices) if int(i) not in known]
    for k, i in enumerate(indices):
        if int(i) in known:
            x_adv[k], success[k], iterations[k] = known[int(i)]
    if todo:
        cw = attacks.cw_linf(base, x[todo], y[todo], epsilon=epsilon, settings=cw_kwargs)
        x_adv[todo], success[todo] = cw.x_adv, cw.success
        iterations[todo] = cw.details["iterations"]
    return attacks.AttackResult(x_adv, success, details=dict(iterations=iterations))


def base_batch(
    base,
    x,
    y,
    indices,
    *,
    config: AdaptiveConfig,
    context: RunContext,
    known_transfer: dict,
    stop=None,
) -> tuple[dict, np.ndarray] | None:
    """The base's half of a batch of images ``x`` ``[N, H, W, C]`` (pixels, points ``indices`` of
    the test set): ``(part, x_cw [N, H, W, C])``, CW's x' on the base (``context.cw_settings``,
    or ``known_transfer``'s) and the base's suite from it, or None when ``stop()`` ended the suite
    before its last step.

    ``part`` (JSON-ready): ``base_clean``, ``base_broken_by``, ``base_attacks``, ``base_passes``
    (the suite's forward+backward passes), ``base_ledger`` (attack -> ``[N]`` passes),
    ``base_seconds`` (per attack), ``cw_success``, ``cw_iterations``.
    """
    epsilon, cw_kwargs, seed = context.epsilon, context.cw_settings, context.seed
    f_x = predict_logits(base, x).argmax(-1)
    cw = cw_transfer(base, x, y, epsilon, cw_kwargs, known_transfer, indices)

    def base_wrong(x_adv, idx):
        return predict_logits(base, x_adv).argmax(-1) != y[idx]

    # Each point's attacks are seeded by (run seed, its index): its outcome ignores its batch.
    seeded = seeds.point_seeds(seed, indices)
    steps = adaptive_suites.base_suite(base, config, cw.x_adv, epsilon=epsilon, seed=seeded)
    run = run_standing(
        [adaptive_suites.in_ball(s, x, epsilon) for s in steps],
        x,
        y,
        broken=f_x != y,
        verify=base_wrong,
        stop=stop,
    )
    if not run.complete:
        return None
    part = dict(
        base_clean=f_x.tolist(),
        base_broken_by=run.broken_by.tolist(),
        base_attacks=[s.name for s in steps],
        base_passes=int(run.result.cost["base_passes"]),
        base_ledger={k: c["base_passes"].tolist() for k, c in run.step_cost.items()},
        base_seconds=run.seconds,
        cw_success=cw.success.tolist(),
        cw_iterations=cw.details["iterations"].tolist(),
    )
    return part, cw.x_adv


class _ShellChecks:
    """The shell's fresh predictions during one batch's suite on images ``x`` ``[N, H, W, C]``:
    G at ``x`` (``clean``), then, called as ``run_standing``'s ``verify``, at every ``x'``."""

    def __init__(self, shell, x: np.ndarray, y: np.ndarray):
        self.shell, self.y = shell, y
        # The shell's outputs at x and at every x' it verifies: BPDA, targeted BPDA and lift start
        # from those images (x, CW's x') and read their first prediction from here.
        self.known = KnownOutputs(shell)
        self.clean = shell_labels(shell, x, record=self.known)
        self.counts = [len(y)]  # shell predictions outside the attacks: G at x
        self.adv = self.clean.copy()  # the shell's answer at each point's breaking x' (else G(x))
        self.verified = []  # per attack that ran, in order: [M] bool, its x' predicted afresh

    def __call__(self, x_adv: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``[M]`` bool: the shell is wrong at ``x_adv`` (points ``idx`` of the batch)."""
        y = self.y
        got, fresh = verified_labels(self.shell, x_adv, y[idx], self.known)
        self.counts.append(int(fresh.sum()))
        self.verified.append(fresh)
        self.adv[idx[got != y[idx]]] = got[got != y[idx]]  # a broken point is attacked no more
        return got != y[idx]


def shell_batch(
    shell,
    base,
    x,
    y,
    indices,
    half: tuple[dict, np.ndarray],
    *,
    config: AdaptiveConfig,
    context: RunContext,
    desc: str = "",
    stop=None,
) -> tuple[dict, np.ndarray] | None:
    """The shell's half of a batch of images ``x`` ``[N, H, W, C]`` (pixels) on top of the base's
    ``half = (part, x_cw)`` (:func:`base_batch`): ``(record, x_worst [N, H, W, C])`` (the breaking
    x' per point, else x), or None when ``stop()`` ended the suite early.
    ``record["seconds"]["total"]`` is left to the caller (None), who times the batch."""
    part, x_cw = half
    epsilon, seed = context.epsilon, context.seed
    checks = _ShellChecks(shell, x, y)
    known, g_x = checks.known, checks.clean

    def log_step(name, attempted, broken, seconds):
        if desc:
            logging.info(f"{desc}: {name}: {broken}/{attempted} broken ({seconds:.0f} s)")

    shell_steps = adaptive_suites.shell_suite(
        shell,
        base,
        config,
        x_cw,
        epsilon=epsilon,
        seed=seeds.point_seeds(seed, indices),
        desc=desc or "adaptive",
        known=known,
    )
    shell_run = run_standing(
        [adaptive_suites.in_ball(s, x, epsilon) for s in shell_steps],
        x,
        y,
        broken=g_x != y,
        verify=checks,
        on_step=log_step,
        stop=stop,
    )
    if not shell_run.complete:
        return None
    worst = random_draws.worst(shell, config, x, y, g_x, shell_run, shell_labels)
    return _shell_record(shell, indices, x, y, part, checks, shell_run, worst), worst[0]


def _shell_record(
    shell, indices, x, y, part: dict, checks: _ShellChecks, shell_run, worst: tuple
) -> dict:
    """A batch's record (:func:`shell_batch`): the base's ``part``, the shell's outcomes
    (``checks``, ``shell_run``), its cost and ledger; ``worst``: :func:`random_draws.worst`'s
    ``(x_worst [N, H, W, C], fresh [N], draws)``."""
    x_worst, fresh, draws = worst
    n = len(y)
    shell_cost = shell_run.result.cost
    shell_predictions = sum(checks.counts) + int(fresh.sum()) + shell_cost["shell_predictions"]
    cost = dict(
        base_passes=int(
            part["base_passes"]
            + shell_cost["base_passes"]
            + shell_predictions * shell.passes_per_prediction()
        ),
        shell_predictions=int(shell_predictions),
    )
    # The ledger reads the base suite's passes per attack from its step costs: the saved ones.
    base_run = SimpleNamespace(
        step_cost={k: dict(base_passes=np.asarray(v)) for k, v in part["base_ledger"].items()}
    )
    return dict(
        indices=[int(i) for i in indices],
        labels=y.tolist(),
        base_clean=part["base_clean"],
        shell_clean=checks.clean.tolist(),
        base_broken_by=part["base_broken_by"],
        base_attacks=part["base_attacks"],
        shell_broken_by=shell_run.broken_by.tolist(),
        shell_adv=checks.adv.tolist(),
        attempted=shell_run.attempted,
        linf=np.abs(x_worst - x).reshape(n, -1).max(-1).tolist(),
        cost=cost,
        ledger=batch_ledger(
            base_run,
            shell_run,
            per_prediction=shell.passes_per_prediction(),
            shell_checks=np.full(n, checks.counts[0] // max(n, 1)) + fresh,
            verified=_verified_per_attack(shell_run, checks.verified),
            cw_iterations=np.asarray(part["cw_iterations"]),
        ),
        seconds=dict(total=None, **shell_run.seconds, base=part["base_seconds"]),
        cw_success=part["cw_success"],
        cw_iterations=part["cw_iterations"],
        **draws,
    )


def _verified_per_attack(shell_run, verified: list) -> dict:
    """``{attack: [N] int}``: the fresh predictions that verified each attack's ``x'`` per point
    (``run_standing`` verifies, in order, each attack that had points to attack)."""
    n = len(shell_run.broken_by)
    ran = [k for k in shell_run.step_cost if shell_run.attempted.get(k, 0) > 0]
    tried = attempted_masks(shell_run.broken_by, list(shell_run.step_cost))
    out = {k: np.zeros(n, np.int64) for k in shell_run.step_cost}
    for name, fresh in zip(ran, verified, strict=True):
        out[name][np.flatnonzero(tried[name])] = fresh
    return out


def adaptive_batch(
    base,
    shell,
    x,
    y,
    indices,
    *,
    config: AdaptiveConfig,
    context: RunContext,
    known_transfer: dict,
    desc: str = "",
    stop=None,
) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """One batch of both suites on images ``x`` ``[N, H, W, C]`` (pixels): ``(record, x_worst
    [N, H, W, C], x_cw [N, H, W, C])`` (the breaking x' per point, else x; CW's x' on the base),
    or None when ``stop()`` (asked between attack steps) ended it before every step ran.
    ``record["seconds"]["total"]``: the batch's seconds on ``context.clock``."""
    clock = context.clock
    t0 = clock()
    half = base_batch(
        base,
        x,
        y,
        indices,
        config=config,
        context=context,
        known_transfer=known_transfer,
        stop=stop,
    )
    if half is None:
        return None
    out = shell_batch(
        shell, base, x, y, indices, half, config=config, context=context, desc=desc, stop=stop
    )
    if out is None:
        return None
    record, x_worst = out
    record["seconds"]["total"] = clock() - t0
    return record, x_worst, half[1]
