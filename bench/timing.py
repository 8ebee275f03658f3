"""The timing and reporting every benchmark shares.

Timings are wall-clock seconds per call after untimed warm-up calls (tracing, XLA compilation).
:func:`time_calls` interleaves several variants repeat by repeat, so a load that comes and goes on
a shared machine slows every variant alike instead of whichever happened to run at the time; the
median is the robust figure, the minimum the least disturbed one. A thunk should wait for its
result (``.numpy()``) so that the wall time covers the whole computation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from manifold_tf import reporting

RESULTS_DIR = os.path.join("bench", "results")


def default_output(name: str) -> str:
    """``bench/results/<name>.json``, relative to the working directory (the repository root)."""
    return os.path.join(RESULTS_DIR, f"{name}.json")


def time_calls(
    thunks: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, iters: int = 1
) -> dict[str, dict]:
    """Times several thunks, taking turns within each repeat.

    Args:
      thunks: name -> a function of no arguments.
      repeats: timed repeats; each runs every thunk ``iters`` times in a row.
      warmup: untimed calls of each thunk first.
      iters: calls per timed repeat; a repeat's time is their mean.

    Returns:
      name -> ``{"median_s", "min_s", "times_s" (per repeat), "result" (the last call's value)}``,
      all in seconds per call.
    """
    if repeats < 1 or warmup < 0 or iters < 1:
        raise ValueError(
            f"need repeats >= 1, warmup >= 0, iters >= 1; got {repeats}, {warmup}, {iters}."
        )
    results = {name: None for name in thunks}
    for name, fn in thunks.items():
        for _ in range(warmup):
            results[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in thunks}
    for _ in range(repeats):
        for name, fn in thunks.items():
            start = time.perf_counter()
            for _ in range(iters):
                results[name] = fn()
            times[name].append((time.perf_counter() - start) / iters)
    return {
        name: dict(
            median_s=float(np.median(t)), min_s=float(np.min(t)), times_s=t, result=results[name]
        )
        for name, t in times.items()
    }


def time_call(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, iters: int = 1) -> dict:
    """:func:`time_calls` for one thunk: ``{"median_s", "min_s", "times_s", "result"}``."""
    return time_calls({"fn": fn}, repeats=repeats, warmup=warmup, iters=iters)["fn"]


def write_results(
    path: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Prints ``rows`` as a Markdown table and writes them as JSON, atomically.

    Args:
      path: the JSON file (its folder is created).
      rows: one mapping per table row; JSON-ready values (numpy and TF values are converted);
        floats are shown with 4 significant digits, a missing or ``None`` value as an empty cell.
      columns: the table's columns, in order (default: every key, in first-seen order). The JSON
        keeps every key of every row.
      extra: more top-level JSON fields (settings, per-variant details, load average, ...).

    Returns:
      The Markdown table; the JSON is ``{**extra, "rows": rows, "table": table}``.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [["" if row.get(c) is None else row[c] for c in columns] for row in rows]
    table = reporting.markdown_table(list(columns), cells)
    print(table)
    reporting.write_json(path, {**(extra or {}), "rows": [dict(r) for r in rows], "table": table})
    print(f"wrote {path}")
    return table
