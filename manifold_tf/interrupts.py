"""Clean stops: SIGINT and SIGTERM stop a long job at its next safe point.

The command-line entry points call :func:`install`. The first SIGINT (Ctrl-C) or SIGTERM only sets
a flag and says so; the job runs on to its next *safe point* (a batch record saved by
:meth:`manifold_tf.evaluation.store.RunStore.save`, a protocol's settings bound, a training
checkpoint written), where :func:`check` raises :class:`Stopped`. Everything finished is on disk by
then, so ``--resume`` continues from there; the entry point prints that command
(:func:`resume_command`) and exits with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), as a
shell reports a process killed by that signal.

A second signal stops at once: the first one puts the signals back to their default action, which
kills the process even inside a long TensorFlow call (Python handlers only run between bytecodes).
Every file is written atomically, so that loses only the unfinished batch.

A job without safe points (``install(safe_points=False)``: the accuracy mode, whose work is one
piece) stops at the first signal, raising :class:`Stopped` from the handler.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: int | None = None  # the signal number of the stop asked for, if any
_installed = False
_safe_points = True


class Stopped(Exception):  # noqa: N818 - a request, not an error: the job stopped as asked
    """A job stopped at a safe point because a signal asked it to (not an error in the job).

    ``signum``: the signal; ``exit_code``: ``128 + signum``.
    """

    def __init__(self, signum: int, where: str = ""):
        self.signum = int(signum)
        self.where = where
        super().__init__(f"stopped by {signal_name(signum)}" + (f" {where}" if where else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handler(signum, frame) -> None:
    global _requested
    first = _requested is None
    _requested = signum if first else _requested
    # Any further signal takes the default action: an immediate stop, even inside a TF call.
    for s in SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    if not _safe_points:
        raise Stopped(signum)
    sys.stderr.write(
        f"\n{signal_name(signum)} received: stopping after the current batch or "
        f"checkpoint is saved (send it again to stop at once).\n"
    )
    sys.stderr.flush()


def install(*, safe_points: bool = True) -> None:
    """Installs the handlers for SIGINT and SIGTERM (main thread only; later calls re-arm them).

    ``safe_points=False``: the job has none, so the first signal raises :class:`Stopped` at once.
    """
    global _installed, _safe_points, _requested
    _requested, _safe_points, _installed = None, bool(safe_points), True
    for s in SIGNALS:
        signal.signal(s, _handler)


def uninstall() -> None:
    """Puts the default handlers back (SIGINT: ``KeyboardInterrupt``) and forgets any request."""
    global _installed, _requested
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _installed, _requested = False, None


def requested() -> int | None:
    """The signal number of a pending stop request, or ``None``."""
    return _requested


def request(signum: int = signal.SIGTERM) -> None:
    """Asks for a stop as a signal would (for tests and embedding programs)."""
    global _requested
    _requested = int(signum)


def check(where: str = "") -> None:
    """A safe point: raises :class:`Stopped` if a stop was asked for; ``where`` says what was
    saved last (shown in the message)."""
    if _requested is not None:
        raise Stopped(_requested, where)


def resume_command(argv: list[str] | None = None) -> str:
    """The command that continues this run: the same arguments with ``--resume`` (and without
    ``--overwrite``, which would start again), quoted for a POSIX shell.

    ``argv`` defaults to ``sys.argv``; a script (``evaluate.py``) is prefixed with ``python``.
    """
    argv = list(sys.argv if argv is None else argv)
    program = argv[0] if argv else "evaluate.py"
    head = ["python", program] if program.endswith(".py") else [program]
    dropped = ("--resume", "--noresume", "--overwrite", "--nooverwrite")
    rest = [a for a in argv[1:] if a.split("=", 1)[0] not in dropped]
    return shlex.join([*head, *rest, "--resume"])


def stopped_message(
    error: Stopped, program: str, output_dir: str | None, argv: list[str] | None = None
) -> str:
    """What a CLI prints when ``error`` stopped it: what is kept and the exact resume command."""
    where = f" in {output_dir}" if output_dir else ""
    return (
        f"{program}: {error}. Every finished batch and checkpoint is kept{where}. To continue "
        f"from there, run:\n  {resume_command(argv)}\n"
    )


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): os.kill's answer stands
        return True
