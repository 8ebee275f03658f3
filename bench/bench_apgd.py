"""Benchmark: our APGD-CE and APGD-T against ART's ``AutoProjectedGradientDescent``, L-inf.

One run, one model, the first ``--num_points`` points of the CIFAR-10 sample test set:
1. the forward+backward limit: ``--steps`` compiled passes (input gradient of the cross-entropy)
   of the batch the first run attacks (the clean-correct points: APGD, ours and ART's, leaves the
   others alone), the least time a ``steps``-step gradient attack on them can take; the JSON
   also has the time on all ``N`` points;
2. ``attacks.apgd_ce`` and ``attacks.apgd_t`` (Croce & Hein 2020) at ``--epsilon``, ``--steps``,
   ``--restarts`` (APGD-T: ``--num_targets`` target classes, each with ``--restarts`` runs);
3. ART 1.20's ``AutoProjectedGradientDescent`` with the cross-entropy loss at the same budget
   (``eps``, ``max_iter = steps``, ``nb_random_init = restarts``, initial step ``eps_step = 2 eps``
   as in APGD, one batch of ``N``), through ``TensorFlowV2Classifier`` with clip values (0, 255).
   ART has no APGD-T (its targeted mode takes given targets and the CE loss), so APGD-T is only
   compared with the limit; ``--dlr`` adds our APGD-DLR and ART's DLR loss side by side.

Robust accuracy is over all ``N`` points (a point misclassified clean counts as broken), with an
exact 95% Clopper-Pearson interval; "broken" counts the clean-correct points an attack
misclassifies. ART's outputs are checked to lie in the ball and the box. Times are one timed call
after an untimed warm-up on two points (which compiles ours; the batch axis is dynamic, so the
full batch does not retrace; ART's forward pass retraces per batch size, part of its cost).
APGD-T runs up to ``num_targets * restarts`` times as long as the limit; each later run only on
the points still standing.

Usage (about 10 minutes on 2 shared cores)::

  python -m bench.bench_apgd --num_points=100 --steps=30
  python -m bench.bench_apgd --smoke --output=/tmp/bench_apgd.json    # seconds

(the default model is the shipped ``manifold_tf/weights/narrow_adv.keras``). Without ART the run
stops at once (``--no_art`` skips it); ``--smoke`` (3 synthetic points, 2 steps, 2 targets, DLR
too, the synthetic set's nearest-centre model) skips it with a note.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import manifold_tf  # noqa: E402,F401  (registers the custom layers for load_model)
from bench import smoke, timing  # noqa: E402
from manifold_tf import attacks, pretrained  # noqa: E402
from manifold_tf.data import load_arrays  # noqa: E402
from manifold_tf.evaluation.stats import clopper_pearson  # noqa: E402


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a .keras model (logits, pixels 0..255); default the shipped narrow_adv model",
    )
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"])
    parser.add_argument("--data_dir", default="../shared/data/cifar10-sample", help="CIFAR-10")
    parser.add_argument(
        "--num_points", type=int, default=200, help="the first N test points (all of them)"
    )
    parser.add_argument("--epsilon", type=float, default=8.0, help="L-inf budget in pixels")
    parser.add_argument("--steps", type=int, default=100, help="APGD iterations per run")
    parser.add_argument(
        "--restarts", type=int, default=1, help="runs per attack (per target for APGD-T)"
    )
    parser.add_argument("--num_targets", type=int, default=9, help="APGD-T target classes")
    parser.add_argument("--seed", type=int, default=0, help="seed of our random starts")
    parser.add_argument("--no_art", action="store_true", help="skip the ART comparison")
    parser.add_argument("--dlr", action="store_true", help="also APGD-DLR, ours and ART's")
    parser.add_argument("--jit_compile", action="store_true", help="compile ours with XLA")
    parser.add_argument("--smoke", action="store_true", help=smoke.HELP)
    parser.add_argument("--output", default=timing.default_output("apgd"), help="JSON output file")
    args = parser.parse_args(argv)
    if args.smoke:  # the synthetic set's nearest-centre model, 3 points, 2 steps, 2 targets
        args.dataset, args.checkpoint = "synthetic", None
        args.num_points, args.steps, args.restarts, args.num_targets = 3, 2, 1, 2
        args.dlr = True
    return args


def timed(fn, warmup=None) -> tuple[float, object]:
    """Seconds of one call of ``fn`` (after ``warmup()``, untimed) and its value."""
    if warmup is not None:
        warmup()
    out = timing.time_call(fn, repeats=1, warmup=0)
    return out["min_s"], out["result"]


def load_model(args):
    if args.smoke:
        return smoke.nearest_centre_model(), "nearest-centre (synthetic, smoke)"
    path = args.checkpoint or pretrained.path("narrow_adv")
    return keras.saving.load_model(path), path


def main(argv=None) -> dict:
    args = _parse(argv)
    use_art = smoke.check_art(not args.no_art, args.smoke, "bench_apgd")
    np.random.seed(args.seed)
    model, path = load_model(args)
    x, y = load_arrays(args.dataset, "test", args.data_dir if args.dataset == "cifar10" else None)
    x, y = x[: args.num_points], y[: args.num_points].astype(np.int32)
    n, eps, steps, restarts = len(x), args.epsilon, args.steps, args.restarts

    def predict(images):
        return np.concatenate(
            [
                np.argmax(model(images[i : i + 100], training=False).numpy(), 1)
                for i in range(0, len(images), 100)
            ]
        )

    clean_ok = predict(x) == y
    xt = tf.constant(x)

    @tf.function(jit_compile=args.jit_compile, reduce_retracing=True)
    def forward_backward(z, labels):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, model(z, training=False))
        return tape.gradient(loss, z)

    def limit(z, labels):
        z, labels = tf.constant(z), tf.constant(labels)
        return timed(
            lambda: [forward_backward(z, labels) for _ in range(steps)][-1].numpy(),
            warmup=lambda: forward_backward(z, labels).numpy(),
        )[0]

    t_limit, t_limit_all = limit(x[clean_ok], y[clean_ok]), limit(x, y)
    rows = [
        {
            "attack": f"fwd+bwd limit ({steps} passes of {int(clean_ok.sum())} points)",
            "points": int(clean_ok.sum()),
            "seconds": t_limit,
            "x limit": 1.0,
        }
    ]
    result = dict(
        model=path,
        points=n,
        epsilon=eps,
        steps=steps,
        restarts=restarts,
        num_targets=args.num_targets,
        seed=args.seed,
        jit_compile=args.jit_compile,
        smoke=args.smoke,
        art=use_art,
        clean_accuracy=float(clean_ok.mean()),
        limit_seconds=t_limit,
        limit_seconds_all_points=t_limit_all,
        cpu_count=os.cpu_count(),
        load_average_start=os.getloadavg(),
    )

    def report(name, seconds, x_adv, art_seconds=None):
        flat = np.asarray(x_adv, np.float64).reshape(n, -1)
        valid = (
            (np.abs(flat - x.reshape(n, -1)).max(1) <= eps + 1e-3)
            & (flat.min(1) >= 0.0)
            & (flat.max(1) <= 255.0)
        )
        # A point outside the ball or the box breaks nothing.
        robust = clean_ok & ((predict(np.asarray(x_adv, np.float32)) == y) | ~valid)
        k, broken = int(robust.sum()), int((clean_ok & ~robust).sum())
        lo, hi = clopper_pearson(k, n)
        result[name] = dict(
            seconds=seconds,
            robust=k,
            robust_accuracy=k / n,
            clopper_pearson_95=[lo, hi],
            broken=broken,
            invalid=int((~valid).sum()),
        )
        rows.append(
            {
                "attack": name,
                "points": n,
                "robust acc": k / n,
                "95% CI": f"[{lo:.3f}, {hi:.3f}]",
                "broken": broken,
                "seconds": seconds,
                "x limit": seconds / t_limit,
                "ours/ART": None if art_seconds is None else seconds / art_seconds,
            }
        )
        return robust

    settings = attacks.APGDSettings(
        steps=steps, restarts=restarts, num_targets=args.num_targets, jit_compile=args.jit_compile
    )
    kw = dict(epsilon=eps, settings=settings, seed=args.seed)
    ours = {
        "APGD-CE": lambda a, b: attacks.apgd_ce(model, a, b, **kw),
        "APGD-T": lambda a, b: attacks.apgd_t(model, a, b, **kw),
    }
    if args.dlr:
        ours["APGD-DLR"] = lambda a, b: attacks.apgd_dlr(model, a, b, **kw)
    art_times = {}
    art_losses = ["cross_entropy"] + (["difference_logits_ratio"] if args.dlr else [])
    if use_art:
        for loss in art_losses:
            attack = make_art(model, x.shape[1:], loss, eps, steps, restarts, n)
            name = f"ART APGD ({'CE' if loss == 'cross_entropy' else 'DLR'})"
            # Warm up the same object: ART's classifier traces its forward pass per instance.
            t, x_adv = timed(
                lambda attack=attack: attack.generate(x, y),
                warmup=lambda attack=attack: attack.generate(x[:2], y[:2]),
            )
            art_times["APGD-CE" if loss == "cross_entropy" else "APGD-DLR"] = t
            report(name, t, x_adv)
    robust_all = clean_ok.copy()
    for name, fn in ours.items():
        t, x_adv = timed(lambda fn=fn: fn(xt, y).x_adv, warmup=lambda fn=fn: fn(xt[:2], y[:2]))
        robust_all &= report(f"ours {name}", t, x_adv, art_times.get(name))
    result["ours_worst_case_robust_accuracy"] = float(robust_all.mean())
    rows.append(
        {
            "attack": "ours, worst case over the above",
            "points": n,
            "robust acc": robust_all.mean(),
            "broken": int((clean_ok & ~robust_all).sum()),
        }
    )
    result["load_average_end"] = os.getloadavg()
    columns = [
        "attack",
        "points",
        "robust acc",
        "95% CI",
        "broken",
        "seconds",
        "x limit",
        "ours/ART",
    ]
    print(
        f"model {path}; {n} points, clean accuracy {clean_ok.mean():.3f}; eps {eps} px, "
        f"{steps} steps, {restarts} restart(s), APGD-T {args.num_targets} targets"
    )
    result["table"] = timing.write_results(args.output, rows, columns=columns, extra=result)
    return dict(result, rows=rows)


def make_art(model, input_shape, loss_type, eps, steps, restarts, batch_size):
    # deferred: ART is optional (bench/requirements-bench.txt).
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    clf = TensorFlowV2Classifier(
        model=model,
        nb_classes=int(model.output_shape[-1]),
        input_shape=tuple(input_shape),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 255.0),
    )
    # eps_step is ART's initial step size eta: APGD's 2 * eps.
    return AutoProjectedGradientDescent(
        clf,
        norm=np.inf,
        eps=eps,
        eps_step=2.0 * eps,
        max_iter=steps,
        targeted=False,
        nb_random_init=restarts,
        batch_size=batch_size,
        loss_type=loss_type,
        verbose=False,
    )


if __name__ == "__main__":
    main()
