"""absl flags generated from the config dataclasses: each setting is declared once, in its config.

``define(cls, prefix)`` defines one flag per field of ``cls`` (name ``prefix + field``, or the field's
``metadata["flag"]``), typed by the field's annotation, with the field's default and help text.
``build(cls, prefix, flag_values)`` makes the dataclass back from the parsed flags; a flag left at
its default keeps the dataclass default, so a preset can change it while an explicit flag still wins.
"""

from __future__ import annotations

import dataclasses
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
        if f.name in skip:
            continue
        name, default, help_text = flag_name(f, prefix), f.default, f.metadata["help"]
        kind = _kind(cls, f)
        if kind == "enum":
            flags.DEFINE_enum(name, default, list(f.metadata["choices"]), help_text, flag_values=flag_values)
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


def show_in_help(module_name: str, flag_values=flags.FLAGS) -> None:
    """Makes ``--help`` list the flags ``module_name`` defined (absl shows the main module's only).

    The entry point is a console-script wrapper or a thin top-level script, not the module that
    defines the flags, so they are registered as key flags of the running program.
    """
    import sys

    by_module = flag_values.flags_by_module_dict()
    for flag in by_module.get(module_name, []) + by_module.get(__name__, []):
        flag_values.register_key_flag_for_module(sys.argv[0], flag)
