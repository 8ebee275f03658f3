"""Model shells (paper, Section 5) as Keras models around a fixed base classifier.

- :class:`MCNShell`: MCN_delta, Algorithm 1 (:mod:`manifold_tf.shells.mcn`).
- :class:`NCNShell`: NCN_p, Algorithm 2 (:mod:`manifold_tf.shells.ncn`).
- :class:`CarliniWagnerShell`: the paper's own code's shell (:mod:`manifold_tf.shells.cw_shell`).

All are :class:`~manifold_tf.shells.base.FactorShell`\\ s: ``G(x) = F(H(F, x))``, every label and every
image of a batch searched at once in one compiled function; ``call``/``predict`` return
probabilities, ``embed`` the search's diagnostics, ``export`` a SavedModel.
"""

from manifold_tf.shells.base import DEFAULT_JIT_COMPILE, FactorShell, answer, log_odds
from manifold_tf.shells.cw_shell import CarliniWagnerShell
from manifold_tf.shells.mcn import MCNShell
from manifold_tf.shells.ncn import NCNShell

SHELLS = {"mcn": MCNShell, "ncn": NCNShell, "cw": CarliniWagnerShell}

__all__ = ["CarliniWagnerShell", "DEFAULT_JIT_COMPILE", "FactorShell", "MCNShell", "NCNShell",
           "SHELLS", "answer", "log_odds"]
