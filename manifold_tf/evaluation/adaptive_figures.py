"""The verdict's figures: accuracy after each attack, and the paired differences (PNGs)."""

from __future__ import annotations

import numpy as np

from manifold_tf import reporting


def plot_attack_curve(verdict: dict, path: str) -> None:
    """Accuracy of the shell and of the base after each of their attacks, 95% intervals (a PNG)."""
    import matplotlib  # deferred: matplotlib's start-up is paid only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as above

    fig, axes = plt.subplots(
        1,
        2,
        figsize=(10, 3.4),
        sharey=True,
        gridspec_kw=dict(
            width_ratios=[
                len(verdict["shell"]["by_attack"]) + 1,
                len(verdict["base"]["by_attack"]) + 1,
            ]
        ),
    )
    for ax, who, color in ((axes[0], "shell", "C0"), (axes[1], "base", "C1")):
        items = [("clean", verdict[who]["clean"])] + list(verdict[who]["by_attack"].items())
        xs = np.arange(len(items))
        err = [
            [p["rate"] - p["ci_low"] for _, p in items],
            [p["ci_high"] - p["rate"] for _, p in items],
        ]
        ax.errorbar(xs, [p["rate"] for _, p in items], yerr=err, marker="o", color=color, capsize=3)
        ax.set_xticks(xs, [n for n, _ in items], rotation=20, fontsize=8)
        ax.set_title(f"{who}: accuracy after each attack", fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel(f"accuracy (n = {verdict['n']}, 95% Clopper-Pearson)")
    reporting.save_figure(fig, path)


def plot_differences(verdict: dict, path: str) -> None:
    """Shell minus base, robust and clean accuracy, with their paired 95% intervals (a PNG)."""
    import matplotlib  # deferred: matplotlib's start-up is paid only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as above

    items = [
        ("robust accuracy", verdict["difference"]["robust_accuracy"]),
        ("clean accuracy", verdict["difference"]["clean_accuracy"]),
    ]
    fig, ax = plt.subplots(figsize=(6, 2.4))
    for row, (_name, d) in enumerate(items):
        est, low, high = (100 * d[k] for k in ("estimate", "ci_low", "ci_high"))
        ax.errorbar(
            [est],
            [row],
            xerr=[[est - low], [high - est]],
            fmt="o",
            capsize=4,
            color="C0" if row == 0 else "C1",
        )
        ax.annotate(
            f"{est:+.1f} ({low:+.1f} to {high:+.1f}); shell only {d['shell_only']}, "
            f"base only {d['base_only']}",
            (est, row),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_yticks([0, 1], [name for name, _ in items])
    ax.set_ylim(-0.7, 1.7)
    ax.set_xlabel(
        f"shell minus base, points (n = {verdict['n']}; "
        f"{items[0][1].get('interval', 'paired 95% interval')})",
        fontsize=7,
    )
    ax.grid(alpha=0.3, axis="x")
    reporting.save_figure(fig, path)
