"""One resumable run store for every long run (separation, defence, adaptive, training's check).

A run directory holds, per protocol, the settings it ran with (saved once) and one record per
finished batch (a JSON file, plus optional ``.npy`` arrays written *before* it, so a JSON file marks
a finished batch). Every file is written atomically (a temporary file, then ``os.replace``): a run
killed at any moment leaves either the old file or the new one. On ``resume`` the saved settings are
compared with the new ones in one place (:func:`compare_settings`), and a difference is one clear
error naming each setting that differs; a corrupt file is an error naming the file.

Layout::

    <run>/<protocol>/settings.json
    <run>/<protocol>/batch_000.json, batch_000_<array>.npy, ...
    <run>/<report>.json, <report>.md, <figure>.png      (written by the protocols)
    <run>/.lock                                         (the run that owns the directory)

One run per directory: a store that writes takes the directory's lock (:func:`acquire_lock`), a
``.lock`` file naming the owner (pid, host, start time, command), held until the process exits.
Another process on the same directory is refused with an error naming the owner; a lock whose
process is gone (same host, pid not alive) is taken over with a logged warning. Several workers of
one run (TF_CONFIG) share it: the chief holds it, the others do not take it.

Safe points: :meth:`RunStore.save` and :meth:`RunStore.bind` call
:func:`manifold_tf.interrupts.check` once their files are complete, so a SIGINT or SIGTERM stops
the run there, with every finished batch kept.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
from absl import logging

from manifold_tf import interrupts, reporting
from manifold_tf.distributed import SINGLE, Workers

LOCK_FILE = reporting.LOCK_FILE


class RunLocked(RuntimeError):
    """Another live process owns the run directory (its ``.lock`` names it)."""


# The run directories this process holds the lock of: real path -> lock file path.
_HELD: dict[str, str] = {}


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict:
    return dict(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=shlex.join(sys.argv),
        process_start=_process_start(os.getpid()),
    )


def describe_owner(owner: dict) -> str:
    return (
        f"pid {owner.get('pid')} on host {owner.get('host')!r}, started "
        f"{owner.get('started')}: {owner.get('command')}"
    )


def _alive(owner: dict) -> bool:
    """Whether the owner of a lock on this host still runs (the same process, not a reused pid)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or not interrupts.pid_alive(pid):
        return False
    started = owner.get("process_start")
    return started is None or _process_start(pid) in (None, started)


@contextlib.contextmanager
def _directory_mutex(directory: str):
    """Serialises lock decisions of the processes on this host (a flock on the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def acquire_lock(directory: str) -> str:
    """Takes the lock of run directory ``directory`` for this process; returns the lock's path.

    Re-entrant within a process (several stores on one directory). Raises :class:`RunLocked`
    naming the owner when another live process holds it; takes over, with a logged warning, a lock
    left by a process that is gone (same host only: another host's pid cannot be checked). A lock
    file that cannot be read is refused, naming it.
    """
    key = os.path.realpath(directory)
    path = os.path.join(directory, LOCK_FILE)
    if _HELD.get(key) and os.path.exists(_HELD[key]):
        return _HELD[key]
    with _directory_mutex(directory):
        owner = None
        if os.path.exists(path):
            try:
                owner = reporting.read_json(path)
                if not isinstance(owner, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                raise RunLocked(
                    f"{path} cannot be read ({e}): if no run is using {directory!r}, delete it."
                ) from None
        if owner is not None and not (
            owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()
        ):
            if owner.get("host") != socket.gethostname():
                raise RunLocked(
                    f"{directory!r} is in use by another run ({describe_owner(owner)}; lock "
                    f"{path}). It runs on another host, so this one cannot tell whether it is "
                    f"still alive: wait for it to finish, use another output directory, or delete "
                    f"{path} if that run is gone."
                )
            if _alive(owner):
                raise RunLocked(
                    f"{directory!r} is in use by another run ({describe_owner(owner)}; lock "
                    f"{path}). Wait for it to finish, stop it (it resumes with --resume), or use "
                    f"another output directory."
                )
            logging.warning(
                "taking over the lock of %s: its owner (%s) is gone.",
                directory,
                describe_owner(owner),
            )
        reporting.write_json(path, _owner())
    _HELD[key] = path
    return path


def release_lock(directory: str) -> None:
    """Releases this process's lock on ``directory`` (a no-op if it holds none)."""
    path = _HELD.pop(os.path.realpath(directory), None)
    if path is None:
        return
    try:
        owner = reporting.read_json(path)
        if isinstance(owner, dict) and owner.get("pid") == os.getpid():
            os.remove(path)
    except (OSError, ValueError):
        pass  # gone or replaced: not ours to remove any more


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        release_lock(key)


class SettingsMismatch(ValueError):
    """A resumed run was given settings that differ from the saved ones."""


def compare_settings(saved: dict, now: dict, *, free: Iterable[str] = (), where: str = "") -> None:
    """Raises :class:`SettingsMismatch` naming every key whose value differs (except ``free`` ones;
    ``"section.key"`` frees one key of a nested section).

    Both sides are compared in their JSON form (tuples and lists, numpy scalars and floats alike).
    """
    saved = json.loads(json.dumps(reporting.to_jsonable(saved)))
    now = json.loads(json.dumps(reporting.to_jsonable(now)))
    free = set(free)
    for key in [k for k in free if "." in k]:  # "suite.budget": a key of a nested section
        section, name = key.split(".", 1)
        for side in (saved, now):
            if isinstance(side.get(section), dict):
                side[section].pop(name, None)
    keys = [k for k in sorted(set(saved) | set(now)) if k not in free]
    diff = [k for k in keys if saved.get(k, "<missing>") != now.get(k, "<missing>")]
    if diff:
        lines = "\n".join(
            f"  {k}: saved {saved.get(k, '<missing>')!r}, now {now.get(k, '<missing>')!r}"
            for k in diff
        )
        raise SettingsMismatch(
            f"--resume with settings that differ from the run{' in ' + where if where else ''}:\n"
            f"{lines}\nUse the same settings, another output directory, or --overwrite to start "
            f"again."
        )


def read_json_checked(path: str) -> Any:
    """``read_json`` with a clear error for a truncated or corrupt file."""
    try:
        return reporting.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is corrupt ({e}); delete it to recompute that batch, or use "
            f"--overwrite to start the run again."
        ) from None


