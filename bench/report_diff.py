"""Are two runs' JSON reports the same, timings and paths aside? A check for a change that must not
change behaviour (a restructuring): run the same command on the commit before and after, then

    python -m bench.report_diff RUN_BEFORE RUN_AFTER

It compares every ``*.json`` file under both output directories (same relative paths), value by
value, skipping keys that hold times, durations, rates, dates, hosts, paths and versions
(:data:`VOLATILE`), and prints each difference with its key path. Exit status 1 when a file is
missing on one side or any value differs; 0 when the reports agree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

# Keys whose values change from run to run without the behaviour changing.
VOLATILE = re.compile(
    r"(seconds|duration|elapsed|time|rate|per_second|per_minute|date|started|finished|host|"
    r"machine|platform|python|tensorflow|keras|version|path|dir|file|command|argv|pid|eta|"
    r"git|commit|checkout|cwd|created|updated|throughput|images_per_s)",
    re.IGNORECASE,
)


def _files(root: str) -> set[str]:
    out = set()
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".json"):
                out.add(os.path.relpath(os.path.join(folder, name), root))
    return out


def diff(a, b, where: str = "", *, tol: float = 0.0) -> list[str]:
    """The differences between two JSON values, as ``"key.path: a != b"`` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if VOLATILE.search(str(key)):
                continue
            path = f"{where}.{key}" if where else str(key)
            if key not in a or key not in b:
                out.append(f"{path}: only in {'after' if key not in a else 'before'}")
                continue
            out += diff(a[key], b[key], path, tol=tol)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        out = []
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            out += diff(u, v, f"{where}[{i}]", tol=tol)
        return out
    if isinstance(a, float) and isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol * max(1.0, abs(a))
        return [] if same else [f"{where}: {a!r} != {b!r}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--tol", type=float, default=0.0, help="relative tolerance of floats")
    args = parser.parse_args(argv)
    left, right = _files(args.before), _files(args.after)
    problems = [f"{f}: only in {args.before}" for f in sorted(left - right)]
    problems += [f"{f}: only in {args.after}" for f in sorted(right - left)]
    for name in sorted(left & right):
        with open(os.path.join(args.before, name)) as f:
            a = json.load(f)
        with open(os.path.join(args.after, name)) as f:
            b = json.load(f)
        problems += [f"{name}: {line}" for line in diff(a, b, tol=args.tol)]
    for line in problems:
        print(line)
    print(f"{len(left & right)} JSON files compared, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
