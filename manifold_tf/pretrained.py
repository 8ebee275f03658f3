"""The models this project trained and ships inside the package (``manifold_tf/weights/``).

They are found through :mod:`importlib.resources`, so they resolve from any working directory,
in a checkout, after ``pip install .`` and after ``pip install -e .``. What each model is (command,
data, seed, accuracy) is documented in ``manifold_tf/weights/README.md``.

    >>> import keras
    >>> from manifold_tf import pretrained
    >>> base = keras.saving.load_model(pretrained.path("synthetic_narrow"))  # logits, pixels 0..255
"""

from __future__ import annotations

import importlib.resources
import os

SUFFIX = ".keras"


def _weights_dir() -> str:
    # manifold_tf is a regular package installed as files (never zipped), so this is a real folder.
    return os.fspath(importlib.resources.files("manifold_tf").joinpath("weights"))


def available() -> list[str]:
    """Names of the shipped models (file names without ``.keras``), sorted."""
    directory = _weights_dir()
    if not os.path.isdir(directory):
        return []
    return sorted(f[: -len(SUFFIX)] for f in os.listdir(directory) if f.endswith(SUFFIX))


def path(name: str) -> str:
    """The absolute path of a shipped model, e.g. ``path("narrow_adv")``.

    Args:
      name: a model name (``"narrow_adv"``, ``"narrow_natural"``, ``"synthetic_narrow"``, ...; see
        :func:`available`) or its file name (``"narrow_adv.keras"``).

    Raises:
      FileNotFoundError: no such model; the message lists the available names.
    """
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    names = available()
    if stem not in names:
        raise FileNotFoundError(
            f"no pretrained model {name!r} in {_weights_dir()}; available: "
            f"{', '.join(names) if names else '(none)'}."
        )
    return os.path.join(_weights_dir(), stem + SUFFIX)
