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


def continue_batches(points, saved: dict, batch_points: int) -> list[np.ndarray]:
    """``points`` (indices, in order) in batches: batch ``b`` is ``saved[b]`` (the indices of a
    finished batch, kept as it was) or the next ``batch_points`` points.

    A resumed run with more points (a larger ``--num_points`` or budget) thus keeps its finished
    batches, a last partial one included, and goes on after them. Raises ``ValueError`` when a
    finished batch is not the next points of ``points`` (another order, or fewer points planned
    than the run already holds).
    """
    points = np.asarray(points)
    out, start, b = [], 0, 0
    while start < len(points) or b in saved:
        idx = np.asarray(saved[b]) if b in saved else points[start : start + batch_points]
        if not np.array_equal(points[start : start + len(idx)], idx):
            raise ValueError(
                f"finished batch {b} holds points that are not the next ones of this run "
                f"({len(points)} points planned, {start} before it): resume with the settings "
                f"it ran with (at least as many points), another --output_dir, or --overwrite."
            )
        out.append(idx)
        start, b = start + len(idx), b + 1
    extra = sorted(k for k in saved if k >= len(out))
    if extra:
        raise ValueError(
            f"finished batches {extra} lie beyond the {len(points)} points planned: resume "
            f"with at least as many points as the run holds, or --overwrite."
        )
    return out
