"""The verdict's cost ledger: what every attack of both suites spent, and what it broke.

The unit is the base model's forward+backward pass on one image; a shell prediction costs the
shell's :meth:`passes_per_prediction` passes (its whole search). Per batch, :func:`batch_ledger`
keeps for every attack the passes it spent on each point (its own passes, its shell predictions
and the fresh shell prediction that verifies each of its ``x'``), plus the shell's answer at ``x``
(``shell_checks``), so that the record's ``cost["base_passes"]`` is the sum of the ledger. CW's
transfer ``x'`` is kept beside it (``cw``): Table 2 shares it, and ``base_passes`` leaves it out.

:func:`summarize_ledger` adds the batches up (attempted and broken points from the records'
``*_broken_by``), :func:`ledger_markdown` renders the table and :func:`plot_ledger` the figure of
points broken against cumulative passes.
"""

from __future__ import annotations

import numpy as np

from manifold_tf import reporting

SUITES = ("base", "shell")
CHECKS = "shell_checks"  # the shell at x (and a random shell's extra draws)


def attempted_masks(broken_by, names) -> dict:
    """Per attack, ``[N]`` bool: the points still standing when it ran (points broken before the
    first attack, e.g. ``"clean"``, none of them)."""
    broken_by = np.asarray(broken_by, object)
    out, fallen = {}, broken_by != ""
    fallen &= ~np.isin(broken_by, list(names))
    for name in names:
        out[name] = ~fallen
        fallen = fallen | (broken_by == name)
    return out


def batch_ledger(
    base_run, shell_run, *, per_prediction: int, shell_checks, cw_iterations, verified=None
) -> dict:
    """One batch's ledger (JSON-ready): ``{"base": {attack: [N] passes}, "shell": {...},
    "shell_checks": [N] passes, "cw": [N] CW iterations (-1: taken from a Table-2 record),
    "per_prediction": passes of one shell prediction}``.

    ``base_run``/``shell_run``: the :class:`~manifold_tf.attacks.Suite` of each suite;
    ``shell_checks``: ``[N]`` shell predictions outside the attacks. ``verified``: per shell
    attack, ``[N]`` the fresh predictions that verified its ``x'`` (the caller's ``verify``); by
    default one per point it ran on.
    """
    shell_tried = verified or attempted_masks(shell_run.broken_by, list(shell_run.step_cost))
    base = {k: c["base_passes"].tolist() for k, c in base_run.step_cost.items()}
    shell = {
        k: (
            c["base_passes"] + (c["shell_predictions"] + shell_tried[k]) * int(per_prediction)
        ).tolist()
        for k, c in shell_run.step_cost.items()
    }
    checks = (np.asarray(shell_checks, np.int64) * int(per_prediction)).tolist()
    return dict(
        base=base,
        shell=shell,
        shell_checks=checks,
        cw=np.asarray(cw_iterations).tolist(),
        per_prediction=int(per_prediction),
    )


def _rows(records: list[dict], suite: str, total: float) -> list[dict]:
    names = list(dict.fromkeys(k for r in records for k in r["ledger"][suite]))
    rows = {k: dict(attack=k, attempted=0, broken=0, passes=0) for k in names}
    for r in records:
        broken_by = r[f"{suite}_broken_by"]
        tried = attempted_masks(broken_by, list(r["ledger"][suite]))
        for k, passes in r["ledger"][suite].items():
            rows[k]["attempted"] += int(tried[k].sum())
            rows[k]["broken"] += broken_by.count(k)
            rows[k]["passes"] += int(np.sum(passes))
    for row in rows.values():
        row["passes_per_attempted_point"] = (
            row["passes"] / row["attempted"] if row["attempted"] else None
        )
        row["share"] = row["passes"] / total if total else None
    return list(rows.values())


