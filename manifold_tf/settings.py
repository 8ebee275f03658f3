"""The field helper of every typed settings dataclass (training, evaluation).

A setting is declared once, with its help text: the command-line flags are generated from the
fields (:mod:`manifold_tf.cli.flags`). This module imports nothing of the package, so that any
config module can use it without an import cycle.
"""

from __future__ import annotations

from dataclasses import field


def setting(default, help: str, **kwargs):  # noqa: A002  (the name absl uses)
    """A dataclass field carrying its command-line help text.

    ``kwargs`` go to the field's metadata: ``choices`` (an enum flag), ``flag`` (the flag's name
    when it is not the section prefix + the field name).
    """
    return field(default=default, metadata={"help": help, **kwargs})
