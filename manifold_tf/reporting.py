"""Reports: atomic JSON/Markdown/PNG writers, output directories that never clobber, progress lines.

Nothing a user wrote is overwritten silently: :func:`prepare_output_dir` refuses a non-empty
directory unless the caller resumes or overwrites, and every file is written to a temporary name in
the same directory and then renamed, so a killed run leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

LOCK_FILE = ".lock"  # a run directory's lock (manifold_tf.evaluation.store.acquire_lock)


class WriteError(OSError):
    """Writing a file failed (disk full, read-only directory, ...); the path is named and the
    previous complete file, if any, is untouched. ``errno`` is the underlying error's."""


def _write_error(path: str, e: OSError, note: str = "") -> WriteError:
    reason = os.strerror(e.errno) if e.errno else str(e)
    error = WriteError(
        f"cannot write {path}: {reason}{note}. Free space or fix the directory's "
        f"permissions, then run again with --resume."
    )
    error.errno = e.errno
    return error


def _atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, syncs it, then renames it over ``path``.

    A failure at any step (ENOSPC, EROFS, EACCES, a signal) removes the temporary file and leaves
    the previous ``path`` as it was; an ``OSError`` is re-raised as :class:`WriteError` naming
    ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        kept = " (the previous version is kept)" if os.path.exists(path) else ""
        raise _write_error(path, e, kept) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def to_jsonable(obj: Any) -> Any:
    """``obj`` as ``json.dump`` can write it: dataclasses as dicts, keys as strings, tuples as
    lists, tensors and numpy values as Python ones, non-finite floats as strings (the run store
    compares settings in this form)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "numpy"):  # tf.Tensor
        obj = obj.numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (UTF-8)."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically; numpy/TF values are converted."""
    write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_array(path: str, array: np.ndarray) -> None:
    """Writes ``array`` as a ``.npy`` file, atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    _atomic_write_bytes(path, buf.getvalue())


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pyplot(*, agg: bool = True):
    """``matplotlib.pyplot``, on the non-interactive Agg backend unless ``agg=False``.

    The figures of a run are only saved as PNG files, so they need no display.
    """
    # deferred: matplotlib takes about a second to import; only the figures need it.
    import matplotlib

    if agg:
        matplotlib.use("Agg")
    # deferred: as above (and pyplot must come after the backend is chosen).
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Saves a matplotlib figure as PNG (``dpi`` dots per inch) atomically and closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    # The backend stays whatever the figure was drawn with (a caller's figure on its own backend).
    pyplot(agg=False).close(fig)
    _atomic_write_bytes(path, buf.getvalue())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats are shown with 4 significant digits."""

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def prepare_output_dir(path: str, *, overwrite: bool = False, resume: bool = False) -> str:
    """Creates ``path`` or checks that it may be used.

    A non-empty directory is accepted only with ``resume`` (its contents are kept, to continue) or
    ``overwrite`` (its files are replaced as the run writes new ones). Raises ``FileExistsError``
    otherwise, naming the two flags. The directory's lock file (:data:`LOCK_FILE`) does not count
    as content.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"output path {path!r} exists and is not a directory.")
    # The lock of a run that is gone is not content: a stale lock is taken over, not "a run".
    content = [n for n in os.listdir(path) if n != LOCK_FILE] if os.path.isdir(path) else []
    if content and not (overwrite or resume):
        raise FileExistsError(
            f"output directory {path!r} is not empty: pass --resume to continue the run it holds, "
            f"or --overwrite to replace it, or choose another directory."
        )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e) from e
    return path


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Prints ``desc: done/total unit (pct), rate, elapsed, ETA`` lines to stderr.

    ``initial`` counts work already done by an earlier run (resume): it is shown in the counts
    but excluded from the rate.
    """

    def __init__(self, total: int, desc: str, unit: str = "items", initial: int = 0, stream=None):
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.done = int(initial)
        self._initial = int(initial)
        self._start = time.perf_counter()
        self._stream = stream if stream is not None else sys.stderr

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self._start
        new = self.done - self._initial
        return new / elapsed if elapsed > 0 and new > 0 else float("nan")

    def eta(self) -> float:
        rate = self.rate
        return (self.total - self.done) / rate if rate and math.isfinite(rate) else float("inf")

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = self.rate
        rate_s = f"{rate:.3g} {self.unit}/s" if math.isfinite(rate) else f"? {self.unit}/s"
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate_s}, "
            f"elapsed {format_duration(elapsed)}, ETA {format_duration(self.eta())}"
        )

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += int(n)
        print(self.line() + (f", {extra}" if extra else ""), file=self._stream, flush=True)


