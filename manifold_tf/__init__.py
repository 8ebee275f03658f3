"""manifold_tf: the (p, q, delta)-separation test, the MCN/NCN model shells, and their evaluation.

Importing the package registers its custom Keras layers, so ``keras.saving.load_model`` can read
the project's ``.keras`` files once any ``manifold_tf`` module has been imported.
"""

from manifold_tf import models as _models  # noqa: F401  (registers the serialisable layers)
