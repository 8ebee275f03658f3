"""What every protocol of a defence run needs to know about the run, in one object.

:class:`RunContext` is built once per run (:mod:`~manifold_tf.evaluation.runner`) and passed whole
to the verdict (:func:`~manifold_tf.evaluation.adaptive.run_adaptive`, a comparison's
:func:`~manifold_tf.evaluation.compare.run_comparison`), its batches
(:mod:`~manifold_tf.evaluation.suite_batch`) and Table 2
(:func:`~manifold_tf.evaluation.defence.run_table2`), so that they walk the same points with the
same attack, seeds and metadata.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

from manifold_tf.cw_search import CWSettings
from manifold_tf.evaluation.config import DefenceConfig
from manifold_tf.evaluation.store import RunStore
from manifold_tf.evaluation.walk import PERMUTATIONS
from manifold_tf.validation import check_int, validate_radius


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunContext:
    """One run's shared settings.

    ``store``: where every protocol's records go (``store.workers`` split the batches).
    ``epsilon``: the threat model's L-inf budget, pixels (0..255). ``cw_settings``: the base
    attack (:class:`~manifold_tf.attacks.CWSettings` of :func:`~manifold_tf.attacks.cw_linf`),
    CW on the base, of the verdict's transfer step and of Table 2. ``seed``: the walk order's and
    every point's attack seeds. ``permutation``: the walk order
    (:func:`~manifold_tf.evaluation.walk.walk_order`). ``batch_points``: points per batch.
    ``metadata``: recorded in every protocol's settings (checkpoint, dataset ...): a resumed run
    must match it. ``clock``: seconds, times the batches and the verdict's budget (tests give a
    fake one).
    """

    store: RunStore
    epsilon: float
    cw_settings: CWSettings
    seed: int = 0
    permutation: str = "numpy"
    batch_points: int = 30
    metadata: dict | None = None
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self):
        # Checked, not converted: the protocols see the values as given.
        validate_radius(self.epsilon, "epsilon")
        check_int(self.batch_points, "batch_points", 1)
        if self.permutation not in PERMUTATIONS:
            raise ValueError(
                f"permutation must be one of {PERMUTATIONS}; got {self.permutation!r}."
            )

    @classmethod
    def for_defence(
        cls,
        config: DefenceConfig,
        store: RunStore,
        *,
        epsilon: float,
        seed: int = 0,
        metadata: dict | None = None,
    ) -> RunContext:
        """The context of a defence run: its order, batch size and base attack from ``config``."""
        return cls(
            store=store,
            epsilon=epsilon,
            cw_settings=config.attack.cw_settings,
            seed=seed,
            permutation=config.permutation,
            batch_points=config.batch_points,
            metadata=metadata,
        )

    def check_defence(self, config: DefenceConfig) -> None:
        """Raises ``ValueError`` unless Table 2's ``config`` walks and attacks as this run does."""
        mine = (self.permutation, self.batch_points, self.cw_settings)
        theirs = (config.permutation, config.batch_points, config.attack.cw_settings)
        if mine != theirs:
            raise ValueError(
                f"Table 2's settings (permutation, batch_points, base attack) {theirs} differ "
                f"from the run's {mine}: build the context with RunContext.for_defence(config)."
            )

    def on(self, store: RunStore) -> RunContext:
        """This context writing to ``store`` (a comparison's folder of one defence)."""
        return dataclasses.replace(self, store=store)


def defence_metadata(inputs, strategy: str, p_auto: dict | None) -> dict:
    """A defence run's :attr:`RunContext.metadata`: its checkpoint and data (absolute paths,
    ``inputs``: :func:`~manifold_tf.evaluation.inputs.resolve`'s), the ``strategy`` it ran under,
    and how ``--p=auto`` chose p (``p_auto``; None: p was given)."""
    metadata = dict(
        checkpoint=os.path.abspath(inputs.checkpoint),
        dataset=inputs.dataset,
        data_dir=inputs.data_dir and os.path.abspath(inputs.data_dir),
        strategy=strategy,
    )
    if p_auto is not None:
        metadata["p_auto"] = p_auto
    return metadata