def plot_separation_curve(
    curves: dict,
    path: str,
    *,
    p: float | None = None,
    title: str = "",
    reference: dict | None = None,
) -> None:
    """Plots ``s_p`` (fraction of points with a wrong label of confidence ``>= p``) vs ``p``.

    ``curves`` maps a model name to the ``curve`` dict of ``separation.summarize`` (lists ``p``,
    ``fraction``, ``ci_low``, ``ci_high``); each is drawn with its confidence band. ``p`` draws a
    vertical line at the reported threshold; ``reference`` maps a name to a fraction at ``p`` (e.g.
    the paper's Table 1) drawn as a marker. Saved as PNG with :func:`save_figure`.
    """
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in curves.items():
        (line,) = ax.plot(curve["p"], curve["fraction"], label=name)
        ax.fill_between(
            curve["p"],
            curve["ci_low"],
            curve["ci_high"],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    if p is not None:
        ax.axvline(p, color="grey", linestyle=":", linewidth=1)
        for name, value in (reference or {}).items():
            ax.plot([p], [value], marker="x", linestyle="none", label=name)
    ax.set_xlabel("p (wrong-label confidence threshold)")
    ax.set_ylabel("s_p (fraction of points attacked)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def plot_failure_cases(
    cases: Sequence[dict], path: str, *, class_names=None, title: str = ""
) -> None:
    """Draws the defence evaluation's failure cases, one row each, and saves a PNG.

    Each case is a dict with ``x`` and ``x_adv`` (``[32, 32, 3]`` pixels 0..255), ``label`` (true),
    ``shell_clean``/``shell_adv`` (the shell's labels on ``x`` and ``x'``) and optionally their
    ``*_confidence``, ``base_adv`` (the base's label on ``x'``), ``category`` and ``index``. A row
    shows ``x``, ``x'`` and ``|x' - x|`` (scaled to its maximum). With no cases the figure says so.
    """
    plt = pyplot()

    def name(label) -> str:
        return str(class_names[int(label)]) if class_names is not None else str(int(label))

    if not cases:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no failure cases", ha="center", va="center")
        if title:
            ax.set_title(title, fontsize=9)
        save_figure(fig, path)
        return
    fig, axes = plt.subplots(len(cases), 3, figsize=(7.5, 2.3 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        x = np.asarray(case["x"], np.float64)
        x_adv = np.asarray(case["x_adv"], np.float64)
        diff = np.abs(x_adv - x)
        conf_c = case.get("shell_clean_confidence")
        conf_a = case.get("shell_adv_confidence")
        row[0].imshow(np.clip(x / 255.0, 0, 1))
        row[0].set_title(
            f"x (#{case.get('index', '?')}), true {name(case['label'])}\n"
            f"shell: {name(case['shell_clean'])}"
            + (f" ({conf_c:.2f})" if conf_c is not None else ""),
            fontsize=8,
        )
        row[1].imshow(np.clip(x_adv / 255.0, 0, 1))
        base = f"base: {name(case['base_adv'])}, " if "base_adv" in case else ""
        row[1].set_title(
            f"x' (L-inf {diff.max():.1f} px)\n{base}shell: {name(case['shell_adv'])}"
            + (f" ({conf_a:.2f})" if conf_a is not None else ""),
            fontsize=8,
        )
        row[2].imshow(diff.max(-1) / max(diff.max(), 1e-12), cmap="gray", vmin=0, vmax=1)
        row[2].set_title(f"|x' - x| (scaled)\n{case.get('category', '')}", fontsize=8)
        for ax in row:
            ax.axis("off")
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))  # room for the title above two-line titles
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    save_figure(fig, path)
