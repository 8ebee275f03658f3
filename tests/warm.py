"""Command-line runs without the 4-5 s TensorFlow import each: forked from a warm interpreter.

Most of a tiny ``python evaluate.py ...`` run is ``import tensorflow``; the suite starts ~70 such
processes. :func:`popen` and :func:`run` start the command as a child forked from one helper
interpreter (started once per test session) that has imported TensorFlow, Keras and ``manifold_tf``
but run no TensorFlow op, so the child initialises TF's runtime itself, as a fresh process does.

The child is a real process running the same script the same way: ``sys.argv``, ``sys.path[0]``,
the environment, the working directory, ``__name__ == "__main__"``, stdout / stderr, its own pid
for signals, Python's normal exit (non-daemon threads joined, ``atexit`` handlers run, an uncaught
exception printed with exit code 1) and a ``Popen``-like return code (``-9`` after SIGKILL).
What it does not repeat is the import: checks of a *fresh* interpreter (import order, a load
without ``manifold_tf``) and environment variables TensorFlow reads at import keep using
``subprocess``.

Commands are ``[sys.executable, script, *args]`` or ``[sys.executable, "-c", code, *args]``.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CLI modules define absl flags when imported: each command imports its own, as it would fresh.
SKIP = ("manifold_tf.cli.evaluate", "manifold_tf.cli.train")


# ------------------------------------------------------------------------------------------------
# The server side (runs in the helper interpreter, and its children become the commands)


def _reap(running: dict) -> None:
    """Writes the return code of every finished child to its ``rc`` file (atomically)."""
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        rc_path = running.pop(pid, None)
        if rc_path is not None:
            with open(rc_path + ".tmp", "w") as f:
                f.write(str(os.waitstatus_to_exitcode(status)))
            os.replace(rc_path + ".tmp", rc_path)


def _report(name: str) -> None:
    traceback.print_exc()  # to the server's log; stdout carries the protocol


def _preload() -> None:
    """Imports what a command would: TensorFlow, Keras, every ``manifold_tf`` module (CLI modules
    aside), and matplotlib on the Agg backend the reports choose."""
    import pkgutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import manifold_tf

    for info in pkgutil.walk_packages(manifold_tf.__path__, "manifold_tf.", onerror=_report):
        if info.name not in SKIP:
            try:
                __import__(info.name)
            except Exception:  # noqa: BLE001 - the command that imports it fails as it would fresh
                traceback.print_exc()


def _serve() -> dict:
    """Forks a child per request line on stdin; returns only in a child, with its request."""
    _die_with_parent()
    _preload()
    gc.freeze()  # the preloaded objects are never collected: a child's GC copies none of them
    os.write(1, b"ready\n")
    running: dict[int, str] = {}
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.02)
        _reap(running)
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:  # the test session ended: nothing may outlive it
            for pid in running:
                os.kill(pid, signal.SIGKILL)
            os._exit(0)
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                return request
            running[pid] = request["rc"]
            os.write(1, f"{pid}\n".encode())


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so no command outlives a killed session."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere: the server still kills its children when its stdin closes


def _become(request: dict) -> None:
    """Turns this forked child into ``python <argv...>`` (never returns normally)."""
    _die_with_parent()
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], write),
        (2, request["stderr"], write),
    ):
        target = os.open(path, flags, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    try:
        _run_main(request["argv"])
        code = 0
    except SystemExit as e:  # as the interpreter reads it
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT  # Python re-raises an uncaught Ctrl-C as a SIGINT death
    except BaseException:
        traceback.print_exc()
        code = 1
    _exit(code)


def _run_main(argv: list[str]) -> None:
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        code = compile(argv[1], "<string>", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102
    else:
        script = os.path.abspath(argv[0])
        sys.argv = [argv[0], *argv[1:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


def _exit(code: int) -> None:
    """The interpreter's exit up to module teardown: non-daemon threads joined, ``atexit``
    handlers run, stdio flushed. Tearing down thousands of inherited modules (seconds, as every
    freed object copies a shared page) is skipped: it writes nothing."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


# ------------------------------------------------------------------------------------------------
# The test side


class _Server:
    def __init__(self) -> None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
        self.log = os.path.join(tempfile.mkdtemp(prefix="warm-server-"), "stderr")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=ROOT,
            )
        line = self.proc.stdout.readline()
        if line != b"ready\n":
            with open(self.log) as f:
                raise RuntimeError(f"the warm interpreter did not start: {f.read()[-3000:]}")

    def start(self, request: dict) -> int:
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_SERVER: _Server | None = None


def _server() -> _Server:
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = _Server()
        atexit.register(_SERVER.close)
    return _SERVER


class Process:
    """A command forked from the warm interpreter, with the parts of ``subprocess.Popen`` the tests
    use: ``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``kill``, ``communicate``
    (text), and :meth:`wait_for_output`."""

    def __init__(self, cmd: list[str], env: dict | None = None, cwd: str = ROOT):
        if not cmd or cmd[0] != sys.executable or len(cmd) < 2:
            raise ValueError(f"expected [sys.executable, script or -c, ...]; got {cmd[:2]}")
        self._folder = tempfile.mkdtemp(prefix="warm-")
        self._paths = {k: os.path.join(self._folder, k) for k in ("stdout", "stderr", "rc")}
        request = dict(
            argv=list(cmd[1:]), env=dict(os.environ if env is None else env), cwd=str(cwd)
        )
        self.pid = _server().start({**request, **self._paths})
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and os.path.exists(self._paths["rc"]):
            with open(self._paths["rc"]) as f:
                self.returncode = int(f.read())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(self.pid, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) so far."""
        texts = []
        for key in ("stdout", "stderr"):
            try:
                with open(self._paths[key], encoding="utf-8", errors="replace") as f:
                    texts.append(f.read())
            except FileNotFoundError:
                texts.append("")
        return texts[0], texts[1]

    def wait_for_output(self, text: str, timeout: float = 600) -> None:
        """Waits until stdout contains ``text`` (raises if the process ends or time runs out)."""
        deadline = time.time() + timeout
        while text not in self.output()[0]:
            if self.poll() is not None or time.time() > deadline:
                raise AssertionError(f"no {text!r} on stdout; stderr: {self.output()[1][-2000:]}")
            time.sleep(0.02)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait(60)
            raise
        out, err = self.output()
        shutil.rmtree(self._folder, ignore_errors=True)
        return out, err


def popen(cmd: list[str], *, env: dict | None = None, cwd: str = ROOT) -> Process:
    """Starts ``cmd`` (see the module docstring) like ``subprocess.Popen`` with both streams
    captured; ``env=None`` inherits this process's environment."""
    return Process(cmd, env, cwd)


def run(
    cmd: list[str], *, env: dict | None = None, cwd: str = ROOT, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Runs ``cmd`` to the end like ``subprocess.run(..., capture_output=True, text=True)``."""
    proc = Process(cmd, env, cwd)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


if __name__ == "__main__":
    _become(_serve())
