"""The seeded order in which test points are walked, shared by Table 2 and the verdict.

Both protocols take points in this order: Table 2 the base-correct ones, the verdict all of them;
the verdict's sequential rule needs it to be a uniformly random order (sampling without
replacement from the test set).
"""

from __future__ import annotations

import random

import numpy as np

from manifold_tf.evaluation.inputs import predict_logits

PERMUTATIONS = ("numpy", "paper")


def walk_order(num_test: int, *, seed: int, kind: str = "numpy") -> np.ndarray:
    """The order in which test points are walked.

    ``"numpy"``: ``np.random.default_rng(seed).permutation(num_test)``. ``"paper"``: the authors'
    order, Python ``random.seed(seed)`` (they used 123), ``random.sample(range(n), n)``, taken from
    the end.
    """
    if kind == "numpy":
        return np.random.default_rng(seed).permutation(num_test)
    if kind == "paper":
        rng = random.Random(seed)
        return np.asarray(rng.sample(range(num_test), num_test)[::-1])
    raise ValueError(f"permutation must be one of {PERMUTATIONS}; got {kind!r}.")


def select_correct_points(
    model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_points: int,
    seed: int,
    permutation: str = "numpy",
    chunk: int = 256,
) -> np.ndarray:
    """The first ``num_points`` indices, in permutation order, that ``model`` classifies correctly.

    Predictions are computed chunk by chunk along the permutation, only as far as needed.
    Raises ``ValueError`` when the test set holds fewer correct points.
    """
    order = walk_order(len(x), seed=seed, kind=permutation)
    chosen: list[int] = []
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        pred = predict_logits(model, x[idx], batch_size=chunk).argmax(-1)
        chosen.extend(int(i) for i in idx[pred == y[idx]])
        if len(chosen) >= num_points:
            return np.asarray(chosen[:num_points])
    raise ValueError(
        f"the base model classifies only {len(chosen)} of the {len(x)} test points correctly; "
        f"{num_points} are needed (num_batches x batch_points): lower them."
    )
