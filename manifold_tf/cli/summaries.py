"""Writes the TensorBoard summaries of verdicts from their ``summary.json`` (runs made before the
verdict wrote them, or without the ``tensorboard`` package)::

  python -m manifold_tf.cli.summaries results/*/summary.json
  tensorboard --logdir results
"""

from __future__ import annotations

import os
import sys

from manifold_tf.evaluation import tensorboard_report


def main(argv: list[str]) -> int:
    """Writes the summaries beside each ``summary.json`` named in ``argv`` (into its run
    directory's ``tensorboard/``); 0 when all were written, 1 when one is missing or tensorboard
    is not installed, 2 without arguments."""
    if not argv or any(a.startswith("-") for a in argv):
        sys.stderr.write("usage: python -m manifold_tf.cli.summaries RUN_DIR/summary.json ...\n")
        return 2
    missing = [p for p in argv if not os.path.isfile(p)]
    if missing:
        sys.stderr.write(f"summaries: error: no such summary.json: {', '.join(missing)}\n")
        return 1
    for path in argv:
        out = tensorboard_report.write_beside(path)
        if out is None:
            return 1
        print(out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
