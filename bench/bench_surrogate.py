"""BPDA, targeted BPDA and Square on a shell: through the shell itself and through cheaper copies
of it (``FactorShell.proxy``, issue 22's surrogate), on the same points; points broken, passes
spent and the per-point agreement.

The points are those the verdict's shell suite hands to these attacks: the first ``--num_points``
of the seeded walk order (as ``evaluate.py``) that the shell gets right at ``x`` and that the
transfers and ``lift`` leave standing (run here, or read from an earlier run's
``adaptive/batch_000.json`` and its CW ``x'`` with ``--reuse_run``). On those points every attack
runs once per variant, each on all of them (not chained), with the suite's own settings
(:mod:`manifold_tf.evaluation.adaptive_suites`); every success is verified by a fresh prediction of
the full shell, as the suite does. A variant ``SxL`` is ``proxy_steps=S, proxy_labels=L`` (``L``
``all``: every label; Square's labels are the shell's best at ``x``); ``full`` is the shell
itself; ``default`` is the shell's declared choice
(``FactorShell.default_proxy``, the suite's default).

Passes per point are base forward+backward passes: the attack's own (gradients, a proxy's
predictions at the proxy's cost) plus its shell predictions and the verification at the shell's
cost. The ``suite`` rows chain the three attacks as the suite does (each on the points the
previous left standing), derived from the per-attack runs: BPDA's runs are per point independent
of the batch; Square's random draws are not, so its share of a chained run differs slightly.

    python -m bench.bench_surrogate --data=synthetic --num_points=30
    python -m bench.bench_surrogate --num_points=30 --reuse_run=RUN_DIR --variants=full,5x3
    python -m bench.bench_surrogate --data=synthetic --attacks=square --attack_epsilon=16
    python -m bench.bench_surrogate --shell=hedge --reuse_cw=RUN_DIR --variants=full,5x1
    python -m bench.bench_surrogate --smoke          # a tiny random model, seconds

Writes ``bench/results/bench_surrogate.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import numpy as np

from bench import timing
from manifold_tf import reporting

ATTACKS = ("bpda", "bpda_targeted", "square")
PREAMBLE = ("transfer_cw", "transfer_confident", "lift")


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="default", choices=("default", "synthetic"))
    parser.add_argument("--num_points", type=int, default=30)
    parser.add_argument("--shell", default="mcn")
    parser.add_argument("--delta", type=float, default=8.0)
    parser.add_argument("--variants", default="full,5x3", help="full and SxL, comma-separated")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--reuse_run", default=None, help="an evaluate.py output dir")
    parser.add_argument(
        "--reuse_cw",
        default=None,
        help="an evaluate.py output dir whose CW x' (adaptive/batch_000_xcw.npy) is reused; the "
        "transfers and lift run on this shell (for a shell other than that run's)",
    )
    parser.add_argument(
        "--save_run",
        default=None,
        help="write the points standing after the preamble and CW's x' here, in the layout "
        "--reuse_run reads (a later run skips CW, the transfers and lift)",
    )
    parser.add_argument(
        "--attack_epsilon",
        type=float,
        default=None,
        help="the measured attacks' L-inf budget, pixels (default: the threat's; a larger one "
        "gives an attack that breaks nothing at the threat's budget points to compare on)",
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and 4 points")
    parser.add_argument(
        "--json",
        "--output",
        dest="json",
        default=timing.default_output("bench_surrogate"),
        help="JSON output file",
    )
    return parser.parse_args(argv)


def _variant(name: str) -> dict:
    if name == "full":
        return dict(proxy_steps=0, proxy_labels=0, square_proxy_steps=0)
    if name == "default":  # the shell's declared choice (FactorShell.default_proxy)
        return dict(proxy_steps=None, proxy_labels=None, square_proxy_steps=None)
    steps, _, labels = name.partition("x")
    try:
        labels = 0 if labels == "all" else int(labels)
        return dict(proxy_steps=int(steps), proxy_labels=labels, square_proxy_steps=None)
    except ValueError:
        raise SystemExit(
            f"variant {name!r}: write full or SxL (steps x labels, L may be all)"
        ) from None


def _setup(args):
    """``(base, shell, x, y, suite config, epsilon, cw_kwargs, source)``."""
    import tensorflow as tf  # deferred: the CLI parses its flags before TensorFlow loads

    from manifold_tf import data, shells
    from manifold_tf.evaluation import inputs as inputs_lib
    from manifold_tf.evaluation import presets
    from manifold_tf.evaluation.walk import walk_order

    if args.smoke:
        import keras  # deferred: as above

        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 3))
        h = keras.layers.Rescaling(1 / 32.0, offset=-4.0)(inp)
        h = keras.layers.Conv2D(4, 3, activation="relu")(h)
        base = keras.Model(inp, keras.layers.Dense(4)(keras.layers.Flatten()(h)))
        x = np.random.default_rng(0).uniform(0, 255, (6, 8, 8, 3)).astype(np.float32)
        shell = shells.MCNShell(base, 4.0, steps=3)
        y = shell.embed(x)["label"].numpy().astype(np.int64)
        config = presets.from_preset("default").adaptive
        config = dataclasses.replace(
            config, steps=3, lift_steps=3, square_queries=4, targets=1, num_points=len(x)
        )
        from manifold_tf.attacks import CWSettings  # deferred: as above

        cw = CWSettings(max_iterations=5, initial_const=0.01, largest_const=1.0)
        return base, shell, x, y, config, 2.0, cw, "smoke"
    if args.data == "synthetic":
        os.environ[data.DATA_DIR_ENV] = ""
    else:
        sample = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
        os.environ.setdefault(data.DATA_DIR_ENV, os.path.join(sample, "cifar10-sample"))
    config = presets.from_preset(
        "default", {"threat": {"delta": args.delta}, "defence": {"shell": {"kind": args.shell}}}
    )
    inputs = inputs_lib.resolve(config.inputs, run_dir=os.path.dirname(args.json) or ".")
    base = inputs_lib.load_model(inputs, width=config.inputs.width, seed=config.run.seed)
    images, labels = inputs.load_test()
    order = walk_order(len(images), seed=config.run.seed, kind=config.defence.permutation)
    idx = order[: args.num_points]
    shell = config.defence.shell.build(base, config.threat, seed=config.run.seed)
    del tf
    return (
        base,
        shell,
        images[idx].astype(np.float32),
        labels[idx].astype(np.int64),
        config.adaptive,
        config.threat.epsilon,
        config.defence.attack.cw_settings,
        f"{inputs.dataset}: {inputs.note}",
    )


def _standing(args, base, shell, x, y, config, epsilon, cw_kwargs):
    """``(standing [N] bool, x_cw [N, ...])``: the points the transfers and lift leave."""
    from manifold_tf import attacks  # deferred: as above
    from manifold_tf.evaluation import adaptive, adaptive_suites

    if args.reuse_run:
        folder = os.path.join(args.reuse_run, "adaptive")
        with open(os.path.join(folder, "batch_000.json")) as f:
            record = json.load(f)
        if len(record["indices"]) < len(y):
            raise SystemExit(f"{folder} has {len(record['indices'])} points, not {len(y)}")
        by = np.asarray(record["shell_broken_by"][: len(y)], object)
        np.testing.assert_array_equal(record["labels"][: len(y)], y)
        x_cw = np.load(os.path.join(folder, "batch_000_xcw.npy"))[: len(y)]
        standing = np.isin(by, ("",) + ATTACKS)
        args.reused_broken_by = by[standing].tolist()  # what that run's suite did there
        return standing, x_cw
    if args.reuse_cw:
        folder = os.path.join(args.reuse_cw, "adaptive")
        with open(os.path.join(folder, "batch_000.json")) as f:
            np.testing.assert_array_equal(json.load(f)["labels"][: len(y)], y)
        x_cw = np.load(os.path.join(folder, "batch_000_xcw.npy"))[: len(y)]
    else:
        x_cw = attacks.cw_linf(base, x, y, epsilon=epsilon, settings=cw_kwargs).x_adv
    pre = dataclasses.replace(config, shell_attacks=PREAMBLE)
    steps = adaptive_suites.shell_suite(shell, base, pre, x_cw, epsilon=epsilon, seed=0)
    g_x = adaptive.shell_labels(shell, x)
    run = adaptive.run_standing(
        [adaptive_suites.in_ball(s, x, epsilon) for s in steps],
        x,
        y,
        broken=g_x != y,
        verify=lambda xa, idx: adaptive.shell_labels(shell, xa) != y[idx],
    )
    if args.save_run:
        folder = os.path.join(args.save_run, "adaptive")
        os.makedirs(folder, exist_ok=True)
        by = np.where(run.standing, "", "preamble").tolist()
        record = dict(indices=list(range(len(y))), labels=y.tolist(), shell_broken_by=by)
        reporting.write_json(os.path.join(folder, "batch_000.json"), record)
        np.save(os.path.join(folder, "batch_000_xcw.npy"), x_cw)
    return run.standing, x_cw


def _run(shell, base, config, name, x, y, x_cw, epsilon):
    """One attack on all of ``x``: ``(broken [M], passes [M], seconds)``, verified on the shell."""
    from manifold_tf.evaluation import adaptive, adaptive_suites  # deferred: as above

    (step,) = adaptive_suites.shell_suite(
        shell,
        base,
        dataclasses.replace(config, shell_attacks=(name,)),
        x_cw,
        epsilon=epsilon,
        seed=0,
    )
    step = adaptive_suites.in_ball(step, x, epsilon)
    t0 = time.perf_counter()
    out = step.run(x, y, np.arange(len(y)))
    broken = adaptive.shell_labels(shell, out.x_adv) != y
    cost = shell.passes_per_prediction()
    passes = out.base_passes + (out.shell_predictions + 1) * cost  # + 1: the verification
    return broken, passes, time.perf_counter() - t0


def main(argv=None) -> None:
    args = _parse(argv)
    if args.smoke and args.json == timing.default_output("bench_surrogate"):
        args.json = timing.default_output("bench_surrogate_smoke")
    names = [a for a in args.attacks.split(",") if a]
    for a in names:
        if a not in ATTACKS:
            raise SystemExit(f"unknown attack {a!r}; choose from {', '.join(ATTACKS)}")
    variants = {v: _variant(v) for v in args.variants.split(",") if v}
    base, shell, x, y, config, epsilon, cw_kwargs, source = _setup(args)
    standing, x_cw = _standing(args, base, shell, x, y, config, epsilon, cw_kwargs)
    idx = np.flatnonzero(standing)
    xs, ys, xcs = x[idx], y[idx], x_cw[idx]
    print(f"{source}: {len(idx)} of {len(y)} points standing after {', '.join(PREAMBLE)}")
    if args.reuse_run:
        print(f"  {args.reuse_run}'s suite on them: {getattr(args, 'reused_broken_by', None)}")
    per = {}  # (variant, attack) -> dict
    for v, settings in variants.items():
        cfg = dataclasses.replace(config, **settings)
        for a in names:
            eps = epsilon if args.attack_epsilon is None else args.attack_epsilon
            broken, passes, seconds = _run(shell, base, cfg, a, xs, ys, xcs, eps)
            per[(v, a)] = dict(broken=broken, passes=passes, seconds=seconds)
            partial = {
                f"{k[0]} {k[1]}": {f: np.asarray(d[f]).tolist() for f in d} for k, d in per.items()
            }
            reporting.write_json(args.json + ".partial", dict(standing=idx.tolist(), per=partial))
            print(
                f"  {v:>6} {a:<14} {int(broken.sum())}/{len(idx)} broken, "
                f"{passes.mean() if len(idx) else 0:,.0f} passes/point, {seconds:.0f} s"
            )
    rows, points = [], {}
    reference = next(iter(variants))
    for v in variants:
        left = np.ones(len(idx), bool)
        chain_passes = np.zeros(len(idx), np.int64)
        for a in names:
            r = per[(v, a)]
            ref = per[(reference, a)]["broken"]
            rows.append(
                dict(
                    variant=v,
                    attack=a,
                    points=len(idx),
                    broken=int(r["broken"].sum()),
                    passes_per_point=float(r["passes"].mean()) if len(idx) else 0.0,
                    seconds=r["seconds"],
                    lost=int((ref & ~r["broken"]).sum()),
                    gained=int((~ref & r["broken"]).sum()),
                )
            )
            chain_passes[left] += r["passes"][left]
            left &= ~r["broken"]
        rows.append(
            dict(
                variant=v,
                attack="suite (" + " > ".join(names) + ")",
                points=len(idx),
                broken=int((~left).sum()),
                passes_per_point=float(chain_passes.mean()) if len(idx) else 0.0,
                seconds=sum(per[(v, a)]["seconds"] for a in names),
            )
        )
        points[v] = {
            a: dict(broken=per[(v, a)]["broken"].tolist(), passes=per[(v, a)]["passes"].tolist())
            for a in names
        }
    timing.write_results(
        args.json,
        rows,
        columns=[
            "variant",
            "attack",
            "points",
            "broken",
            "lost",
            "gained",
            "passes_per_point",
            "seconds",
        ],
        extra=dict(
            source=source,
            shell=shell.settings(),
            epsilon=float(epsilon),
            num_points=int(len(y)),
            standing_indices=idx.tolist(),
            reused=args.reuse_run,
            reused_broken_by=getattr(args, "reused_broken_by", None),
            variants=variants,
            reference=reference,
            note="lost/gained: points the reference variant broke and this one did not / "
            "the reverse, per attack",
            per_point=points,
            machine=dict(platform=platform.platform(), loadavg=os.getloadavg()),
        ),
    )


if __name__ == "__main__":
    main()
