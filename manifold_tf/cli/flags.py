"""absl flags generated from the config dataclasses: each setting is declared once, in its config.

``define(cls, prefix)`` defines one flag per field of ``cls`` (name ``prefix + field``, or the
field's ``metadata["flag"]``), typed by the field's annotation, with the field's default and help
text. ``build(cls, prefix, flag_values)`` makes the dataclass back from the parsed flags; a flag
left at its default keeps the dataclass default, so a preset can change it while an explicit flag
still wins.

For a tree of configs (nested dataclasses declared with
:func:`manifold_tf.evaluation.config.section`, each with its flag prefix): :func:`walk` lists every
setting with its flag, :func:`define_tree` defines them all, and :func:`given` returns the
explicitly given ones as nested changes, for :func:`manifold_tf.evaluation.config.make` to lay over
a preset's.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from absl import flags


def _kind(cls, f: dataclasses.Field) -> str:
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) is tuple:
        return "list"
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if f.metadata.get("choices"):
        return "enum"
    return {bool: "bool", int: "integer", float: "float", str: "string"}.get(args[0], "string")


def _value(cls, f: dataclasses.Field, value):
    """A parsed flag value in the field's type (comma lists -> typed tuples)."""
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return tuple(item(v) for v in value)
    return value


def flag_name(f: dataclasses.Field, prefix: str) -> str:
    return f.metadata.get("flag", prefix + f.name)


def scalar_fields(cls):
    """The fields of ``cls`` that become flags (nested dataclasses are configured separately)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def define(cls, prefix: str = "", *, flag_values=flags.FLAGS, skip=()) -> None:
    """Defines a flag for every setting of ``cls``; defaults shown are the dataclass defaults."""
    for f in scalar_fields(cls):
        if f.name not in skip:
            _define(cls, f, flag_name(f, prefix), flag_values)


def _define(cls, f: dataclasses.Field, name: str, flag_values) -> None:
    """Defines flag ``name`` for field ``f`` of ``cls``, typed by its annotation."""
    default, help_text = f.default, f.metadata["help"]
    kind = _kind(cls, f)
    if kind == "enum":
        flags.DEFINE_enum(
            name, default, list(f.metadata["choices"]), help_text, flag_values=flag_values
        )
    elif kind == "bool":
        flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
    elif kind == "integer":
        flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif kind == "list":
        flags.DEFINE_list(name, [str(v) for v in default], help_text, flag_values=flag_values)
    elif kind == "float":
        flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    else:
        flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def build(cls, prefix: str = "", *, flag_values=flags.FLAGS, base=None, skip=(), **nested):
    """``cls`` from the parsed flags: explicitly given flags override ``base`` (or the defaults)."""
    base = base if base is not None else cls()
    changes = dict(nested)
    for f in scalar_fields(cls):
        if f.name in skip:
            continue
        name = flag_name(f, prefix)
        if flag_values[name].present:
            changes[f.name] = _value(cls, f, flag_values[name].value)
    return dataclasses.replace(base, **changes)


class Setting(typing.NamedTuple):
    """One setting of a config tree: its field path, the dataclass owning it, the field, its
    flag."""

    path: tuple[str, ...]
    owner: type
    field: dataclasses.Field
    flag: str


def walk(cls, prefix: str = "", path: tuple[str, ...] = ()):
    """Every setting of ``cls`` and of its sections, depth first, as :class:`Setting` s.

    A section field (metadata ``section`` and ``prefix``) is walked with its own prefix; a field
    without help text (such as ``EvaluationConfig.mode``) is not a flag and is skipped.
    """
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            yield from walk(f.metadata["section"], f.metadata["prefix"], (*path, f.name))
        elif "help" in f.metadata:
            yield Setting((*path, f.name), cls, f, flag_name(f, prefix))


def define_tree(cls, *, flag_values=flags.FLAGS) -> None:
    """Defines a flag for every setting of ``cls`` and its sections (see :func:`walk`).

    Raises ValueError naming a flag two settings would share (two sections with clashing prefixes).
    """
    seen: dict[str, tuple[str, ...]] = {}
    for s in walk(cls):
        if s.flag in seen:
            raise ValueError(
                f"--{s.flag} would configure both {'.'.join(seen[s.flag])} and "
                f"{'.'.join(s.path)}: give one of them a flag= or another prefix."
            )
        seen[s.flag] = s.path
        _define(s.owner, s.field, s.flag, flag_values)


def given(cls, *, flag_values=flags.FLAGS) -> dict:
    """The settings of ``cls``'s tree whose flags were given explicitly, as nested changes."""
    out: dict = {}
    for s in walk(cls):
        if flag_values[s.flag].present:
            node = out
            for key in s.path[:-1]:
                node = node.setdefault(key, {})
            node[s.path[-1]] = _value(s.owner, s.field, flag_values[s.flag].value)
    return out


def flags_of(cls, changes: dict) -> list[str]:
    """``changes`` (nested, as for :func:`~manifold_tf.evaluation.config.make`) written as the
    ``--flag=value`` arguments that make them (lists comma-separated)."""
    out = []
    for s in walk(cls):
        node = changes
        for key in s.path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            value = ",".join(map(str, node)) if isinstance(node, (tuple, list)) else node
            out.append(f"--{s.flag}={value}")
    return out


def show_in_help(module_name: str, flag_values=flags.FLAGS) -> None:
    """Makes ``--help`` list the flags ``module_name`` defined (absl shows the main module's only).

    The entry point is a console-script wrapper or a thin top-level script, not the module that
    defines the flags, so they are registered as key flags of the running program.
    """
    by_module = flag_values.flags_by_module_dict()
    for flag in by_module.get(module_name, []) + by_module.get(__name__, []):
        flag_values.register_key_flag_for_module(sys.argv[0], flag)
