"""Table 2's report: Markdown (settings, rates per batch, categories, the paper's) and failures.

Renders the records of :func:`manifold_tf.evaluation.defence.run_table2`; the caller
(:mod:`~manifold_tf.evaluation.runner`) calls :func:`write_defence_report`.
"""

from __future__ import annotations

import json

import numpy as np

from manifold_tf import reporting
from manifold_tf.evaluation.defence import (
    CATEGORIES,
    CATEGORY_TITLES,
    PAPER_TABLE2,
    PROBE_STEPS,
    PROTOCOL,
    PROTOCOL_BIAS,
    summarize_defence,
)


def _pct(rate: float, count: int, n: int) -> str:
    return f"{100 * rate:.2f}% ({count}/{n})"


# Settings the report's header already states, left out of its list of the other settings.
_HEADER_SETTINGS = (
    "shell",
    "attack",
    "epsilon",
    "protocol",
    "num_batches",
    "batch_points",
    "seed",
    "permutation",
    "num_test_points",
)


def defence_markdown(report: dict) -> str:
    """The report as Markdown: settings, Table 2 per batch and on average, categories, paper's."""
    return _settings_markdown(report) + f"\n{_table_markdown(report)}\n" + _notes_markdown(report)


def _table_markdown(report: dict) -> str:
    """Table 2: one row per batch and the average (rates with counts, then the categories)."""
    rows = []
    for name, r in [(f"Batch #{i + 1}", r) for i, r in enumerate(report["per_batch"])] + [
        ("Average", report["average"])
    ]:
        n = r["points"]
        rows.append(
            [
                name,
                n,
                _pct(r["base_attack_success"], r["base_successes"], n),
                _pct(r["shell_attack_success"], r["shell_successes"], n),
                _pct(r["retained_accuracy"], r["retained"], n),
                *[r["categories"][c] for c in CATEGORIES],
            ]
        )
    return reporting.markdown_table(
        [
            "",
            "points",
            "base attack success",
            "shell attack success",
            "shell retained accuracy",
            *CATEGORIES,
        ],
        rows,
    )


def _settings_markdown(report: dict) -> str:
    """The title, the caveat, the points and every setting (ends with a newline)."""
    s, avg = report["settings"], report["average"]
    return (
        f"# Defence evaluation (Table 2 protocol): {s['shell']['shell'].upper()} shell\n\n"
        f"**Transfer only, not the verdict.** {PROTOCOL_BIAS}\n\n"
        f"Points: {avg['points']} base-correct test points ("
        + (
            f"those among the first {s['walk']} of the order, in batches of up to "
            f"{s['batch_points']}"
            if "walk" in s
            else f"{s['num_batches']} batches x {s['batch_points']}"
        )
        + f"), {s['permutation']} permutation, seed {s['seed']}, of "
        f"{s['num_test_points']} test images.\n\n"
        f"Settings:\n\n- shell: `{json.dumps(s['shell'])}`\n"
        f"- base attack: CW L-inf, untargeted, epsilon {s['epsilon']:g} px: "
        f"`{json.dumps(s['attack'])}`\n"
        + "".join(f"- {k}: `{v}`\n" for k, v in s.items() if k not in _HEADER_SETTINGS)
    )


def _notes_markdown(report: dict) -> str:
    """What the columns mean, the categories, NCN's fallback count, the paper's figures, time."""
    s, avg, paper = report["settings"], report["average"], PAPER_TABLE2
    cats = "\n".join(f"- `{c}` ({CATEGORY_TITLES[c]}): {avg['categories'][c]}" for c in CATEGORIES)
    unmet = report.get("ncn_unmet")
    unmet_text = (
        f"NCN fallback (no label met p, the most confident label answered): "
        f"{unmet['clean']}/{unmet['points']} points at x, {unmet['adversarial']}/{unmet['points']} "
        f"at x'.\n\n"
        if unmet
        else ""
    )
    return (
        f"Shell attack success: `G(x') != y` and `G(x') != G(x)`. Retained accuracy: `G(x) = y`. "
        f"Base attack success: CW found `x'` with `||x' - x||_inf <= {s['epsilon']:g}` that the "
        f"base misclassifies.\n\nCategories:\n\n{cats}\n- base-robust points the shell made "
        f"inconsistent (new vulnerabilities): {avg['new_vulnerabilities']} (on the base-robust "
        f"points, x' is a PGD-{PROBE_STEPS} probe with the CW margin loss on the base, within "
        f"epsilon)\n\n{unmet_text}"
        f"Paper's Table 2 (wide adv_trained model, full CIFAR-10, CarliniWagnerShell, "
        f"{paper['points']} points): base attack success "
        f"{100 * paper['average']['base_attack_success']:.2f}%, shell attack success "
        f"{100 * paper['average']['shell_attack_success']:.2f}%, retained accuracy "
        f"{100 * paper['average']['retained_accuracy']:.0f}%; categories {paper['categories']}.\n\n"
        f"Time: attack {report['seconds']['attack']:.0f} s, "
        f"shell {report['seconds']['shell']:.0f} s.\n"
    )


def write_defence_report(
    records: list[dict],
    settings: dict,
    images: np.ndarray,
    store,
    *,
    class_names=None,
    max_figure_cases: int = 12,
) -> dict:
    """Assembles ``defence.json``, ``defence.md`` and ``failures.png`` from the batch records."""
    summary = summarize_defence(records)
    report = dict(
        settings=settings,
        per_batch=summary["per_batch"],
        average=summary["average"],
        **({"ncn_unmet": summary["ncn_unmet"]} if "ncn_unmet" in summary else {}),
        paper_table2=PAPER_TABLE2,
        points=[
            dict(
                index=i,
                batch=r["batch"],
                label=r["labels"][k],
                category=r["category"][k],
                base_success=r["base_success"][k],
                base_adv_pred=r["base_adv_pred"][k],
                linf=r["linf"][k],
                shell_clean=r["shell_clean"][k],
                shell_adv=r["shell_adv"][k],
            )
            for r in records
            for k, i in enumerate(r["indices"])
        ],
        seconds=dict(
            attack=sum(r["seconds"]["attack"] for r in records),
            shell=sum(r["seconds"]["shell"] for r in records),
        ),
    )
    store.write_report("defence", report, defence_markdown(report))
    cases = []
    for r in records:
        bad = [
            k for k, c in enumerate(r["category"]) if c in ("wrong_but_robust", "wrong_not_robust")
        ]
        if not bad:
            continue
        x_adv = store.load_array(PROTOCOL, r["batch"], "xadv")
        for k in bad:
            cases.append(
                dict(
                    index=r["indices"][k],
                    x=images[r["indices"][k]],
                    x_adv=x_adv[k],
                    label=r["labels"][k],
                    shell_clean=r["shell_clean"][k],
                    shell_adv=r["shell_adv"][k],
                    shell_clean_confidence=r["shell_clean_confidence"][k],
                    shell_adv_confidence=r["shell_adv_confidence"][k],
                    base_adv=r["base_adv_pred"][k],
                    category=r["category"][k],
                )
            )
    s = report["settings"]
    reporting.plot_failure_cases(
        cases[:max_figure_cases],
        store.path("failures.png"),
        class_names=class_names,
        title=(
            f"{s['shell']['shell'].upper()} shell failures ({len(cases)} of "
            f"{report['average']['points']} points; CW eps {s['epsilon']:g})"
        ),
    )
    return report
