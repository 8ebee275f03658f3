"""How BPDA steers by a proxy (a cheaper copy of the shell, :meth:`FactorShell.proxy`) and stays
honest: every success the proxy claims is checked on the shell, and so is each point's best iterate
by the proxy's margin. Used by :func:`manifold_tf.attacks.bpda.bpda`; numpy state ``res`` as there.
"""

from __future__ import annotations

import numpy as np

from manifold_tf.attacks.known import KnownOutputs, embed
from manifold_tf.attacks.surrogate import surrogate_rows
from manifold_tf.shells import FactorShell, Scores


def check_proxy(shell, proxy):
    """The shell an attack steers by: ``proxy`` (from ``shell.proxy(...)``), or ``shell``."""
    if proxy is None:
        return shell
    if not isinstance(proxy, FactorShell):
        raise ValueError(
            f"proxy must be a copy of the shell (shell.proxy(...)); got {type(proxy).__name__}."
        )
    if tuple(proxy.image_shape) != tuple(shell.image_shape) or (
        proxy.num_classes != shell.num_classes
    ):
        raise ValueError(
            f"proxy must be a copy of the shell (shell.proxy(...)): it takes images "
            f"{tuple(proxy.image_shape)} to {proxy.num_classes} classes, the shell "
            f"{tuple(shell.image_shape)} to {shell.num_classes}."
        )
    return proxy


def confirmed(
    shell,
    x: np.ndarray,
    y: np.ndarray,
    approx: Scores,
    res: dict,
    active,
    known: KnownOutputs | None = None,
):
    """``(pick, margin, claimed)`` ``[M]``: the approximation's label and margin, except where it
    claims a success (``claimed``): there the shell's own (a prediction, recorded in ``known``).
    A success is never a property of the approximation; a point the shell still gets right goes
    on."""
    pick, margin = approx.pick.copy(), surrogate_rows(approx, y).margin.copy()
    claimed = pick != y
    if claimed.any():
        idx = np.flatnonzero(claimed)
        out, paid = embed(shell, x[idx], known)
        real = shell.scores(out)
        res["shell_evals"][active[idx]] += int(paid)
        pick[idx], margin[idx] = real.pick, surrogate_rows(real, y[idx]).margin
    return pick, margin, claimed


def check_best(
    shell, y: np.ndarray, res: dict, best: dict, known: KnownOutputs | None = None
) -> None:
    """Checks on the shell each point's best iterate by the proxy's margin, where the attack
    failed and that iterate is not its last (the last is always the shell's already); the
    shell's outputs there are recorded in ``known``."""
    idx = np.flatnonzero(~res["success"] & np.isfinite(best["margin"]))
    if not idx.size:
        return
    idx = idx[(best["x"][idx] != res["x_adv"][idx]).reshape(len(idx), -1).any(1)]
    if not idx.size:
        return
    out, paid = embed(shell, best["x"][idx], known)
    sc = shell.scores(out)
    res["shell_evals"][idx] += int(paid)
    won = idx[sc.pick != y[idx]]
    res["x_adv"][won], res["success"][won] = best["x"][won], True
    res["shell_label"][won] = sc.pick[sc.pick != y[idx]]
    res["margin"][won] = surrogate_rows(sc, y[idx]).margin[sc.pick != y[idx]]
    res["steps_used"][won] = best["k"][won]
