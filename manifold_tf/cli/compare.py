"""Prints the comparison of defences a run directory holds, as far as it got (read only, so a run
still going may be read)::

  python -m manifold_tf.cli.compare /work/runs/compare100 [--figure=comparison_now.png]
"""

from __future__ import annotations

import sys

from manifold_tf.evaluation import compare, compare_report


def main(argv: list[str]) -> int:
    """Prints ``comparison.md`` of the finished batches of the run in ``argv[0]``; with
    ``--figure=PATH`` also draws its figure there. 0 on success, 1 on an error, 2 on bad usage."""
    figure = [a.split("=", 1)[1] for a in argv if a.startswith("--figure=")]
    rest = [a for a in argv if not a.startswith("--figure=")]
    if len(rest) != 1 or rest[0].startswith("-"):
        sys.stderr.write("usage: python -m manifold_tf.cli.compare RUN_DIR [--figure=PATH]\n")
        return 2
    try:
        report = compare_report.comparison_of(compare.read_comparison(rest[0]))
        if figure:
            compare_report.plot_comparison(report, figure[0])
    except (ValueError, OSError) as e:
        sys.stderr.write(f"compare: error: {e}\n")
        return 1
    print(compare_report.comparison_markdown(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