class RunStore:
    """A run directory: settings per protocol, batch records and arrays, reports.

    Args:
      directory: the run directory (created if needed).
      resume: keep what the directory holds (settings must match on :meth:`bind`).
      overwrite: allow a non-empty directory without ``resume``; a protocol's old batches are
        deleted when it is bound.
      Neither: the directory must be empty or missing (nothing a user wrote is clobbered).
      workers: several worker processes sharing this directory (:mod:`manifold_tf.distributed`):
        the chief prepares the directory and binds settings first; the others then check theirs
        against the chief's (a worker started with other flags is an error). Reports are the
        chief's to write.
      lock: take the directory's lock (module docstring) when the store first writes, and at once
        when not resuming. ``False`` for a store that only reads another run's files.
    """

    def __init__(
        self,
        directory: str,
        *,
        resume: bool = False,
        overwrite: bool = False,
        workers: Workers = SINGLE,
        lock: bool = True,
    ):
        self.workers = workers
        self.resume = bool(resume)
        self.overwrite = bool(overwrite)
        # The chief owns the lock for every worker; a read-only store (another run's x', read by
        # --base_attack_from_run with resume=True) takes it only if it ever writes.
        self._lock = bool(lock) and workers.is_chief

        def prepare() -> str:
            if workers.is_chief:
                if self._lock and not resume and os.path.isdir(directory):
                    acquire_lock(directory)  # before the emptiness check: name a live owner
                out = reporting.prepare_output_dir(directory, overwrite=overwrite, resume=resume)
                if self._lock and not resume:
                    acquire_lock(out)
                return out
            if not os.path.isdir(directory):
                raise FileNotFoundError(
                    f"{directory!r} does not exist on {workers.describe()}: "
                    f"the run directory must be shared by every worker."
                )
            return directory

        self.directory = workers.chief_first(prepare, "store")
        self._lock_directory = self.directory

    def _writing(self) -> None:
        """Takes the directory's lock before the first write (see ``lock``)."""
        if self._lock:
            acquire_lock(self._lock_directory)

    def close(self) -> None:
        """Releases the directory's lock now (it is also released when the process exits)."""
        if self._lock:
            release_lock(self._lock_directory)

    def sub(self, name: str) -> RunStore:
        """The store of the folder ``name`` inside this run (one defence of a comparison): laid
        out like a run of its own, with this store's resume, workers and lock (the run's)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"a run's sub-folder name must be a plain file name; got {name!r}.")
        child = copy.copy(self)
        child.directory = self.path(name)
        os.makedirs(child.directory, exist_ok=True)
        return child

    # -- settings --------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def bind(
        self,
        protocol: str,
        settings: dict,
        *,
        free: Iterable[str] = (),
        settings_file: str | None = None,
    ) -> dict:
        """Declares the settings of ``protocol`` for this run; returns them as saved (JSON form).

        On resume, saved settings must equal ``settings`` except for the ``free`` keys (things that
        may change between sessions, e.g. the device strategy). Without resume, the protocol's
        old files are removed first.
        """
        folder = self.path(protocol)
        path = (
            os.path.join(folder, "settings.json")
            if settings_file is None
            else self.path(settings_file)
        )
        # The chief has bound them: the same flags must give the same settings.
        if not self.workers.is_chief:
            self.workers.barrier(f"bind {protocol}")
            compare_settings(
                read_json_checked(path),
                settings,
                free=free,
                where=f"{folder!r}, as the chief bound them ({self.workers.describe()})",
            )
            interrupts.check(f"before {protocol} began")
            return json.loads(json.dumps(reporting.to_jsonable(settings)))
        self._writing()
        if os.path.exists(path) and self.resume:
            compare_settings(read_json_checked(path), settings, free=free, where=repr(folder))
        elif not self.resume and os.path.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        reporting.write_json(path, settings)
        self.workers.barrier(f"bind {protocol}")
        # A safe point: whatever ran before this protocol is saved, none of it has begun.
        interrupts.check(f"before {protocol} began")
        return json.loads(json.dumps(reporting.to_jsonable(settings)))

    def settings(self, protocol: str) -> dict | None:
        path = self.path(protocol, "settings.json")
        return read_json_checked(path) if os.path.exists(path) else None

    # -- batches ---------------------------------------------------------------------------------

    def _batch(self, protocol: str, b: int, suffix: str = ".json") -> str:
        return self.path(protocol, f"batch_{int(b):03d}{suffix}")

    def save(
        self, protocol: str, b: int, record: dict, arrays: dict[str, np.ndarray] | None = None
    ) -> None:
        """Writes batch ``b``: its arrays first, then the JSON record that marks it finished.

        Then a safe point: raises :class:`~manifold_tf.interrupts.Stopped` if a signal asked the
        run to stop (the batch is on disk).
        """
        self._writing()
        for name, array in (arrays or {}).items():
            reporting.write_array(self._batch(protocol, b, f"_{name}.npy"), np.asarray(array))
        reporting.write_json(self._batch(protocol, b), record)
        interrupts.check(f"after saving {self._batch(protocol, b)}")

    def load(self, protocol: str, b: int) -> dict | None:
        """Batch ``b``'s record, or ``None`` if it has not finished."""
        path = self._batch(protocol, b)
        return read_json_checked(path) if os.path.exists(path) else None

    def load_array(self, protocol: str, b: int, name: str) -> np.ndarray:
        path = self._batch(protocol, b, f"_{name}.npy")
        try:
            return np.load(path)
        except FileNotFoundError:
            raise
        except Exception as e:  # a truncated or foreign file: name it
            raise ValueError(
                f"{path} is corrupt ({type(e).__name__}: {e}); delete it and its "
                f"batch JSON to recompute that batch."
            ) from None

    def finished(self, protocol: str) -> list[int]:
        """The numbers of the finished batches of ``protocol``, in order."""
        folder = self.path(protocol)
        if not os.path.isdir(folder):
            return []
        return sorted(
            int(m.group(1))
            for n in os.listdir(folder)
            if (m := re.fullmatch(r"batch_(\d{3})\.json", n))
        )

    def mine(self, b: int) -> bool:
        """Whether batch ``b`` is this worker's to compute (every batch, for one process)."""
        return self.workers.owns(b)

    def progress(self, sizes: list[int], records: list, desc: str, unit: str = "points"):
        """A :class:`~manifold_tf.reporting.Progress` over this worker's batches.

        ``sizes[b]``: the points of batch ``b``; batches that ``records`` holds count as done.
        """
        mine = [b for b in range(len(sizes)) if self.mine(b)]
        if self.workers.distributed:
            desc = f"{desc} [{self.workers.describe()}]"
        return reporting.Progress(
            sum(sizes[b] for b in mine),
            desc,
            unit=unit,
            initial=sum(sizes[b] for b in mine if records[b] is not None),
        )

    def gather(self, protocol: str, num_batches: int) -> list[dict]:
        """Every batch record of ``protocol`` once all workers have finished theirs (a barrier).

        Raises ``ValueError`` if a batch is missing (a worker skipped it: a bug, not a user error).
        """
        self.workers.barrier(f"gather {protocol}")
        records = [self.load(protocol, b) for b in range(num_batches)]
        missing = [b for b, r in enumerate(records) if r is None]
        if missing:
            raise ValueError(
                f"batches {missing} of {self.path(protocol)} are missing after every "
                f"worker finished."
            )
        return records

    def alone(self) -> RunStore:
        """This store without barriers: for the chief's own work after :meth:`gather` (reports)."""
        solo = copy.copy(self)
        solo.workers = SINGLE
        return solo

    def save_note(self, protocol: str, name: str, note: dict) -> None:
        """``<protocol>/<name>.json``: a small file beside the batches (not a batch record)."""
        self._writing()
        reporting.write_json(self.path(protocol, f"{name}.json"), note)

    def load_note(self, protocol: str, name: str) -> dict | None:
        path = self.path(protocol, f"{name}.json")
        return read_json_checked(path) if os.path.exists(path) else None

    # -- reports ---------------------------------------------------------------------------------

    def write_report(self, name: str, report: dict, markdown: str | None = None) -> None:
        """``<name>.json`` and, if given, ``<name>.md`` at the top of the run directory."""
        self._writing()
        reporting.write_json(self.path(f"{name}.json"), report)
        if markdown is not None:
            reporting.write_text(self.path(f"{name}.md"), markdown)
