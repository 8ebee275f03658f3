"""The evaluation protocols, one module each, on one resumable run store.

- :mod:`~manifold_tf.evaluation.accuracy`: clean and PGD accuracy of a base model.
- :mod:`~manifold_tf.evaluation.separation`: the (p, q, delta)-separation test (Table 1).
- :mod:`~manifold_tf.evaluation.defence`: the paper's defence evaluation of a shell (Table 2),
  rendered by :mod:`~manifold_tf.evaluation.defence_report`.
- :mod:`~manifold_tf.evaluation.adaptive`: attacks on the shell itself.
- :mod:`~manifold_tf.evaluation.config`: the typed settings; :mod:`~manifold_tf.evaluation.inputs`:
  models, data and their defaults; :mod:`~manifold_tf.evaluation.store`: the run store;
  :mod:`~manifold_tf.evaluation.stats`: intervals and tests; :mod:`~manifold_tf.evaluation.runner`:
  one call per mode.
"""

from manifold_tf.evaluation.adaptive_config import AdaptiveConfig, parse_budget
from manifold_tf.evaluation.config import (
    AccuracyConfig,
    BaseAttackConfig,
    DefenceConfig,
    EvaluationConfig,
    InputConfig,
    RunConfig,
    SeparationConfig,
    ShellConfig,
    ThreatConfig,
)
from manifold_tf.evaluation.presets import PRESETS, from_preset
from manifold_tf.evaluation.runner import evaluate
from manifold_tf.evaluation.store import RunStore, SettingsMismatch

__all__ = [
    "PRESETS",
    "AccuracyConfig",
    "AdaptiveConfig",
    "BaseAttackConfig",
    "DefenceConfig",
    "EvaluationConfig",
    "InputConfig",
    "RunConfig",
    "RunStore",
    "SeparationConfig",
    "SettingsMismatch",
    "ShellConfig",
    "ThreatConfig",
    "evaluate",
    "from_preset",
    "parse_budget",
]
