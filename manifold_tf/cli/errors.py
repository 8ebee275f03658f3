"""How the command-line scripts report a usage error: the problem, then a pointer to ``--help``."""

from __future__ import annotations

import os
import sys

USAGE_EXIT_CODE = 2  # as argparse and most Unix tools: the command line itself is wrong


def usage_error(program: str, message: str, script: str | None = None) -> None:
    """Prints ``program: error: message`` and how to list the flags, then exits with 2.

    absl's ``app.UsageError`` prints every flag's help before the problem, so a newcomer has to
    find the one line that matters below hundreds; this prints that line only. ``script`` (default:
    ``sys.argv[0]``'s name) is what the ``--help`` hint runs.
    """
    script = script or os.path.basename(sys.argv[0] or program)
    run_help = f"python {script} --help" if script.endswith(".py") else f"{script} --help"
    sys.stderr.write(f"{program}: error: {message}\nRun '{run_help}' to list the flags.\n")
    sys.exit(USAGE_EXIT_CODE)
