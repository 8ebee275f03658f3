"""The verdict's ``summary.json`` as TensorBoard summaries, for the HParams dashboard.

Each verdict's summaries go to ``<run dir>/tensorboard/``, so ``tensorboard --logdir results``
with several run directories below ``results/`` shows each verdict as its own run (named
``<run dir>/tensorboard``) and lines them up in the HParams dashboard: one row per verdict, its
hyperparameters (:func:`hparams`) beside its metrics (:func:`metrics`, all at step 0).

No experiment-level config (``hparams_config``) is written: TensorBoard would take the first one
it finds for every run, hiding the settings of other shells (NCN's ``p`` beside MCN's runs);
without one it gathers the hyperparameters and metrics of all runs.

The summaries are a view of ``summary.json`` (the record), written from it and replaced with it
on resume. They need the ``tensorboard`` package (the ``tensorboard`` extra of ``pyproject.toml``;
pinned in ``requirements.txt``): without it :func:`write_beside` logs a warning and writes nothing.

Backfill runs made before this module: ``python -m manifold_tf.cli.summaries
results/*/summary.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging

from manifold_tf import reporting
from manifold_tf.evaluation import presets

SUBDIR = "tensorboard"
# Settings of the suite that say when it stops, not how hard it attacks: left out when naming the
# preset whose attack suite a run used (the paper preset runs the default suite on 150 points).
_STOPPING = ("num_points", "until", "margin", "budget")
_SCALARS = (bool, int, float, str)


def _scalar(value):
    """A value the HParams plugin takes (bool, int, float, str), or None for one it cannot."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
        return ",".join(str(v) for v in value)
    return None


def _flat(prefix: str, settings: dict, skip: tuple = ()) -> dict:
    """``settings`` (nested dicts) as ``{prefix.key.subkey: scalar}``; None and other values that
    are not scalars (or lists of them) are left out."""
    out = {}
    for key, value in settings.items():
        if key in skip:
            continue
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(_flat(name, value))
        elif _scalar(value) is not None:
            out[name] = _scalar(value)
    return out


def suite_preset(suite: dict) -> str:
    """The name of the preset whose attack suite ``suite`` (the JSON form of an
    :class:`~manifold_tf.evaluation.config.AdaptiveConfig`) is, comparing every setting but the
    stopping ones (:data:`_STOPPING`); ``"custom"`` when none is."""
    mine = {k: v for k, v in suite.items() if k not in _STOPPING}
    for name in presets.PRESETS:
        theirs = reporting.to_jsonable(presets.from_preset(name).adaptive)
        if mine == {k: v for k, v in theirs.items() if k not in _STOPPING}:
            return name
    return "custom"


def hparams(summary: dict) -> dict:
    """The hyperparameters of a verdict, from its ``summary.json`` dict: ``shell`` (its kind) and
    ``shell.*`` (its other settings), the threat model (``epsilon`` and, where the shell has them,
    ``delta`` and ``p``; pixels 0..255), ``suite.preset`` (:func:`suite_preset`) and ``suite.*``,
    ``n`` (points evaluated), ``seed``, ``dataset``, ``checkpoint`` (the base model's file name)
    and ``git_commit``, where the summary has them. Values: bool, int, float or str."""
    s = summary["settings"]
    shell = dict(s["shell"])
    out = dict(shell=str(shell.pop("shell")), epsilon=float(s["epsilon"]))
    for key in ("delta", "p"):
        if _scalar(shell.get(key)) is not None:
            out[key] = shell.pop(key)
    out.update(_flat("shell", shell))
    out["suite.preset"] = suite_preset(s["suite"])
    out.update(_flat("suite", s["suite"]))
    out.update(n=int(summary["n"]), seed=int(s["seed"]))
    if s.get("dataset"):
        out["dataset"] = str(s["dataset"])
    if s.get("checkpoint"):
        out["checkpoint"] = os.path.basename(str(s["checkpoint"]))
    if summary.get("git_commit"):
        out["git_commit"] = str(summary["git_commit"])[:12]
    return out


def _number(value) -> float | None:
    try:
        return float(value)  # summary.json holds a non-finite float as a string ("nan")
    except (TypeError, ValueError):
        return None


def metrics(summary: dict) -> dict[str, float]:
    """The metrics of a verdict, from its ``summary.json`` dict, as fractions 0..1 over its ``n``
    points: ``{shell,base}/{robust,clean}_accuracy`` with their 95% interval ends (``_lo``,
    ``_hi``), ``difference/{robust,clean}_accuracy`` (shell minus base on the same points) with
    the paired interval's ends, ``passes_per_point/*`` (forward+backward passes per point),
    ``mcnemar_p_value`` and ``sanity_checks_passed`` (1 or 0)."""
    out = {}
    for who in ("shell", "base"):
        for kind in ("robust_accuracy", "clean_accuracy"):
            lo, hi = summary[who][f"{kind}_ci"]
            out[f"{who}/{kind}"] = summary[who][kind]
            out.update({f"{who}/{kind}_lo": lo, f"{who}/{kind}_hi": hi})
    for kind, d in summary["difference"].items():
        out[f"difference/{kind}"] = d["estimate"]
        out.update({f"difference/{kind}_lo": d["ci_low"], f"difference/{kind}_hi": d["ci_high"]})
    for key, value in summary.get("passes_per_point", {}).items():
        out[f"passes_per_point/{key}"] = value
    out["mcnemar_p_value"] = summary.get("mcnemar_p_value")
    out["sanity_checks_passed"] = summary.get("sanity_checks_passed")
    numbers = {k: _number(v) for k, v in out.items()}
    return {k: v for k, v in numbers.items() if v is not None}


def write_summaries(summary: dict, directory: str) -> str:
    """Writes the HParams session of ``summary`` (a ``summary.json`` dict) and its metrics as
    event files into ``directory``, replacing an earlier set there; returns ``directory``.

    The files are written into a temporary folder beside it first, so an interrupted write leaves
    the earlier set or none, never half of one. Raises ImportError without ``tensorboard``.
    """
    # deferred: tensorboard is an optional package (the `tensorboard` extra); 0.2 s to import.
    from tensorboard.plugins.hparams import api as hp

    values, scores = hparams(summary), metrics(summary)
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}-", dir=parent)
    try:
        writer = tf.summary.create_file_writer(tmp)
        with writer.as_default():
            hp.hparams(values)
            for tag, value in scores.items():
                tf.summary.scalar(tag, value, step=0)
        writer.close()
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}-old-", dir=parent)
            os.replace(directory, old)  # onto an empty directory: a rename
            logging.info("replacing the earlier TensorBoard summaries in %s", directory)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return directory


def write_beside(summary_path: str) -> str | None:
    """The summaries of the ``summary.json`` at ``summary_path``, in :data:`SUBDIR` beside it;
    returns that directory, or None (with a logged warning) when ``tensorboard`` is missing."""
    summary = reporting.read_json(summary_path)
    directory = os.path.join(os.path.dirname(os.path.abspath(summary_path)), SUBDIR)
    try:
        return write_summaries(summary, directory)
    except ImportError as e:
        logging.warning(
            "no TensorBoard summaries written for %s (%s): pip install 'manifold-tf[tensorboard]' "
            "or tensorboard, then python -m manifold_tf.cli.summaries %s",
            summary_path,
            e,
            summary_path,
        )
        return None