def summarize_ledger(records: list[dict]) -> dict | None:
    """The ledger of the run (None if a record predates it): per suite a row per attack
    (``attack, attempted, broken, passes, passes_per_attempted_point, share`` of the total),
    the shell's checks, CW's own cost, and the totals (``total_passes`` is the records' summed
    ``cost["base_passes"]``)."""
    if not records or any("ledger" not in r for r in records):
        return None
    n = sum(len(r["indices"]) for r in records)
    checks = int(sum(np.sum(r["ledger"][CHECKS]) for r in records))
    by_suite = {
        s: int(sum(np.sum(v) for r in records for v in r["ledger"][s].values())) for s in SUITES
    }
    total = checks + sum(by_suite.values())
    cw = np.concatenate([np.asarray(r["ledger"]["cw"], np.int64) for r in records])
    known = cw[cw >= 0]
    return dict(
        n=n,
        total_passes=total,
        passes_per_point=total / n if n else None,
        suites={s: _rows(records, s, total) for s in SUITES},
        suite_passes=by_suite,
        shell_checks=dict(passes=checks, share=checks / total if total else None),
        clean_broken={s: sum(r[f"{s}_broken_by"].count("clean") for r in records) for s in SUITES},
        cw=dict(
            passes=int(known.sum()),
            points=int(known.size),
            from_table2=int(cw.size - known.size),
            passes_per_point=float(known.mean()) if known.size else None,
            note="CW L-inf's own passes on the base (the transfer x' both suites and Table 2 "
            "share): beside the total, not in it",
        ),
    )


def ledger_markdown(ledger: dict | None) -> str:
    """The ledger as a Markdown table (one row per attack of each suite, then checks and CW)."""
    if ledger is None:
        return "(no cost ledger: a batch record predates it)\n"

    def fmt(v, digits=0):
        return "" if v is None else f"{v:,.{digits}f}"

    rows = []
    for suite in SUITES:
        for r in ledger["suites"][suite]:
            share = fmt(None if r["share"] is None else 100 * r["share"], 1)
            rows.append(
                [
                    f"{suite}: {r['attack']}",
                    r["attempted"],
                    r["broken"],
                    fmt(r["passes"]),
                    fmt(r["passes_per_attempted_point"]),
                    share and f"{share}%",
                ]
            )
    c, cw = ledger["shell_checks"], ledger["cw"]
    share = "" if c["share"] is None else f"{100 * c['share']:.1f}%"
    rows.append(["shell: G at x (and draws)", ledger["n"], "", fmt(c["passes"]), "", share])
    rows.append(["total", ledger["n"], "", fmt(ledger["total_passes"]), "", "100.0%"])
    rows.append(
        ["CW x' on the base (beside the total)", cw["points"], "", fmt(cw["passes"]), "", ""]
    )
    headers = [
        "attack",
        "points attempted",
        "points broken",
        "passes",
        "passes per attempted point",
        "share of total",
    ]
    return (
        reporting.markdown_table(headers, rows)
        + f"\nPasses: base forward+backward passes (a shell prediction counts its whole search). "
        f"{ledger['clean_broken']['shell']} point(s) the shell and "
        f"{ledger['clean_broken']['base']} the base got wrong at x were attacked by neither suite"
        + (
            f"; CW's cost of {cw['from_table2']} point(s) is in Table 2's records"
            if cw["from_table2"]
            else ""
        )
        + ".\n"
    )


def plot_ledger(ledger: dict, path: str) -> None:
    """Points broken against cumulative passes per evaluated point, one line per suite, a marker
    per attack that ran on any point (a PNG)."""
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    n = max(ledger["n"], 1)
    for suite, color in zip(SUITES, ("C1", "C0"), strict=True):
        start = ledger["shell_checks"]["passes"] / n if suite == "shell" else 0.0
        xs, ys, names = [start], [0], [""]
        for r in (r for r in ledger["suites"][suite] if r["attempted"]):  # those that ran
            xs.append(xs[-1] + r["passes"] / n)
            ys.append(ys[-1] + r["broken"])
            names.append(r["attack"])
        ax.plot(xs, ys, marker="o", color=color, label=suite)
        for x, y, name in zip(xs[1:], ys[1:], names[1:], strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.set_xlabel("cumulative base forward+backward passes per point (CW's x' not counted)")
    ax.set_ylabel(f"points broken (of n = {ledger['n']})")
    ax.set_title("cost ledger: points broken against passes spent", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    reporting.save_figure(fig, path)
