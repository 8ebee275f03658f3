"""The one result every attack returns: the adversarial points, per-point success and cost.

Every attack in :mod:`manifold_tf.attacks` (on a base model or on a shell) returns an
:class:`AttackResult`; :func:`manifold_tf.attacks.runner.run_standing` chains attacks on it. Cost
has one vocabulary everywhere:

- ``base_passes``: forward+backward passes of the base model the attack ran itself (outside shell
  predictions), per point;
- ``shell_predictions``: predictions of a shell the attack asked for (each one a whole search
  around the point), per point; 0 for attacks on a base model.

Units: pixels (0..255) for images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["AttackResult"]


def _rows(value, n: int, dtype, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype)
    if arr.ndim == 0:
        arr = np.full(n, arr, dtype)
    if arr.shape[:1] != (n,):
        raise ValueError(
            f"AttackResult.{name} must have {n} rows (one per point); got shape {arr.shape}."
        )
    return arr


@dataclass(frozen=True, eq=False)
class AttackResult:
    """What one attack found on ``N`` points.

    Attributes:
      x_adv: ``[N, H, W, C]`` float32 pixels, inside the attack's L-inf ball and the box [0, 255].
      success: ``[N]`` bool, success as the attack saw it: its model's label at ``x_adv`` is
        wrong (APGD-T, FAB-T and targeted BPDA too, as in AutoAttack), except for the targeted
        modes of :func:`pgd` and :func:`cw_linf`, where it is "the target reached". A caller
        that must be sure checks it again with a fresh prediction
        (:func:`~manifold_tf.attacks.runner.run_standing` can).
      base_passes: ``[N]`` int64, forward+backward passes of the base model run by the attack.
      shell_predictions: ``[N]`` int64, shell predictions run by the attack.
      score: ``[N]`` float32, the attack's own objective at ``x_adv`` (higher is closer to success;
        ``-inf`` when it has none): among failures, the runner keeps the highest.
      details: attack-specific per-point arrays (``[N, ...]``), e.g. ``target``, ``confidence``,
        ``label``, ``steps_used``, ``run``.
    """

    x_adv: np.ndarray
    success: np.ndarray
    base_passes: np.ndarray = None
    shell_predictions: np.ndarray = None
    score: np.ndarray = None
    details: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        x_adv = np.asarray(self.x_adv, np.float32)
        n = int(x_adv.shape[0]) if x_adv.ndim else 0
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "x_adv", x_adv)
        set_(self, "success", _rows(self.success, n, bool, "success"))
        set_(
            self,
            "base_passes",
            _rows(0 if self.base_passes is None else self.base_passes, n, np.int64, "base_passes"),
        )
        set_(
            self,
            "shell_predictions",
            _rows(
                0 if self.shell_predictions is None else self.shell_predictions,
                n,
                np.int64,
                "shell_predictions",
            ),
        )
        set_(
            self,
            "score",
            _rows(-np.inf if self.score is None else self.score, n, np.float32, "score"),
        )
        set_(
            self,
            "details",
            {
                k: _rows(v, n, np.asarray(v).dtype, f"details[{k!r}]")
                for k, v in dict(self.details).items()
            },
        )

    @classmethod
    def unattacked(cls, x, success=False, **details) -> AttackResult:
        """``x`` itself, at no cost (points an attack did not run on)."""
        x = np.asarray(x, np.float32)
        return cls(x_adv=x.copy(), success=success, details=details)

    def __len__(self) -> int:
        return int(self.x_adv.shape[0])

    @property
    def cost(self) -> dict:
        """Total cost over the points: ``{"base_passes": int, "shell_predictions": int}``."""
        return {
            "base_passes": int(self.base_passes.sum()),
            "shell_predictions": int(self.shell_predictions.sum()),
        }

    def take(self, idx) -> AttackResult:
        """The rows ``idx`` (an index array or a boolean mask) as a new result."""
        return AttackResult(
            self.x_adv[idx],
            self.success[idx],
            self.base_passes[idx],
            self.shell_predictions[idx],
            self.score[idx],
            {k: v[idx] for k, v in self.details.items()},
        )

    def replace(self, **changes) -> AttackResult:
        """A copy with ``changes`` (as :func:`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def with_cost(self, *, base_passes=0, shell_predictions=0) -> AttackResult:
        """A copy with ``base_passes`` and ``shell_predictions`` (scalars or ``[N]``) added."""
        return self.replace(
            base_passes=self.base_passes + np.asarray(base_passes, np.int64),
            shell_predictions=self.shell_predictions + np.asarray(shell_predictions, np.int64),
        )
