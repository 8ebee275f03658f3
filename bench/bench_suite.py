"""Points per minute of the verdict's default suite, in two checkouts, on the same points.

Runs the headline command as a subprocess in each checkout (its own ``evaluate.py``, its own
``manifold_tf``: the script puts the checkout first on ``PYTHONPATH``), one after the other:

    python evaluate.py --shell=mcn --delta=8 --num_points=N --output_dir=<tmp>/<side> --overwrite

and reads what each wrote: ``adaptive/batch_*.json`` (the suite's per-batch records: total seconds
and seconds of every attack on the shell; the base's own attacks, CW transfer + APGD-CE/T, are the
rest of the total), ``defence.json`` (Table 2: CW on the base and the shell on x and x'),
``summary.json`` (robust accuracies) and the file times of ``adaptive_sanity`` (the sanity
checks). Reported per side: wall seconds of the whole command, seconds of each phase and of each
attack, seconds per point, suite points per minute (the adaptive phase only), robust accuracy of
the shell and of the base; then after / before. A speed-up counts only if the two runs saw the
same points and the after run's robust accuracies are equal or lower (its attacks are as strong)
and, point by point, every point the before run broke (shell or base) is broken after too: the
per-point outcomes are printed side by side (which attack broke each point) and a point broken
before but standing after is flagged loudly (``WEAKER``). The cost ledger of each side
(``adaptive.json``: passes per point and points broken per attack) is compared row by row.

    python -m bench.bench_suite --checkout_before=/work/baseline --checkout_after=. --num_points=10
    python -m bench.bench_suite --checkout_before=A --reuse_before=DIR ...   # parse an earlier run
    python -m bench.bench_suite --smoke --output=/tmp/bench_suite.json      # seconds, see below

The checkouts run in turn, not interleaved, so a load that comes and goes on a shared machine
shows up as noise: ``--rounds=R`` alternates before/after R times and reports medians. A failed
side is recorded (return code and the end of its log) and the other side is still reported.
Writes ``bench/results/bench_suite.json`` (``--json`` or ``--output`` to change).

``--smoke`` runs the same two evaluations at tiny sizes (``SMOKE_ARGS``: 2 synthetic points, 2
steps per attack, the synthetic set's nearest-centre model saved to the work dir, by default
``<output>_work``); both checkouts default to this one, and the after side reads the before
side's run (``--reuse_after``) unless told otherwise: the smoke run checks the subprocess, the
parsing and the comparison, not a speed-up, and one tiny evaluation is enough for that.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from bench import smoke, timing
from manifold_tf import reporting

SIDES = ("before", "after")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# evaluate.py flags of a smoke run: every phase and attack of the headline, 2 steps each.
SMOKE_ARGS = (
    "--dataset=synthetic --defence_batch_points=2 --base_attack_max_iterations=2 "
    "--shell_steps=2 --adaptive_steps=2 --adaptive_square_queries=2 --adaptive_sanity_points=2 "
    "--adaptive_sanity_steps=2 --adaptive_lift_steps=2 --adaptive_base_apgd_steps=2 "
    "--adaptive_targets=1 --adaptive_base_targets=1 --adaptive_base_square_queries=2"
)


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout_before", default=None, help="checkout (with evaluate.py)")
    parser.add_argument("--checkout_after", default=HERE, help="checkout (default: this one)")
    parser.add_argument("--smoke", action="store_true", help=smoke.HELP)
    parser.add_argument("--num_points", type=int, default=10, help="points of the suite")
    parser.add_argument("--shell", default="mcn")
    parser.add_argument("--delta", default="8")
    parser.add_argument("--extra_args", default="", help="more evaluate.py flags, both sides")
    parser.add_argument("--rounds", type=int, default=1, help="before/after alternations")
    parser.add_argument("--python", default=sys.executable, help="interpreter for evaluate.py")
    parser.add_argument("--work_dir", default=None, help="output dirs go here (default: a tmp)")
    parser.add_argument("--reuse_before", default=None, help="an earlier before output dir")
    parser.add_argument("--reuse_after", default=None, help="an earlier after output dir")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per run")
    parser.add_argument(
        "--json",
        "--output",
        dest="json",
        default=timing.default_output("bench_suite"),
        help="JSON output file",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.checkout_before = args.checkout_before or HERE
        args.num_points, args.rounds = 2, 1
        # Beside the JSON (a test's tmp_path), not a fresh /tmp folder left behind by every run.
        args.work_dir = args.work_dir or os.path.splitext(args.json)[0] + "_work"
    elif args.checkout_before is None:
        parser.error("--checkout_before is required (or --smoke: both sides this checkout).")
    return args


def _command(args, output_dir: str) -> list[str]:
    return [
        args.python,
        "evaluate.py",
        f"--shell={args.shell}",
        f"--delta={args.delta}",
        f"--num_points={args.num_points}",
        f"--output_dir={output_dir}",
        "--overwrite",
        *args.extra_args.split(),
    ]


def _git(checkout: str) -> dict:
    def run(*cmd):
        out = subprocess.run(["git", "-C", checkout, *cmd], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    status = run("status", "--porcelain", "--untracked-files=no")
    return dict(
        commit=run("rev-parse", "HEAD"), dirty_files=len(status.splitlines()) if status else 0
    )


def _run(args, checkout: str, output_dir: str, log_path: str) -> dict:
    """Runs the headline command in ``checkout``: ``{"returncode", "wall_s", "log_tail"}``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.abspath(checkout) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    cmd = _command(args, output_dir)
    print(f"[bench] {checkout}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(
                cmd,
                cwd=checkout,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - start
    with open(log_path, errors="replace") as log:
        lines = [ln.rstrip() for ln in log if not ln.startswith(("I0000", "W0000", "E0000"))]
    return dict(returncode=code, wall_s=wall, command=cmd, log=log_path, log_tail=lines[-15:])


def _read(path: str):
    with open(path) as f:
        return json.load(f)


def _mtime(pattern: str) -> float | None:
    files = glob.glob(pattern)
    return max(os.path.getmtime(f) for f in files) if files else None


def parse_run(output_dir: str) -> dict:
    """What one evaluation wrote: phase and per-attack seconds, points, robust accuracies."""
    out: dict = dict(output_dir=output_dir)
    batches = sorted(glob.glob(os.path.join(output_dir, "adaptive", "batch_[0-9][0-9][0-9].json")))
    records = [_read(p) for p in batches]
    if not records:
        out["error"] = "no adaptive batch records"
        return out
    names = [k for k in records[0]["seconds"] if k not in ("total", "base")]
    total = sum(r["seconds"]["total"] for r in records)
    attacks = {name: sum(r["seconds"].get(name, 0.0) for r in records) for name in names}
    attempted = {name: sum(r.get("attempted", {}).get(name, 0) for r in records) for name in names}
    n = sum(len(r["indices"]) for r in records)
    out.update(
        n=n,
        indices=sorted(i for r in records for i in r["indices"]),
        adaptive_s=total,
        base_attacks_s=total - sum(attacks.values()),
        shell_attacks_s=attacks,
        attempted=attempted,
        points_per_minute=60.0 * n / total if total > 0 else None,
        seconds_per_point=total / n if n else None,
        cost_per_point={k: sum(r["cost"][k] for r in records) / n for k in records[0]["cost"]},
        outcomes={
            str(i): dict(shell=r["shell_broken_by"][k], base=r["base_broken_by"][k])
            for r in records
            for k, i in enumerate(r["indices"])
        },
    )
    report = os.path.join(output_dir, "adaptive.json")
    if os.path.exists(report):
        out["ledger"] = _read(report)["verdict"].get("ledger")  # None: an older checkout
    defence = os.path.join(output_dir, "defence.json")
    if os.path.exists(defence):
        seconds = _read(defence).get("seconds") or {}
        if isinstance(seconds, dict):
            out["table2_s"] = sum(float(v) for v in seconds.values())
            out["table2_detail_s"] = seconds
    # The sanity checks save one record when done, after the last adaptive batch.
    end_adaptive = _mtime(os.path.join(output_dir, "adaptive", "batch_[0-9][0-9][0-9].json"))
    end_sanity = _mtime(os.path.join(output_dir, "adaptive_sanity", "batch_000.json"))
    if end_adaptive and end_sanity and end_sanity >= end_adaptive:
        out["sanity_s"] = end_sanity - end_adaptive
    summary = os.path.join(output_dir, "summary.json")
    if os.path.exists(summary):
        s = _read(summary)
        out.update(
            shell_robust=s["shell"]["robust_accuracy"],
            base_robust=s["base"]["robust_accuracy"],
            shell_clean=s["shell"]["clean_accuracy"],
            base_clean=s["base"]["clean_accuracy"],
            shell_robust_by_attack=s["shell"]["robust_accuracy_by_attack"],
            base_robust_by_attack=s["base"]["robust_accuracy_by_attack"],
            sanity_checks_passed=s.get("sanity_checks_passed"),
            git_commit=s.get("git_commit"),
        )
    else:
        out["error"] = "no summary.json (the run stopped before its report)"
    return out


def _median_run(runs: list[dict]) -> dict:
    """The run of median adaptive time (its own numbers, not a mix of runs)."""
    ok = [r for r in runs if r.get("adaptive_s") is not None]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["adaptive_s"])
    chosen = dict(ok[(len(ok) - 1) // 2])
    chosen["adaptive_s_all"] = [r["adaptive_s"] for r in ok]
    return chosen


def _rows(sides: dict) -> list[dict]:
    rows = []
    for side in SIDES:
        r = sides.get(side) or {}
        n = r.get("n")
        row = dict(
            side=side,
            n=n,
            points_per_minute=r.get("points_per_minute"),
            adaptive_s_per_point=r.get("seconds_per_point"),
            wall_s_per_point=r["wall_s"] / n if n and r.get("wall_s") else None,
            shell_robust=r.get("shell_robust"),
            base_robust=r.get("base_robust"),
        )
        if n:
            for key in ("table2_s", "sanity_s"):
                if r.get(key) is not None:
                    row[f"{key[:-2]}_s_per_point"] = r[key] / n
        rows.append(row)
    return rows


def _attack_rows(sides: dict) -> list[dict]:
    """Per side and attack: points attacked, seconds, per suite point, per attacked point, share.

    The base's attacks (CW transfer, APGD-CE, APGD-T) are one row: the suite times them together.
    """
    rows = []
    for side in SIDES:
        r = sides.get(side) or {}
        if not r.get("n"):
            continue
        n, total = r["n"], r["adaptive_s"]
        items = [("base: cw+apgd", r["base_attacks_s"], None)]
        items += [
            (name, sec, r["attempted"].get(name)) for name, sec in r["shell_attacks_s"].items()
        ]
        for name, sec, attempted in items:
            rows.append(
                dict(
                    side=side,
                    attack=name,
                    attacked_points=attempted,
                    seconds=sec,
                    s_per_suite_point=sec / n,
                    s_per_attacked_point=sec / attempted if attempted else None,
                    share_of_suite=sec / total if total else None,
                )
            )
    return rows


def main(argv=None) -> dict:
    args = _parse(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_suite_")
    os.makedirs(work, exist_ok=True)
    if args.smoke:
        model_path = os.path.join(work, "nearest_centre.keras")
        smoke.nearest_centre_model().save(model_path)
        args.extra_args = f"{SMOKE_ARGS} --checkpoint={model_path} {args.extra_args}"
    checkouts = dict(
        before=os.path.abspath(args.checkout_before), after=os.path.abspath(args.checkout_after)
    )
    reuse = dict(before=args.reuse_before, after=args.reuse_after)
    if args.smoke and not (reuse["before"] or reuse["after"]):
        reuse["after"] = os.path.join(work, "before_0")  # written by the first round's before
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    load = {"start": _load()}
    for rnd in range(args.rounds):
        for side in SIDES:
            if reuse[side]:
                if rnd == 0:
                    runs[side].append(dict(parse_run(reuse[side]), reused=True))
                continue
            out_dir = os.path.join(work, f"{side}_{rnd}")
            run = _run(args, checkouts[side], out_dir, os.path.join(work, f"{side}_{rnd}.log"))
            parsed = parse_run(out_dir)
            runs[side].append(dict(parsed, **run))
            if run["returncode"] != 0:
                print(
                    f"[bench] {side} failed ({run['returncode']}):\n  "
                    + "\n  ".join(run["log_tail"]),
                    file=sys.stderr,
                    flush=True,
                )
    load["end"] = _load()
    sides = {side: _median_run(runs[side]) for side in SIDES if runs[side]}
    before, after = sides.get("before", {}), sides.get("after", {})
    comparison: dict = {}
    if before.get("points_per_minute") and after.get("points_per_minute"):
        same = before.get("indices") == after.get("indices")
        stronger = (
            after.get("shell_robust") is not None
            and before.get("shell_robust") is not None
            and after["shell_robust"] <= before["shell_robust"]
            and after["base_robust"] <= before["base_robust"]
        )
        comparison = dict(
            speedup=after["points_per_minute"] / before["points_per_minute"],
            wall_speedup=(
                before["wall_s"] / after["wall_s"]
                if before.get("wall_s") and after.get("wall_s")
                else None
            ),
            same_points=same,
            after_as_strong=stronger,
            speedup_counts=bool(same and stronger),
            passes_per_point=dict(
                before=before["cost_per_point"].get("base_passes"),
                after=after["cost_per_point"].get("base_passes"),
            ),
            per_attack_speedup={
                name: before["shell_attacks_s"][name] / after["shell_attacks_s"][name]
                for name in before["shell_attacks_s"]
                if after["shell_attacks_s"].get(name)
            },
        )
    if before.get("outcomes") and after.get("outcomes"):
        comparison["outcomes"] = compare_outcomes(before["outcomes"], after["outcomes"])
        # A point the before suite broke and the after suite misses: after is weaker there.
        comparison["speedup_counts"] = bool(
            comparison.get("speedup_counts") and not comparison["outcomes"]["lost"]
        )
    settings = dict(
        checkouts={s: dict(path=checkouts[s], **_git(checkouts[s])) for s in SIDES},
        command=" ".join(_command(args, "<dir>")),
        num_points=args.num_points,
        rounds=args.rounds,
        smoke=args.smoke,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        load_average=load,
        other_evaluations=_other_evaluations(),
    )
    rows = _rows(sides)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = timing.write_results(
        args.json,
        rows,
        columns=columns,
        extra=dict(settings=settings, runs=runs, comparison=comparison),
    )
    attack_rows = _attack_rows(sides)
    if attack_rows:
        attack_table = reporting.markdown_table(
            list(attack_rows[0]),
            [["" if row[c] is None else row[c] for c in attack_rows[0]] for row in attack_rows],
        )
        print("\nPer attack (the adaptive phase):\n" + attack_table)
        reporting.write_json(
            args.json, dict(_read(args.json), attack_rows=attack_rows, attack_table=attack_table)
        )
    if comparison.get("outcomes"):
        _print_outcomes(comparison["outcomes"])
        ledger_rows = _ledger_rows(sides)
        if ledger_rows:
            print("\nCost ledger per attack (passes per evaluated point, points broken):")
            print(
                reporting.markdown_table(
                    list(ledger_rows[0]), [list(r.values()) for r in ledger_rows]
                )
            )
        reporting.write_json(
            args.json, dict(_read(args.json), comparison=comparison, ledger_rows=ledger_rows)
        )
    for side in SIDES:
        r = sides.get(side) or {}
        if r.get("returncode") not in (None, 0) or r.get("error"):
            print(f"{side}: FAILED ({r.get('returncode')}, {r.get('error')}); log {r.get('log')}")
    if comparison:
        print(
            f"after/before points per minute: {comparison['speedup']:.3g} "
            f"(same points: {comparison['same_points']}, after as strong: "
            f"{comparison['after_as_strong']}, counts: {comparison['speedup_counts']})"
        )
    print(
        f"load average start/end: {load['start']} / {load['end']} on {os.cpu_count()} cores; "
        f"other evaluate.py processes at the end: {len(settings['other_evaluations'])}"
    )
    return dict(settings=settings, sides=sides, comparison=comparison, table=table)


def compare_outcomes(before: dict, after: dict) -> dict:
    """Per point, who broke it before and after (index -> ``{"shell", "base"}``: the attack's name,
    ``"clean"`` wrong at x, ``""`` standing), side by side.

    ``lost``: points of either suite that ``before`` broke and ``after`` leaves standing (the after
    suite is weaker there: a speed-up does not count); ``gained``: the other way round.
    """
    common = sorted(set(before) & set(after), key=int)
    rows, lost, gained = [], [], []
    for i in common:
        row = dict(index=int(i))
        for suite in ("shell", "base"):
            b, a = before[i][suite], after[i][suite]
            row[f"{suite}_before"], row[f"{suite}_after"] = b, a
            if b not in ("", "clean") and a == "":
                lost.append(dict(index=int(i), suite=suite, before=b))
            elif b == "" and a not in ("", "clean"):
                gained.append(dict(index=int(i), suite=suite, after=a))
        row["flag"] = "LOST" if any(x["index"] == int(i) for x in lost) else ""
        rows.append(row)
    return dict(
        points=len(common),
        only_before=sorted(set(before) - set(after), key=int),
        only_after=sorted(set(after) - set(before), key=int),
        lost=lost,
        gained=gained,
        after_breaks_all_before_broke=not lost,
        rows=rows,
    )


def _print_outcomes(outcomes: dict) -> None:
    rows = outcomes["rows"]
    if not rows:
        print("\nno point evaluated by both sides")
        return
    print("\nPer-point outcomes (who broke each point; '' standing):")
    print(reporting.markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    if outcomes["lost"]:
        lines = ", ".join(
            f"{x['index']} ({x['suite']}, by {x['before']})" for x in outcomes["lost"]
        )
        message = (
            f"\n!!! WEAKER: {len(outcomes['lost'])} point(s) broken before stand after: {lines}. "
            f"The after suite misses them; its speed-up does not count. !!!\n"
        )
        print(message)
        print(message, file=sys.stderr, flush=True)
    if outcomes["only_before"] or outcomes["only_after"]:
        print(
            f"points only one side evaluated: before {outcomes['only_before']}, "
            f"after {outcomes['only_after']}"
        )


def _ledger_rows(sides: dict) -> list[dict]:
    """Per suite and attack, each side's passes per evaluated point and points broken."""
    led = {side: (sides.get(side) or {}).get("ledger") for side in SIDES}
    if not any(led.values()):
        return []
    keys = []
    for side in SIDES:
        for suite, rows in ((led[side] or {}).get("suites") or {}).items():
            keys += [(suite, r["attack"]) for r in rows if (suite, r["attack"]) not in keys]
    out = []
    for suite, attack in keys:
        row = dict(attack=f"{suite}: {attack}")
        for side in SIDES:
            rows = {r["attack"]: r for r in ((led[side] or {}).get("suites") or {}).get(suite, [])}
            r, n = rows.get(attack), (led[side] or {}).get("n") or 0
            row[f"passes_per_point_{side}"] = r["passes"] / n if r and n else None
            row[f"broken_{side}"] = r["broken"] if r else None
        out.append(row)
    return out


def _other_evaluations() -> list[str]:
    """Command lines of evaluate.py processes running now (not this one's children, they ended)."""
    out = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "evaluate.py" in cmd and "bench_suite" not in cmd:
            out.append(cmd)
    return out


def _load():
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


if __name__ == "__main__":
    main()
