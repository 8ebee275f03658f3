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
      kind: a registered kind (built in: ``"mcn"``, ``"ncn"``, ``"cw"``, ``"hedge"``,
        ``"anti_adversary"``; or one added with :func:`register`).
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


def parse_kinds(text: str) -> tuple[str, ...]:
    """The registered shell kinds of ``text`` (``"mcn"`` or ``"mcn,ncn,hedge"``), in order.

    Raises ValueError naming an unknown kind (listing the registered ones), an empty item or a
    kind given twice. The registry is read now, so a kind registered before the flags are read
    (a defence of one's own, :func:`manifold_tf.shells.register`) is accepted.
    """
    items = [k.strip() for k in str(text).split(",")]
    known = sorted(SHELLS)
    if not all(items):
        raise ValueError(
            f"--shell={text!r} has an empty item: give one or more registered kinds, "
            f"comma-separated (e.g. --shell=mcn,ncn); registered kinds: {known}."
        )
    unknown = [k for k in items if k not in SHELLS]
    if unknown:
        raise ValueError(
            f"unknown shell kind{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} in --shell={text}; registered kinds: {known} (a "
            f"defence of your own registers itself with @manifold_tf.shells.register(kind) "
            f"before the flags are read)."
        )
    twice = sorted({k for k in items if items.count(k) > 1})
    if twice:
        raise ValueError(f"--shell={text} names {', '.join(map(repr, twice))} more than once.")
    return tuple(items)
