"""A comparison of defences, rendered: each defence's own verdict reports in its folder, then
``comparison.json``, ``comparison.md`` and ``comparison.png`` at the top of the run.

Reads the :class:`~manifold_tf.evaluation.compare.Comparison` (records only; runs no attack).
Every number of the comparison is taken from the verdict each defence's ``summary.json`` is
written from, so the two agree. Cost: base forward+backward passes (a shell prediction counts its
whole search); the base's suite ran once for all the defences and is counted once here, while each
defence's ledger counts it as a single-shell run would (and says so).
"""

from __future__ import annotations

import numpy as np

from manifold_tf import reporting
from manifold_tf.evaluation import adaptive_report
from manifold_tf.evaluation.compare import Comparison
from manifold_tf.evaluation.stats import format_paired_difference, format_proportion


def base_cost(base_records: list[dict]) -> dict:
    """The base's suite, once: its passes (CW's x' beside them, as in the ledger)."""
    n = sum(len(r["indices"]) for r in base_records)
    passes = int(sum(r["base_passes"] for r in base_records))
    cw = np.concatenate([np.asarray(r["cw_iterations"], np.int64) for r in base_records] or [[]])
    return dict(
        passes=passes,
        passes_per_point=passes / n if n else None,
        cw_passes=int(cw[cw >= 0].sum()),
        seconds=float(sum(r["seconds"]["total"] for r in base_records)),
    )


def _defence(kind: str, verdict: dict, records: list[dict], base: dict, per_prediction: int):
    n = verdict["n"]
    total = int(sum(r["cost"]["base_passes"] for r in records))
    predictions = int(sum(r["cost"]["shell_predictions"] for r in records))
    own = total - base["passes"]  # the shell's suite and its checks: the verdict less the base's
    d = verdict["difference"]
    return dict(
        kind=kind,
        summary=f"{kind}/summary.json",
        clean=verdict["shell"]["clean"],
        robust=verdict["shell"]["robust"],
        difference=dict(robust_accuracy=d["robust_accuracy"], clean_accuracy=d["clean_accuracy"]),
        mcnemar_p_value=verdict["mcnemar"]["p_value"],
        sanity_checks_passed=verdict["sanity"]["passed"],
        sanity_failures=verdict["sanity"]["failures"],
        sanity_checks_run=[
            c for c, v in verdict["sanity"].items() if isinstance(v, dict) and "passed" in v
        ],
        suite_warnings=verdict["flags"],
        cost=dict(
            passes_per_prediction=per_prediction,
            shell_suite_passes=own,
            shell_suite_passes_per_point=own / n if n else None,
            shell_predictions_per_point=predictions / n if n else None,
            verdict_passes_per_point=total / n if n else None,
        ),
    )


def comparison_report(comparison: Comparison, verdicts: dict) -> dict:
    """``comparison.json``: the base's accuracies, each defence's paired differences against it
    (shell minus base, same points), accuracies and cost, and the cost of the whole comparison
    with the base's suite counted once. ``verdicts``: kind -> the verdict its summary holds."""
    kinds = list(comparison.runs)
    first = verdicts[kinds[0]]
    base = base_cost(comparison.base_records)
    defences = {
        k: _defence(
            k,
            verdicts[k],
            comparison.runs[k].records,
            base,
            comparison.passes_per_prediction[k],
        )
        for k in kinds
    }
    total = base["passes"] + sum(d["cost"]["shell_suite_passes"] for d in defences.values())
    n = first["n"]
    return dict(
        n=n,
        kinds=kinds,
        epsilon_pixels=comparison.settings["epsilon"],
        paired_interval=first["difference"]["robust_accuracy"]["interval"],
        stopping=comparison.stopping,
        base=dict(
            clean=first["base"]["clean"],
            robust=first["base"]["robust"],
            by_attack=first["base"]["by_attack"],
            cost=dict(
                base,
                note=f"the base's suite ran once on these {n} points for all {len(kinds)} "
                f"defences: counted once here (each defence's ledger counts it as a "
                f"single-shell run would)",
            ),
        ),
        defences=defences,
        cost=dict(
            total_passes=total,
            passes_per_point=total / n if n else None,
            separate_runs_passes=total + (len(kinds) - 1) * base["passes"],
            note="base forward+backward passes; a shell prediction counts its whole search; "
            "CW's x' (cw_passes) beside the total, as in the ledgers",
        ),
        settings=comparison.settings,
    )


