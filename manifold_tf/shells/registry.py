"""The shells by kind: ``SHELLS`` (kind -> class), the ``register`` decorator, and ``build``.

A new defence is one module: a :class:`~manifold_tf.shells.base.FactorShell` subclass decorated
with ``@register("kind")`` and implementing ``from_settings`` (and what the evaluation asks of a
shell, see :class:`~manifold_tf.shells.base.FactorShell`). ``build(kind, ...)`` is what the
evaluation calls; it never needs to know the kinds.
"""

from __future__ import annotations

import keras

from manifold_tf.shells.base import FactorShell

# kind -> shell class, filled by @register as the shell modules are imported (manifold_tf.shells
# imports the built-in ones).
SHELLS: dict[str, type[FactorShell]] = {}


def register(kind: str):
    """Class decorator: records a :class:`FactorShell` subclass under ``kind`` and sets
    ``cls.kind = kind``.

    Re-registering a kind with a class of the same module and name replaces it (a module reload);
    registering a kind taken by another class raises ValueError.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a shell kind must be a non-empty string; got {kind!r}.")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, FactorShell)):
            raise ValueError(f"register({kind!r}) decorates FactorShell subclasses; got {cls!r}.")
        old = SHELLS.get(kind)
        same = old is not None and (old.__module__, old.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if old is not None and not same:
            raise ValueError(
                f"shell kind {kind!r} is already registered to {old.__module__}."
                f"{old.__qualname__}; register {cls.__qualname__} under another kind."
            )
        cls.kind = kind
        SHELLS[kind] = cls
        return cls

    return decorate


def build(
    kind: str, base: keras.Model, settings, *, delta: float, p: float, seed: int = 0
) -> FactorShell:
    """The shell of ``kind`` around ``base``: ``SHELLS[kind].from_settings(...)``.

    Args:
      kind: a registered kind (``"mcn"``, ``"ncn"``, ``"cw"`` or one added with :func:`register`).
      base: Keras model, images ``[N, H, W, C]`` (pixels 0..255) -> logits ``[N, C]``.
      settings: the evaluation's shell settings, read by attribute name (see
        :meth:`FactorShell.from_settings`).
      delta: the radius setting, pixels. p: the confidence level setting (NCN). seed: a random
        shell's seed.

    Raises:
      ValueError: ``kind`` is not registered (the message lists the known kinds).
    """
    cls = SHELLS.get(kind)
    if cls is None:
        raise ValueError(
            f"unknown shell kind {kind!r}; known kinds: {sorted(SHELLS)} (a new shell "
            f"registers itself with @manifold_tf.shells.register(kind))."
        )
    return cls.from_settings(base, settings, delta=delta, p=p, seed=seed)
