"""The adaptive evaluation's verdict, rendered: statistics, Markdown, ``summary.json``, figures.

Reads the :class:`~manifold_tf.evaluation.adaptive.AdaptiveRun` of the protocol (records, settings,
sanity checks, why the run stopped); runs no attack. A report whose sanity checks failed says so
on its first line.
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata as importlib_metadata

import numpy as np

from manifold_tf import reporting
from manifold_tf.evaluation import random_draws, sequential
from manifold_tf.evaluation.adaptive import PROTOCOL, AdaptiveRun
from manifold_tf.evaluation.adaptive_figures import plot_attack_curve, plot_differences
from manifold_tf.evaluation.ledger import ledger_markdown, plot_ledger, summarize_ledger
from manifold_tf.evaluation.stats import (
    DEFAULT_PAIRED_METHOD,
    DESCRIPTIONS,
    format_paired_difference,
    format_proportion,
    mcnemar_exact,
    paired_difference,
    proportion,
)
from manifold_tf.evaluation.tensorboard_report import write_beside as write_tensorboard


def _cumulative(records: list[dict], key: str, names: list[str]) -> dict:
    """Robust accuracy after each attack in order (a point falls at the attack that broke it)."""
    broken_by = sum((r[key] for r in records), [])
    n = len(broken_by)
    out, fallen = {}, {"clean"}
    for name in names:
        fallen.add(name)
        out[name] = proportion(sum(b not in fallen for b in broken_by), n)
    return out


def paired(shell: np.ndarray, base: np.ndarray, *, anytime: bool, n_total: int, method: str):
    """Shell minus base on the same points, with a paired 95% interval: ``method``'s (a name of
    :data:`~manifold_tf.evaluation.stats.PAIRED_METHODS`) for a fixed design, the confidence
    sequence where the run looked and stopped on the outcomes (its fixed-n interval would not keep
    its coverage)."""
    fixed = paired_difference(shell, base, method=method)
    if not anytime:
        return dict(fixed, interval=f"fixed-n, {DESCRIPTIONS[method]}")
    cs = sequential.decide(shell.astype(float) - base.astype(float), n_total=n_total, margin=0.0)
    return dict(
        fixed,
        ci_low=cs.ci_low,
        ci_high=cs.ci_high,
        method="betting sequence",
        interval="anytime-valid confidence sequence (Waudby-Smith & Ramdas), sampling "
        "without replacement from the test set",
    )


WHITE_BOX_BASE = ("apgd_ce", "apgd_t", "fab_t")


def suite_flags(shell_by: list, shell_names: list, base_by: list, base_names: list) -> list[dict]:
    """AutoAttack-style warnings about each suite: its last attack still broke points (the suite
    may not have converged: a stronger or longer one might break more), or Square broke points
    that every white-box attack before it missed (the gradients may be masked)."""
    out = []
    for who, broken_by, names in (("shell", shell_by, shell_names), ("base", base_by, base_names)):
        if not names:
            continue
        last = names[-1]
        if broken_by.count(last):
            out.append(
                dict(
                    kind="not converged",
                    classifier=who,
                    attack=last,
                    points=broken_by.count(last),
                    note=f"the last attack of the {who}'s suite ({last}) still broke "
                    f"{broken_by.count(last)} point(s): the suite may not have "
                    f"converged",
                )
            )
        if "square" in names and broken_by.count("square"):
            out.append(
                dict(
                    kind="gradient masking",
                    classifier=who,
                    attack="square",
                    points=broken_by.count("square"),
                    note=f"Square broke {broken_by.count('square')} point(s) of the "
                    f"{who} that every gradient attack before it missed",
                )
            )
    return out


def summarize(
    records: list[dict], settings: dict, sanity: dict, stopping: dict | None = None
) -> dict:
    """The verdict of the records: paired differences, accuracies with intervals, McNemar,
    per-attack, cost, and why the run stopped."""
    base_by = sum((r["base_broken_by"] for r in records), [])
    shell_by = sum((r["shell_broken_by"] for r in records), [])
    n = len(base_by)
    base_robust = np.array([b == "" for b in base_by])
    shell_robust = np.array([b == "" for b in shell_by])
    shell_names = list(settings["suite"]["shell_attacks"])
    base_names = records[0].get("base_attacks") or ["transfer_cw"] + sorted(
        {b for b in base_by if b not in ("", "clean", "transfer_cw")}
    )
    cost = {k: sum(r["cost"][k] for r in records) for k in records[0]["cost"]}
    stopping = stopping or dict(rule="points", reason="all planned points were evaluated", n=n)
    # Settings written before paired_interval existed are judged with the default.
    pair = dict(
        anytime=settings["suite"].get("until") == "decided",
        n_total=int(settings.get("num_test_points", n)),
        method=settings["suite"].get("paired_interval", DEFAULT_PAIRED_METHOD),
    )
    shell_clean = np.array([b != "clean" for b in shell_by])
    base_clean = np.array([b != "clean" for b in base_by])
    by_attack = _cumulative(records, "shell_broken_by", shell_names)
    draws = random_draws.summarize(records)  # a random shell: worst of its k runs
    if draws is not None:
        shell_clean, shell_robust = random_draws.outcomes(records)
        by_attack[f"worst of {draws['k']} runs"] = proportion(int(shell_robust.sum()), n)
    return dict(
        n=n,
        difference=dict(
            robust_accuracy=paired(shell_robust, base_robust, **pair),
            clean_accuracy=paired(shell_clean, base_clean, **pair),
        ),
        stopping=stopping,
        base=dict(
            clean=proportion(sum(b != "clean" for b in base_by), n),
            robust=proportion(int(base_robust.sum()), n),
            by_attack=_cumulative(records, "base_broken_by", base_names),
        ),
        shell=dict(
            clean=proportion(int(shell_clean.sum()), n),
            robust=proportion(int(shell_robust.sum()), n),
            by_attack=by_attack,
            broken_by={name: shell_by.count(name) for name in shell_names},
            **({} if draws is None else dict(random_draws=draws)),
        ),
        mcnemar=dict(
            shell_only=int(np.sum(shell_robust & ~base_robust)),
            base_only=int(np.sum(base_robust & ~shell_robust)),
            p_value=mcnemar_exact(
                int(np.sum(shell_robust & ~base_robust)), int(np.sum(base_robust & ~shell_robust))
            ),
        ),
        passes_per_point={k: v / max(n, 1) for k, v in cost.items()},
        ledger=summarize_ledger(records),
        flags=suite_flags(shell_by, shell_names, base_by, base_names),
        seconds=sum(r["seconds"]["total"] for r in records),
        sanity=sanity,
    )


def _git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def summary_json(report: dict) -> dict:
    """``summary.json``, in the spirit of RobustBench's model-info files (stable keys first)."""
    s, v = report["settings"], report["verdict"]
    versions = {}
    for pkg in ("manifold_tf", "tensorflow", "keras", "numpy", "scipy"):
        try:
            versions[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            versions[pkg] = None

    def block(who: dict, extra: dict) -> dict:
        return dict(
            clean_accuracy=who["clean"]["rate"],
            robust_accuracy=who["robust"]["rate"],
            clean_accuracy_ci=[who["clean"]["ci_low"], who["clean"]["ci_high"]],
            robust_accuracy_ci=[who["robust"]["ci_low"], who["robust"]["ci_high"]],
            robust_accuracy_by_attack={k: p["rate"] for k, p in who["by_attack"].items()},
            **extra,
        )

    return dict(
        n=v["n"],
        threat_model=dict(
            norm="Linf",
            epsilon_pixels=s["epsilon"],
            epsilon_fraction=s["epsilon"] / 255.0,
            attacker_knowledge=(
                "white box: the attacker knows the base weights and the shell (delta, optimiser, "
                "steps). Gradients: transfer attacks and lift differentiate the base alone; BPDA "
                "differentiates the base at the shell's own points (identity approximation of the "
                "search); Square uses only the shell's output probabilities."
            ),
        ),
        shell=block(v["shell"], dict(settings=s["shell"], **random_draws.for_summary(v["shell"]))),
        base=block(v["base"], dict(checkpoint=s.get("checkpoint"))),
        difference={
            k: {
                f: d[f]
                for f in (
                    "estimate",
                    "ci_low",
                    "ci_high",
                    "shell_only",
                    "base_only",
                    "n",
                    "method",
                    "interval",
                )
            }
            for k, d in v["difference"].items()
        },
        stopping=v["stopping"],
        mcnemar_p_value=v["mcnemar"]["p_value"],
        sanity_checks_passed=v["sanity"]["passed"],
        sanity_failures=v["sanity"]["failures"],
        suite_warnings=v["flags"],
        passes_per_point=v["passes_per_point"],
        ledger=v.get("ledger"),
        robust_accuracy_note=(
            "robust accuracy is over all n evaluated points (correct at x and at "
            "every attack's x'); attacks give lower bounds on vulnerability, so "
            "robust accuracies are upper bounds on the true ones"
        ),
        settings=s,
        versions=versions,
        git_commit=_git_commit(),
    )


def verdict_lines(v: dict) -> str:
    """The lines the headline prints first: sanity verdict, clean and robust accuracy, McNemar."""
    sanity = (
        "SANITY CHECKS FAILED: " + ", ".join(v["sanity"]["failures"]) + " (the robust accuracy "
        "below is not trustworthy)"
        if not v["sanity"]["passed"]
        else "Sanity checks passed."
    )
    m, d = v["mcnemar"], v["difference"]
    return (
        f"{sanity}\n\n"
        f"- **what the shell changes, robust accuracy (shell minus base, same points): "
        f"{format_paired_difference(d['robust_accuracy'])}**\n"
        f"- what the shell costs, clean accuracy (shell minus base): "
        f"{format_paired_difference(d['clean_accuracy'])}\n"
        f"- stopped: {v['stopping']['reason']} (rule: {v['stopping']['rule']})\n"
        + "".join(f"- **warning ({f['kind']})**: {f['note']}\n" for f in v.get("flags", []))
        + f"- base, clean: {format_proportion(v['base']['clean'])}\n"
        f"- shell, clean: {format_proportion(v['shell']['clean'])}\n"
        f"- **base alone, robust (worst case of its attacks): "
        f"{format_proportion(v['base']['robust'])}**\n"
        f"- **shell, robust (worst case of the adaptive suite): "
        f"{format_proportion(v['shell']['robust'])}**\n"
        f"- shell vs base on the same points: {m['shell_only']} points only the shell survives, "
        f"{m['base_only']} only the base; exact McNemar p = {m['p_value']:.3g}\n"
    )


ATTACK_NOTES = {
    "transfer_cw": "the paper's CW L-inf x' on the base, given to the shell (Table 2's attack)",
    "transfer_confident": "the most confident wrong point of N(x, epsilon) for the base (the "
    "separation search, every wrong label), given to the shell: a high-"
    "confidence transfer, far past the base's boundary",
    "lift": "MCN answers the label that can be made most confident within delta of its input: a "
    "confident point z* of N(x, epsilon + delta) for the base, clipped into N(x, epsilon), "
    "leaves z* within delta of x' (for NCN a heuristic)",
    "bpda": "BPDA with the identity approximation of the shell's search (the base's gradient at "
    "the shell's own points), APGD step schedule, from x, from the CW x' and from random starts",
    "bpda_targeted": "the same, targeted at the shell's top wrong labels, each against the best "
    "other label",
    "square": "Square (Andriushchenko et al. 2020), score-based black box on the shell's "
    "probabilities: no gradients, so it sees through gradient masking",
}


def _shared(v: dict) -> bool:
    return bool(v.get("ledger") and "base_suite_shared" in v["ledger"])


def adaptive_markdown(report: dict) -> str:
    s, v = report["settings"], report["verdict"]
    rows = [
        [name, format_proportion(p), v["shell"]["broken_by"].get(name, 0)]
        for name, p in v["shell"]["by_attack"].items()
    ]
    base_rows = [[name, format_proportion(p)] for name, p in v["base"]["by_attack"].items()]
    checks = v["sanity"]
    check_lines = "".join(
        f"- `{k}`: {'passed' if c['passed'] else 'FAILED'} "
        f"{json.dumps({a: b for a, b in c.items() if a != 'passed'})}\n"
        for k, c in checks.items()
        if isinstance(c, dict) and "passed" in c
    )
    per_point = ", ".join(f"{k} {val:.0f}" for k, val in v["passes_per_point"].items())
    return (
        f"# Adaptive evaluation of the {s['shell']['shell'].upper()} shell: the verdict\n\n"
        + verdict_lines(v)
        + random_draws.markdown(v["shell"].get("random_draws"))
        + f"\nThreat model: L-inf, epsilon {s['epsilon']:g} px ({s['epsilon'] / 255:.4f}); "
        f"n = {v['n']} points, the first of the seeded order (all points, right or wrong at x).\n\n"
        f"Shell robust accuracy after each attack (AutoAttack style: each attack runs on the "
        f"points still standing):\n\n"
        + reporting.markdown_table(
            ["after attack", "shell robust accuracy", "points it broke"], rows
        )
        + "\nBase alone:\n\n"
        + reporting.markdown_table(["after attack", "base robust accuracy"], base_rows)
        + "\nThe attacks on the shell:\n\n"
        + "".join(f"- `{name}`: {ATTACK_NOTES.get(name, '')}\n" for name in v["shell"]["by_attack"])
        + f"\nSanity checks:\n\n{check_lines}\nCost per point: {per_point} (base passes include "
        f"the shell's own search: shell predictions x its passes per prediction). Time: "
        f"{v['seconds']:.0f} s.\n\nCost ledger (every attack of both suites; figure "
        f"`adaptive_ledger.png`):\n\n{ledger_markdown(v.get('ledger'))}\n"
        + (f"{v['ledger']['base_suite_shared']['note']}\n\n" if _shared(v) else "")
        + f"Suite settings: `{json.dumps(s['suite'])}`\n"
    )


def write_adaptive_report(
    run: AdaptiveRun,
    images,
    store,
    *,
    class_names=None,
    max_figure_cases: int = 12,
    shared_base: dict | None = None,
) -> dict:
    """``adaptive.json``/``.md``, ``summary.json``, ``adaptive_failures.png``,
    ``adaptive_attacks.png``, ``adaptive_difference.png``, ``adaptive_ledger.png``.

    ``shared_base``: in a comparison of shells, how the base's suite was shared (its ``note``
    says so in the ledger of ``summary.json`` and ``adaptive.md``)."""
    records, settings = run.records, run.settings
    verdict = summarize(records, settings, run.sanity, run.stopping)
    if shared_base is not None and verdict["ledger"] is not None:
        verdict["ledger"]["base_suite_shared"] = shared_base
    fractions = verdict["shell"].get("random_draws", {}).get("points", {})
    report = dict(
        settings=settings,
        verdict=verdict,
        points=[
            dict(
                index=i,
                label=r["labels"][k],
                base_broken_by=r["base_broken_by"][k],
                shell_broken_by=r["shell_broken_by"][k],
                linf=r["linf"][k],
                **({"shell_runs_right": fractions[i]} if i in fractions else {}),
            )
            for r in records
            for k, i in enumerate(r["indices"])
        ],
    )
    store.write_report("adaptive", report, adaptive_markdown(report))
    reporting.write_json(store.path("summary.json"), summary_json(report))
    write_tensorboard(store.path("summary.json"))  # a logged warning without tensorboard
    cases = []
    for r in records:
        hits = [k for k, b in enumerate(r["shell_broken_by"]) if b not in ("", "clean")]
        if hits:
            x_adv = store.load_array(PROTOCOL, r["batch"], "xadv")
            for k in hits:
                i = r["indices"][k]
                cases.append(
                    dict(
                        index=i,
                        x=images[i],
                        x_adv=x_adv[k],
                        label=r["labels"][k],
                        shell_clean=r["shell_clean"][k],
                        shell_adv=r["shell_adv"][k],
                        category=f"broken by {r['shell_broken_by'][k]}",
                    )
                )
    reporting.plot_failure_cases(
        cases[:max_figure_cases],
        store.path("adaptive_failures.png"),
        class_names=class_names,
        title=(
            f"{settings['shell']['shell'].upper()} shell broken by the suite: {len(cases)} of "
            f"{verdict['n']} points (eps {settings['epsilon']:g})"
        ),
    )
    plot_attack_curve(verdict, store.path("adaptive_attacks.png"))
    plot_differences(verdict, store.path("adaptive_difference.png"))
    if verdict["ledger"] is not None:
        plot_ledger(verdict["ledger"], store.path("adaptive_ledger.png"))
    return report
