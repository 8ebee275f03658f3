"""Benchmark: PGD and CW L-inf throughput and success, against the raw model and against ART.

One run, one model, one set of points:
1. raw forward+backward throughput of the model (gradient of the cross-entropy w.r.t. the input,
   compiled, same batch): the ceiling for any gradient attack;
2. ``attacks.pgd`` and ``attacks.cw_linf``: passes per second (images x gradient steps /
   seconds) and success rate (CW: its batched loop's passes, and the ones each point used, from
   the ``AttackResult``'s ``details["iterations"]``; its knobs, ``attacks.CWSettings``);
3. ART 1.20 (``bench/requirements-bench.txt``): ``ProjectedGradientDescent`` and
   ``CarliniLInfMethod`` through ``TensorFlowV2Classifier`` at the same settings.

Timings are the minimum over ``--repeats`` runs after a warm-up (compilation excluded): on a shared
CPU the minimum is the least disturbed figure. ART's CW L-inf attacks one image at a time and is
slow, so it runs on the first ``--art_cw_images`` points only; our CW runs on those same points
for the comparison (and is also timed on all points).

ART's CW L-inf measures ``tau`` in input units starting at 1.0 and stopping at 1/256, i.e. it
assumes inputs in [0, 1]; with ``clip_values=(0, 255)`` its first tau would be one pixel. So it
attacks ``x / 255`` through a wrapper ``z -> model(255 z)`` with ``clip_values=(0, 1)`` (the same
problem, the paper's units); PGD runs in pixels with ``clip_values=(0, 255)``, ``eps=8``.

Usage (about 10-20 minutes on 2 shared cores)::

  python -m bench.bench_attacks --num_images=24 --output=bench/results/bench_attacks.json
  python -m bench.bench_attacks --smoke --output=/tmp/bench_attacks.json   # seconds

(the default model is the shipped ``manifold_tf/weights/narrow_natural.keras``). Without ART the
run stops at once (``--no_art`` skips it); ``--smoke`` (2 synthetic points, 2 steps, the synthetic
set's nearest-centre model, one repeat) skips it with a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import smoke, timing  # noqa: E402
from manifold_tf import attacks, pretrained  # noqa: E402
from manifold_tf.data import load_arrays  # noqa: E402


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="model (.keras, .weights.h5 or TF1 checkpoint); default the shipped narrow_natural "
        "model (manifold_tf.pretrained), else a randomly initialised narrow model",
    )
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"])
    parser.add_argument("--data_dir", default="../shared/data/cifar10-sample", help="CIFAR-10")
    parser.add_argument(
        "--num_images", type=int, default=24, help="points (correct test points, seeded order)"
    )
    parser.add_argument("--seed", type=int, default=0, help="point order and random starts")
    parser.add_argument("--epsilon", type=float, default=8.0, help="L-inf budget in pixels")
    parser.add_argument("--pgd_steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--pgd_step_size", type=float, default=2.0, help="PGD step in pixels")
    parser.add_argument(
        "--cw_max_iterations", type=int, default=10, help="CW Adam steps per constant (paper 1000)"
    )
    parser.add_argument(
        "--cw_learning_rate", type=float, default=5e-3, help="CW Adam rate (paper 5e-3, ART 0.01)"
    )
    parser.add_argument(
        "--art_cw_images", type=int, default=3, help="points of ART's CW L-inf (one at a time)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (minimum reported)")
    parser.add_argument("--no_art", action="store_true", help="skip the ART comparison")
    parser.add_argument("--no_jit_compare", action="store_true", help="skip PGD with XLA")
    parser.add_argument("--smoke", action="store_true", help=smoke.HELP)
    parser.add_argument(
        "--output", default=timing.default_output("bench_attacks"), help="JSON output file"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # the synthetic set's nearest-centre model, 2 points, 2 steps
        args.dataset, args.checkpoint = "synthetic", None
        args.num_images, args.pgd_steps, args.cw_max_iterations = 2, 2, 2
        args.art_cw_images, args.repeats = 1, 1
    return args


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Minimum seconds over ``repeats`` calls (compiled beforehand) and the last call's value."""
    timed = timing.time_call(fn, repeats=repeats, warmup=0)
    return timed["min_s"], timed["result"]


def load_model(args):
    # deferred: only the default path needs the model builders.
    from manifold_tf.checkpoints import load_model_weights
    from manifold_tf.models import madry_resnet

    if args.smoke:
        return smoke.nearest_centre_model(), "nearest-centre (synthetic, smoke)"
    if args.checkpoint:
        return load_model_weights(args.checkpoint), args.checkpoint
    try:
        path = pretrained.path("narrow_natural")
    except FileNotFoundError as e:
        print(f"warning: {e} Benchmarking a randomly initialised narrow model.")
        return madry_resnet("narrow"), "random-init narrow"
    return load_model_weights(path), path


