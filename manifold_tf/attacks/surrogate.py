"""BPDA's surrogate on a shell's decision rule: the two rows it ascends and the shell's margin.

A shell's answer in the common form :class:`~manifold_tf.shells.Scores` (``S`` candidate slots
per point, :meth:`~manifold_tf.shells.FactorShell.scores`) becomes, per point, the slot BPDA raises
(``up``), the slot it lowers (``down``) and the shell's margin between them; see
:mod:`manifold_tf.attacks.bpda` for the surrogate and the rules of each shell.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from manifold_tf.shells import Scores


class Rows(NamedTuple):
    """Per point ``[M]``: the slots ascended and descended and their labels, ``scaled`` (the NCN
    distance race) and ``margin`` (float64, ``> 0`` iff ``up`` outranks ``down``, up to ties)."""

    up: np.ndarray
    up_label: np.ndarray
    down: np.ndarray
    down_label: np.ndarray
    scaled: np.ndarray
    margin: np.ndarray


def surrogate_rows(sc: Scores, y: np.ndarray, target: np.ndarray | None = None) -> Rows:
    """The two rows of the surrogate (see the module docstring) and the shell's margin between them.

    The margin is in log-odds (MCN, CW, and NCN while neither row meets ``p``), in pixels
    (``d_down - d_up``, NCN, both meet ``p``), or the log-odds gap to ``logit p`` of the row not
    meeting it (NCN, one meets ``p``); its sign is exact: ``> 0`` iff ``up`` outranks ``down``.
    ``+inf`` when no slot stands for ``down``'s side (the shell's answer is then ``up``'s side),
    ``-inf`` when none stands for ``up``'s (CW ``paper_code`` only).
    """
    m, s = sc.key.shape
    rows = np.arange(m)
    want = sc.label != y[:, None] if target is None else sc.label == target[:, None]
    has_up, has_down = want.any(1), (~want).any(1)
    up = np.where(want, sc.key, -np.inf).argmax(1)
    down = np.where(~want, sc.key, -np.inf).argmax(1)
    up_label = sc.label[rows, up]
    if target is None:  # CW fallback: the candidate where y is least confident, for its own label
        others = np.arange(s)[None, :] != y[:, None]
        fallback = np.where(others, sc.key, np.inf).argmin(1)
    else:
        fallback = target
    up = np.where(has_up, up, fallback)
    up_label = np.where(has_up, up_label, fallback).astype(np.int32)
    down = np.where(has_down, down, up)
    down_label = sc.label[rows, down]
    if sc.met is None:
        margin = sc.key[rows, up] - sc.key[rows, down]
        scaled = np.zeros(m, bool)
    else:
        mu, md = sc.met[rows, up], sc.met[rows, down]
        lu, ld = sc.lo[rows, up], sc.lo[rows, down]
        margin = np.select(
            [mu & md, ~mu & ~md, mu & ~md],
            [sc.dist[rows, down] - sc.dist[rows, up], lu - ld, sc.logit_p - ld],
            default=lu - sc.logit_p,
        )
        scaled = md
    margin = np.where(has_down, np.where(has_up, margin, -np.inf), np.inf)
    return Rows(
        up.astype(np.int32),
        up_label,
        down.astype(np.int32),
        down_label.astype(np.int32),
        scaled,
        margin,
    )


# ---- input checks and EOT copies ----------------------------------------------------------------


def rank_labels(sc: Scores, num_classes: int) -> np.ndarray:
    """Every label ``[M, C]`` of each point, best first by the shell's ranking in ``sc``.

    A label ranks by the best key of the slots standing for it; labels no slot stands for come
    last, those ordered by the key of the slot searched for them (CW ``paper_code``: least
    confident in its top label first), then by label.
    """
    m, c = sc.key.shape[0], int(num_classes)
    rows = np.arange(m)
    best = np.full((m, c), -np.inf)
    for s in range(sc.key.shape[1]):
        best[rows, sc.label[:, s]] = np.maximum(best[rows, sc.label[:, s]], sc.key[:, s])
    has = np.isfinite(best)
    by_slot = sc.key[:, :c] if sc.key.shape[1] == c else np.zeros((m, c))
    return np.lexsort((by_slot, -np.where(has, best, 0.0), ~has), axis=1).astype(np.int32)


def proxy_slots(
    sc: Scores, y: np.ndarray, wrong: int, num_classes: int, target: np.ndarray | None = None
) -> np.ndarray:
    """The labels a proxy searching some labels only (:meth:`FactorShell.proxy`) searches per
    point, ``[M, wrong + 1]`` int32: ``y``, then the ``target`` (a targeted run), then the best
    other wrong labels by the full shell's ranking ``sc`` (at the attack's start)."""
    order = rank_labels(sc, num_classes)
    m = len(y)
    wrongs = order[order != y[:, None]].reshape(m, -1)
    if target is not None:
        rest = wrongs[wrongs != target[:, None]].reshape(m, -1)
        wrongs = np.concatenate([target[:, None], rest], axis=1)
    return np.concatenate([y[:, None], wrongs[:, :wrong]], axis=1).astype(np.int32)