def shared_note(comparison: Comparison, kind: str) -> dict:
    """What each defence's ledger says about the base's suite it shares."""
    base = base_cost(comparison.base_records)
    others = [k for k in comparison.runs if k != kind]
    return dict(
        shared_with=others,
        passes=base["passes"],
        passes_per_point=base["passes_per_point"],
        note=f"The base's suite ({base['passes']:,} passes, CW's x' beside them) ran once on "
        f"these points for this defence and {', '.join(others)}: this ledger counts it as a "
        f"single-shell run would; ../comparison.json counts it once.",
    )


def _pp(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _sanity(d: dict) -> str:
    verdict = (
        "passed" if d["sanity_checks_passed"] else "FAILED: " + ", ".join(d["sanity_failures"])
    )
    run = d.get("sanity_checks_run")
    return verdict if run is None or len(run) > 1 else f"{verdict} ({', '.join(run)} only so far)"


def comparison_markdown(report: dict) -> str:
    base, cost = report["base"], report["cost"]
    rows = []
    for k, d in report["defences"].items():
        dr, dc, c = d["difference"]["robust_accuracy"], d["difference"]["clean_accuracy"], d["cost"]
        rows.append(
            [
                f"`{k}`",
                format_proportion(d["robust"]),
                format_proportion(d["clean"]),
                format_paired_difference(dr),
                format_paired_difference(dc),
                f"{d['mcnemar_p_value']:.3g}",
                c["passes_per_prediction"],
                _pp(c["shell_suite_passes_per_point"]),
                _sanity(d),
            ]
        )
    headers = [
        "defence",
        "robust",
        "clean",
        "robust, shell minus base",
        "clean, shell minus base",
        "McNemar p",
        "passes per prediction",
        "passes per point (its suite)",
        "sanity checks",
    ]
    warnings = [
        f"- `{k}`: **warning ({w['kind']})**: {w['note']}\n"
        for k, d in report["defences"].items()
        for w in d["suite_warnings"]
    ]
    return (
        f"# Defences compared on the same points (n = {report['n']}, L-inf epsilon "
        f"{report['epsilon_pixels']:g} px)\n\n"
        f"Base alone: robust {format_proportion(base['robust'])}, clean "
        f"{format_proportion(base['clean'])}; its suite {_pp(base['cost']['passes_per_point'])} "
        f"passes per point, run once for every defence.\n\n"
        + reporting.markdown_table(headers, rows)
        + f"\nDifferences are paired (shell minus base on the same points), "
        f"{report['paired_interval']}; robust accuracies are upper bounds (attacks give lower "
        f"bounds on vulnerability). Stopped: {report['stopping']['reason']} (rule: "
        f"{report['stopping']['rule']}).\n\n"
        + "".join(warnings)
        + ("\n" if warnings else "")
        + f"Cost: {cost['total_passes']:,} passes in all ({_pp(cost['passes_per_point'])} per "
        f"point), the base's suite counted once ({base['cost']['passes']:,}); separate "
        f"single-shell runs would have spent {cost['separate_runs_passes']:,}. CW's x' on the "
        f"base: {base['cost']['cw_passes']:,} passes beside the total. Passes: base "
        f"forward+backward passes, a shell prediction counting its whole search.\n\n"
        + table2_markdown(report.get("table2") or {})
        + "\nEach defence's verdict: `<kind>/adaptive.md`, `<kind>/summary.json`; Table 2: "
        "`<kind>/defence.md`. Figure: `comparison.png`.\n"
    )


def plot_comparison(report: dict, path: str) -> None:
    """Robust and clean differences (shell minus base, paired 95% intervals) per defence, and its
    cost: passes per prediction and its suite's passes per point (log scale). A PNG."""
    plt = reporting.pyplot()
    kinds = report["kinds"]
    rows = np.arange(len(kinds))[::-1]
    colors = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    fig, axes = plt.subplots(
        1,
        3,
        figsize=(13, 1.6 + 0.6 * len(kinds)),
        sharey=True,
        gridspec_kw=dict(wspace=0.08),
        layout="constrained",
    )
    for ax, key, title in (
        (axes[0], "robust_accuracy", "robust accuracy, shell minus base"),
        (axes[1], "clean_accuracy", "clean accuracy, shell minus base"),
    ):
        for row, k in zip(rows, kinds, strict=True):
            d = report["defences"][k]["difference"][key]
            est, low, high = (100 * d[f] for f in ("estimate", "ci_low", "ci_high"))
            ax.errorbar(
                [est], [row], xerr=[[est - low], [high - est]], fmt="o", capsize=4, color=colors[k]
            )
            ax.annotate(
                f"{est:+.1f} ({low:+.1f} to {high:+.1f}); +{d['shell_only']} / -{d['base_only']}",
                (est, row),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=7,
            )
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"points (n = {report['n']}, paired 95% interval)", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    ax = axes[2]
    for row, k in zip(rows, kinds, strict=True):
        c = report["defences"][k]["cost"]
        for shift, value, hatch in (
            (0.18, c["passes_per_prediction"], ""),
            (-0.18, c["shell_suite_passes_per_point"] or 0, "//"),
        ):
            ax.barh(row + shift, max(value, 0.1), 0.34, color=colors[k], hatch=hatch, alpha=0.8)
            ax.annotate(
                f"{value:,.0f}",
                (max(value, 0.1), row + shift),
                textcoords="offset points",
                xytext=(3, -3),
                fontsize=7,
            )
    base_point = report["base"]["cost"]["passes_per_point"]
    if base_point:
        ax.axvline(base_point, color="black", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_title(
        "cost (base passes): per prediction (plain), per point of its suite (hatched);\n"
        "dashed: the base's suite per point, run once for all",
        fontsize=8,
    )
    ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(rows, kinds)
    axes[0].set_ylim(-0.7, len(kinds) - 0.3)
    fig.suptitle(
        f"{len(kinds)} defences against the base on the same n = {report['n']} points "
        f"(L-inf eps {report['epsilon_pixels']:g} px)",
        fontsize=10,
    )
    reporting.save_figure(fig, path)


def table2_rows(table2: dict) -> dict:
    """Table 2's averages per defence (kind -> its ``defence.json`` report): the transfer
    protocol, on the base-correct points of the comparison's."""
    keys = ("points", "base_successes", "shell_successes", "retained", "new_vulnerabilities")
    return {k: {f: r["average"][f] for f in keys} for k, r in table2.items()}


def table2_markdown(rows: dict) -> str:
    if not rows:
        return ""
    body = [
        [f"`{k}`", r["points"], r["base_successes"], r["shell_successes"], r["retained"]]
        for k, r in rows.items()
    ]
    return (
        "\nTable 2 (the paper's transfer protocol: CW's x' on the base, computed once, given to "
        "each shell; not the verdict):\n\n"
        + reporting.markdown_table(
            ["defence", "points", "base attack successes", "shell attack successes", "retained"],
            body,
        )
    )


def write_comparison(
    comparison: Comparison, images, store, *, class_names=None, table2: dict | None = None
) -> dict:
    """Each defence's reports in its folder (``<kind>/summary.json``, ``adaptive.md`` ...,
    :func:`~manifold_tf.evaluation.adaptive_report.write_adaptive_report`), then
    ``comparison.json``/``.md`` and ``comparison.png``; returns the comparison report.
    ``table2``: kind -> its Table-2 report (``defence.json``), summarised beside the verdicts."""
    verdicts = {}
    for k, run in comparison.runs.items():
        report = adaptive_report.write_adaptive_report(
            run,
            images,
            store.sub(k),
            class_names=class_names,
            shared_base=shared_note(comparison, k),
        )
        verdicts[k] = report["verdict"]
    report = comparison_report(comparison, verdicts)
    report["table2"] = table2_rows(table2 or {})
    store.write_report("comparison", report, comparison_markdown(report))
    plot_comparison(report, store.path("comparison.png"))
    return report


def comparison_of(comparison: Comparison) -> dict:
    """The comparison report of ``comparison`` without writing anything (each defence's verdict
    summarised in memory): for a run read with
    :func:`~manifold_tf.evaluation.compare.read_comparison`."""
    verdicts = {
        k: adaptive_report.summarize(run.records, run.settings, run.sanity, run.stopping)
        for k, run in comparison.runs.items()
    }
    return comparison_report(comparison, verdicts)
