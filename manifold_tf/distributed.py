"""Several worker processes on TensorFlow's own engine: ``MultiWorkerMirroredStrategy``.

A cluster is described, as everywhere in TensorFlow, by the ``TF_CONFIG`` environment variable of
each process::

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 0}}'

Worker 0 is the chief. :func:`from_env` creates the strategy (it must exist before any other
TensorFlow op runs, so the scripts call it first) and returns :class:`Workers`, this process's place
in the cluster:

- Training hands the strategy to Keras ``fit``: every worker computes gradients on its share of each
  global batch and the collective all-reduce keeps the weights identical; only the chief writes
  checkpoints, ``best.keras`` and ``final.keras`` (the others write to a scratch folder, as
  TensorFlow's multi-worker checkpointing requires, then delete it).
- Evaluations are independent batches of points: batch ``b`` belongs to worker ``b % count``. Each
  finished batch goes to the shared run store at once, the workers meet at a collective barrier at
  the end of each protocol, and the chief writes the reports from the store. The store must be a
  folder every worker sees (one host, NFS, GCS FUSE ...). A worker that dies makes the others fail
  at the next barrier (TensorFlow's heartbeat check aborts the collective); every batch finished by
  then stays in the store, and ``--resume`` runs only the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

TF_CONFIG = "TF_CONFIG"
# What a collective raises when a peer dies (heartbeat lost) or the cluster cannot form.
WORKER_LOST = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)


@dataclasses.dataclass(frozen=True)
class Workers:
    """This process's place among ``count`` workers (``index`` 0 is the chief).

    ``strategy``: the ``MultiWorkerMirroredStrategy`` when there are several workers, else ``None``.
    """

    index: int = 0
    count: int = 1
    strategy: tf.distribute.Strategy | None = None

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.count > 1

    def owns(self, batch: int) -> bool:
        """Whether batch number ``batch`` of an evaluation is this worker's work."""
        return batch % self.count == self.index

    def barrier(self, name: str = "") -> None:
        """Waits until every worker gets here (a collective all-reduce); a no-op for one process.

        Raises ``tf.errors.UnavailableError`` when a worker has died (no heartbeat).
        """
        if not self.distributed:
            return
        total = self.strategy.reduce(
            tf.distribute.ReduceOp.SUM, self.strategy.run(lambda: tf.constant(1.0)), axis=None
        )
        expected = self.strategy.num_replicas_in_sync
        if int(round(float(total))) != expected:  # a mismatched collective: workers out of step
            raise RuntimeError(f"barrier {name!r}: {float(total)} of {expected} replicas answered.")

    def all_sum(self, values, name: str = "") -> list[float]:
        """Each entry of ``values`` (floats, the same length on every worker) summed over the
        workers: a collective, so also a barrier. For one process, ``values`` as floats.

        Raises ``tf.errors.UnavailableError`` when a worker has died (no heartbeat).
        """
        values = [float(v) for v in values]
        if not self.distributed:
            return values
        total = self.strategy.reduce(
            tf.distribute.ReduceOp.SUM,
            self.strategy.run(lambda: tf.constant(values, tf.float64)),
            axis=None,
        )
        out = [float(v) for v in np.asarray(total).reshape(-1)]
        if len(out) != len(values):
            raise RuntimeError(f"all_sum {name!r}: {len(out)} values for {len(values)}.")
        return out

    def chief_first(self, fn, name: str = ""):
        """Runs ``fn()`` on the chief, then on the others (e.g. make a folder, then use it)."""
        if self.is_chief:
            out = fn()
            self.barrier(name)
            return out
        self.barrier(name)
        return fn()

    def describe(self) -> str:
        return f"worker {self.index} of {self.count}" + (" (chief)" if self.is_chief else "")


SINGLE = Workers()


def parse_tf_config(text: str | None) -> tuple[int, int] | None:
    """``(index, count)`` of the worker ``TF_CONFIG`` describes, ``None`` without one.

    Raises ``ValueError`` naming the problem for malformed JSON, a missing or unknown task, or an
    index outside the cluster.
    """
    if not text:
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{TF_CONFIG} is not JSON ({e}): {text[:200]!r}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise ValueError(f'{TF_CONFIG} needs a "cluster" object; got {text[:200]!r}.')
    task = spec.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(
            f'{TF_CONFIG} needs "task": {{"type": "worker", "index": i}}; got {task!r}.'
        )
    cluster = spec["cluster"]
    unknown = sorted(set(cluster) - {"worker", "chief"})
    if unknown:
        raise ValueError(
            f"{TF_CONFIG}: only 'worker' (and 'chief') jobs are used here; got {unknown}."
        )
    # An explicit "chief" job is task 0 of the collective group, then the workers.
    chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
    if len(chiefs) > 1:
        raise ValueError(f"{TF_CONFIG}: at most one chief; got {chiefs}.")
    kind, i = task["type"], task["index"]
    if kind not in ("worker", "chief") or not isinstance(i, int):
        raise ValueError(
            f"{TF_CONFIG}: task must be a worker or the chief with an integer index; got {task!r}."
        )
    group = {"chief": chiefs, "worker": workers}[kind]
    if not 0 <= i < len(group):
        raise ValueError(
            f"{TF_CONFIG}: task {kind} {i} is not in the cluster ({len(group)} {kind}s)."
        )
    index = i if kind == "chief" else len(chiefs) + i
    return index, len(chiefs) + len(workers)


def from_env(*, heartbeat_seconds: float | None = None) -> Workers:
    """This process's :class:`Workers`, from ``TF_CONFIG``; call before any other TensorFlow op.

    One process (no ``TF_CONFIG`` or a one-worker cluster) gets :data:`SINGLE` and no strategy.
    ``heartbeat_seconds`` shortens TensorFlow's peer health check (30 s between checks by default),
    so that a dead worker is noticed sooner.
    """
    parsed = parse_tf_config(os.environ.get(TF_CONFIG))
    if parsed is None or parsed[1] == 1:
        return SINGLE
    index, count = parsed
    if heartbeat_seconds is not None:
        # Class attributes of TensorFlow's collective strategy (no public setting exists).
        # deferred: a private TensorFlow module; if a TF release moves it, only this option breaks.
        from tensorflow.python.distribute import collective_all_reduce_strategy as cars

        cars.CollectiveAllReduceExtended._check_health_interval = float(heartbeat_seconds)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as e:
        raise RuntimeError(
            f"could not start MultiWorkerMirroredStrategy ({e}); it must be created before any "
            f"other TensorFlow op in the process."
        ) from None
    return Workers(index=index, count=count, strategy=strategy)


def scratch_dir(directory: str, workers: Workers) -> str:
    """Where this worker writes files only the chief keeps: ``directory`` itself for the chief.

    TensorFlow's multi-worker checkpointing needs every worker to save (a save reads every
    variable); the non-chief workers save into a private temporary folder, removed by
    :func:`remove_scratch`.
    """
    if workers.is_chief:
        return directory
    return tempfile.mkdtemp(prefix=f"manifold_tf_worker{workers.index}_")


def remove_scratch(path: str, directory: str) -> None:
    if os.path.abspath(path) != os.path.abspath(directory):
        shutil.rmtree(path, ignore_errors=True)
