"""How a shell's answer is scored: log-odds, the answer of an ``embed`` dict, :class:`Scores`.

Below :mod:`manifold_tf.shells.base`: the pieces every shell and BPDA's surrogate share.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf


def log_odds(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """``log(F_t / (1 - F_t)) = Z_t - logsumexp_{j != t} Z_j`` per row.

    Logits ``[B, C]``, labels ``[B]`` -> ``[B]`` float32.

    A strictly increasing function of ``F_t``, so it has the same maximiser and ranks candidates as
    ``F_t`` does; unlike ``F_t`` or ``log F_t`` it does not round to a constant in float32 once the
    softmax saturates (``F_t`` = 1.0 for margins above ~17), and its gradient does not vanish there.
    """
    logits = tf.cast(logits, tf.float32)
    own = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    others = tf.where(own, tf.constant(-1e30, tf.float32), logits)  # finite: no inf - inf
    return tf.gather(logits, labels, batch_dims=1) - tf.reduce_logsumexp(others, axis=-1)


def answer(out: dict) -> np.ndarray:
    """The shell's label ``[N]`` from an ``embed`` dict: the argmax of its output ``F(z_t*)``.

    The one definition every protocol uses (Table 2, the adaptive suite, BPDA's success test): it is
    what a user reads from ``predict``. The search's ``label`` (``t*``) agrees whenever the search
    found each label's optimum; with an approximate optimiser the two can differ on rare points.
    """
    return np.argmax(np.asarray(out["probabilities"]), axis=-1).astype(np.int64)


class Scores(NamedTuple):
    """A shell's answer in one form for every shell: ``S`` candidate slots per point (``[M, S]``).

    ``label`` int32: the label a slot stands for; ``key`` float64: its rank (the shell answers the
    label of the highest key, first on ties); ``lo`` float64: the log-odds of ``label`` at the
    slot's point; ``met`` bool and ``dist`` float64 pixels (NCN only, else None); ``logit_p``
    (NCN: ``log(p / (1 - p))``, else None); ``pick`` int32 ``[M]``: the shell's label
    (:func:`answer`, the argmax of its output).
    """

    label: np.ndarray
    key: np.ndarray
    lo: np.ndarray
    met: np.ndarray | None
    dist: np.ndarray | None
    logit_p: float | None
    pick: np.ndarray
