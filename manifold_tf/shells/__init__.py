"""Model shells (paper, Section 5) as Keras models around a fixed base classifier.

- :class:`MCNShell`: MCN_delta, Algorithm 1 (:mod:`manifold_tf.shells.mcn`), kind ``"mcn"``.
- :class:`NCNShell`: NCN_p, Algorithm 2 (:mod:`manifold_tf.shells.ncn`), kind ``"ncn"``.
- :class:`CarliniWagnerShell`: the paper's own code's shell (:mod:`manifold_tf.shells.cw_shell`),
  kind ``"cw"``.
- :class:`HedgeShell`: Hedge (Wu et al. 2021, :mod:`manifold_tf.shells.hedge`), kind ``"hedge"``.
- :class:`AntiAdversaryShell`: the anti-adversary layer (Alfarra et al. 2022,
  :mod:`manifold_tf.shells.anti_adversary`), kind ``"anti_adversary"``.
- :func:`calibrate.confidence_quantile`: NCN's ``p`` from the base's clean confidences
  (``--p=auto``, :mod:`manifold_tf.shells.calibrate`).

All are :class:`~manifold_tf.shells.base.FactorShell`\\ s: ``G(x) = F(H(F, x))``, every label and
every image of a batch searched at once in one compiled function; ``call``/``predict`` return
probabilities, ``embed`` the search's diagnostics, ``export`` a SavedModel. Each declares what the
evaluation needs (cost, decision rule as :class:`Scores`, search radius, randomness) and is built
by kind through :func:`build` from :data:`SHELLS` (:mod:`manifold_tf.shells.registry`); a new
shell registers itself with ``@register("kind")``.
"""

# Importing the shell modules registers the built-in kinds (@register).
from manifold_tf.shells.anti_adversary import AntiAdversaryShell
from manifold_tf.shells.base import DEFAULT_JIT_COMPILE, FactorShell, Scores, answer, log_odds
from manifold_tf.shells.cw_shell import CarliniWagnerShell
from manifold_tf.shells.hedge import HedgeShell
from manifold_tf.shells.mcn import MCNShell
from manifold_tf.shells.ncn import NCNShell
from manifold_tf.shells.registry import SHELLS, build, register

__all__ = [
    "AntiAdversaryShell",
    "CarliniWagnerShell",
    "DEFAULT_JIT_COMPILE",
    "FactorShell",
    "HedgeShell",
    "MCNShell",
    "NCNShell",
    "SHELLS",
    "Scores",
    "answer",
    "build",
    "log_odds",
    "register",
]