def pick_points(model, args):
    x, y = load_arrays(args.dataset, "test", args.data_dir if args.dataset == "cifar10" else None)
    order = np.random.default_rng(args.seed).permutation(len(x))
    x, y = x[order], y[order]
    pred = np.concatenate(
        [np.argmax(model(x[i : i + 100], training=False).numpy(), 1) for i in range(0, len(x), 100)]
    )
    keep = np.flatnonzero(pred == y)[: args.num_images]
    return x[keep], y[keep].astype(np.int32), float((pred == y).mean())


def misclassified(model, x_adv, y):
    return np.argmax(model(tf.constant(x_adv, tf.float32), training=False).numpy(), 1) != y


def linf(a, b):
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(len(a), -1).max(1)


def main(argv=None) -> dict:
    args = _parse(argv)
    use_art = smoke.check_art(not args.no_art, args.smoke, "bench_attacks")
    model, model_name = load_model(args)
    x, y, clean_acc = pick_points(model, args)
    n, eps, reps = len(x), args.epsilon, args.repeats
    if n == 0:
        raise SystemExit(f"bench_attacks: {model_name} classifies no {args.dataset} test point.")
    xt, yt = tf.constant(x), tf.constant(y)
    rows, result = (
        [],
        dict(
            model=model_name,
            points=n,
            clean_accuracy_sample=clean_acc,
            epsilon=eps,
            repeats=reps,
            smoke=args.smoke,
            art=use_art,
            cpu_count=os.cpu_count(),
        ),
    )

    @tf.function
    def raw_step(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(yt, model(z, training=False))
        return tape.gradient(loss, z)

    raw_step(xt)
    k = args.pgd_steps
    t_raw, _ = best_time(lambda: [raw_step(xt) for _ in range(k)][-1].numpy(), reps)
    raw_rate = n * k / t_raw
    result["raw"] = dict(passes_per_second=raw_rate, seconds_for_k_steps=t_raw)
    rows.append(row("raw fwd+bwd (ceiling)", n, raw_rate, 1.0, None, t_raw))

    pgd_kw = dict(epsilon=eps, steps=k, step_size=args.pgd_step_size, seed=args.seed)
    pgd_settings = attacks.PGDSettings(random_start=True)
    for jit in [False] if args.no_jit_compare else [False, True]:
        attacks.pgd(model, x, y, settings=pgd_settings, jit_compile=jit, **pgd_kw)  # compile
        t, x_adv = best_time(
            lambda jit=jit: (
                attacks.pgd(model, x, y, settings=pgd_settings, jit_compile=jit, **pgd_kw).x_adv
            ),
            reps,
        )
        rate = n * k / t
        ok = misclassified(model, x_adv, y)
        name = "pgd" + ("_xla" if jit else "")
        result[name] = dict(
            passes_per_second=rate,
            ratio_to_raw=rate / raw_rate,
            seconds=t,
            success_rate=float(ok.mean()),
            settings=dict(
                epsilon=eps,
                steps=k,
                step_size=args.pgd_step_size,
                random_start=True,
                seed=args.seed,
                jit_compile=jit,
            ),
        )
        rows.append(
            row(f"ours PGD-{k}{' XLA' if jit else ''}", n, rate, rate / raw_rate, ok.mean(), t)
        )

    cw = attacks.CWSettings(
        max_iterations=args.cw_max_iterations, learning_rate=args.cw_learning_rate
    )
    m = min(args.art_cw_images, n)
    for name, sl in (("cw_linf_all", slice(None)), ("cw_linf_subset", slice(0, m))):
        # An untimed call first: cw_linf traces once per settings and batch size.
        timed = timing.time_call(
            lambda sl=sl: attacks.cw_linf(model, x[sl], y[sl], epsilon=eps, settings=cw),
            repeats=1,
            warmup=1,
        )
        t, out = timed["min_s"], timed["result"]
        iterations = out.details["iterations"]
        # One batched loop runs until its last point is done (every point starts in it), each
        # iteration a pass of the whole batch: the passes paid, beside the ones each point used.
        steps = int(iterations.max()) * len(iterations)
        ok = out.success & misclassified(model, out.x_adv, y[sl])
        result[name] = dict(
            seconds=t,
            passes_per_second=steps / t,
            ratio_to_raw=steps / t / raw_rate,
            useful_passes=int(out.base_passes.sum()),
            batched_passes=steps,
            success_rate=float(ok.mean()),
            points=len(x[sl]),
            median_distance=float(np.median(out.details["distance"])),
            settings=dataclasses.asdict(cw),
        )
        rows.append(
            row(
                f"ours CW-Linf ({name.split('_')[-1]})",
                len(x[sl]),
                steps / t,
                steps / t / raw_rate,
                ok.mean(),
                t,
            )
        )

    if use_art:
        rows += run_art(model, x, y, eps, k, m, cw, result, args)

    if "art_cw_linf" in result:
        result["cw_speedup_vs_art"] = (
            result["art_cw_linf"]["seconds"] / result["cw_linf_subset"]["seconds"]
        )
    result["table"] = timing.write_results(args.output, rows, extra=result)
    if "art_cw_linf" in result:
        print(
            f"CW L-inf on {m} points: ours {result['cw_linf_subset']['seconds']:.1f}s, "
            f"ART {result['art_cw_linf']['seconds']:.1f}s: "
            f"{result['cw_speedup_vs_art']:.1f}x faster"
        )
    return dict(result, rows=rows)


def row(attack, points, rate, ratio, success, seconds):
    """A table row; ``None`` shows as an empty cell."""
    return {
        "attack": attack,
        "points": points,
        "fwd+bwd/s": rate,
        "x raw": ratio,
        "success": None if success is None else float(success),
        "seconds": seconds,
    }


def run_art(model, x, y, eps, k, m, cw_settings: attacks.CWSettings, result, args):
    # deferred: ART is optional (bench/requirements-bench.txt).
    import keras
    from art.attacks.evasion import CarliniLInfMethod, ProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    rows = []
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    clf = TensorFlowV2Classifier(
        model=model,
        nb_classes=10,
        input_shape=x.shape[1:],
        loss_object=loss,
        clip_values=(0.0, 255.0),
    )
    pgd = ProjectedGradientDescent(
        clf,
        norm=np.inf,
        eps=eps,
        eps_step=args.pgd_step_size,
        max_iter=k,
        num_random_init=1,
        batch_size=len(x),
        verbose=False,
    )
    pgd.generate(x[:2], y[:2])  # warm-up
    t, x_adv = best_time(lambda: pgd.generate(x, y), args.repeats)
    ok = misclassified(model, x_adv, y) & (linf(x_adv, x) <= eps + 1e-3)
    result["art_pgd"] = dict(
        seconds=t,
        passes_per_second=len(x) * k / t,
        success_rate=float(ok.mean()),
        settings=dict(
            eps=eps,
            eps_step=args.pgd_step_size,
            max_iter=k,
            num_random_init=1,
            clip_values=[0, 255],
        ),
    )
    rows.append(
        row(
            f"ART PGD-{k}",
            len(x),
            len(x) * k / t,
            len(x) * k / t / result["raw"]["passes_per_second"],
            ok.mean(),
            t,
        )
    )

    # CW L-inf in [0, 1] units (see the module docstring).
    inp = keras.Input(x.shape[1:])
    unit_model = keras.Model(inp, model(keras.layers.Rescaling(255.0)(inp)))
    clf01 = TensorFlowV2Classifier(
        model=unit_model,
        nb_classes=10,
        input_shape=x.shape[1:],
        loss_object=loss,
        clip_values=(0.0, 1.0),
    )
    cw = CarliniLInfMethod(
        clf01,
        learning_rate=cw_settings.learning_rate,
        max_iter=cw_settings.max_iterations,
        initial_const=1e-5,
        largest_const=20.0,
        const_factor=2.0,
        decrease_factor=0.9,
        batch_size=1,
        verbose=False,
    )
    t, x_adv = best_time(lambda: cw.generate(x[:m] / 255.0, y[:m]) * 255.0, 1)
    ok = misclassified(model, x_adv, y[:m]) & (linf(x_adv, x[:m]) <= eps + 1e-3)
    result["art_cw_linf"] = dict(
        seconds=t,
        success_rate=float(ok.mean()),
        points=m,
        median_distance=float(np.median(linf(x_adv, x[:m]))),
        settings=dict(
            learning_rate=cw_settings.learning_rate,
            max_iter=cw_settings.max_iterations,
            initial_const=1e-5,
            largest_const=20.0,
            const_factor=2.0,
            decrease_factor=0.9,
            units="[0,1] via z -> model(255 z)",
        ),
    )
    rows.append(row("ART CW-Linf", m, None, None, ok.mean(), t))
    return rows


if __name__ == "__main__":
    main()
