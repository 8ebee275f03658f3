"""Model shells (paper, Section 5) as Keras models around a fixed base classifier.

- :class:`MCNShell`: MCN_delta, Algorithm 1 (:mod:`manifold_tf.shells.mcn`), kind ``"mcn"``.
- :class:`NCNShell`: NCN_p, Algorithm 2 (:mod:`manifold_tf.shells.ncn`), kind ``"ncn"``.
- :class:`CarliniWagnerShell`: the paper's own code's shell (:mod:`manifold_tf.shells.cw_shell`),
  kind ``"cw"``.

All are :class:`~manifold_tf.shells.base.FactorShell`\\ s: ``G(x) = F(H(F, x))``, every label and
every image of a batch searched at once in one compiled function; ``call``/``predict`` return
probabilities, ``embed`` the search's diagnostics, ``export`` a SavedModel. Each declares what the
evaluation needs (cost, decision rule as :class:`Scores`, search radius, randomness) and is built
by kind through :func:`build` from :data:`SHELLS` (:mod:`manifold_tf.shells.registry`); a new
shell registers itself with ``@register("kind")``.
"""

# Importing the shell modules registers the built-in kinds (@register).
from manifold_tf.shells.base import DEFAULT_JIT_COMPILE, FactorShell, Scores, answer, log_odds
from manifold_tf.shells.cw_shell import CarliniWagnerShell
from manifold_tf.shells.mcn import MCNShell
from manifold_tf.shells.ncn import NCNShell
from manifold_tf.shells.registry import SHELLS, build, register

__all__ = ["CarliniWagnerShell", "DEFAULT_JIT_COMPILE", "FactorShell", "MCNShell", "NCNShell",
           "SHELLS", "Scores", "answer", "build", "log_odds", "register"]
