"""Clean and robust accuracy of a base model (accuracy mode): PGD, APGD-CE, APGD-T, worst case.

Every attack runs on every point the model gets right at ``x``, so the per-attack figures are
comparable; the worst case counts a point robust only if no attack broke it. Robust accuracy is
over all evaluated points (correct at ``x`` and at every ``x'``), with its exact 95% interval. An
attack's success is a lower bound on the true one, so robust accuracies are upper bounds.
"""

from __future__ import annotations

import time

import numpy as np

from manifold_tf import attacks, reporting, seeds
from manifold_tf.evaluation.config import AccuracyConfig
from manifold_tf.evaluation.inputs import predict_logits
from manifold_tf.evaluation.stats import format_proportion, proportion
from manifold_tf.validation import validate_images, validate_labels, validate_radius


def _attacks(config: AccuracyConfig, num_classes: int, epsilon: float) -> dict:
    """``{name: fn(model, x, y, seed) -> AttackResult}`` for the attacks ``config`` asks for, at
    budget ``epsilon`` pixels."""
    out = {
        f"PGD-{config.pgd_steps}": lambda m, x, y, s: attacks.pgd(
            m,
            x,
            y,
            epsilon=epsilon,
            steps=config.pgd_steps,
            step_size=config.pgd_step_size,
            settings=attacks.PGDSettings(restarts=config.pgd_restarts),
            seed=s,
        )
    }
    if config.apgd_steps:
        out["APGD-CE"] = lambda m, x, y, s: attacks.apgd_ce(
            m, x, y, epsilon=epsilon, settings=attacks.APGDSettings(steps=config.apgd_steps), seed=s
        )
        if num_classes >= 4:  # the targeted DLR loss needs four logits
            targets = min(config.apgd_targets, num_classes - 1)
            out["APGD-T"] = lambda m, x, y, s: attacks.apgd_t(
                m,
                x,
                y,
                epsilon=epsilon,
                settings=attacks.APGDSettings(steps=config.apgd_steps, num_targets=targets),
                seed=s,
            )
    return out


def accuracy_report(
    model, x: np.ndarray, y: np.ndarray, config: AccuracyConfig, *, epsilon: float, seed: int = 0
) -> dict:
    """Clean accuracy and robust accuracy under each attack and under their worst case.

    ``x``: ``[N, 32, 32, 3]`` pixels (0..255), ``y``: ``[N]`` labels; ``epsilon``: the threat
    model's L-inf budget, pixels.
    """
    epsilon = validate_radius(epsilon, "epsilon")
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    validate_images(x, image_shape=None)
    num_classes = int(model.output_shape[-1])
    validate_labels(y, num_examples=len(x), num_classes=num_classes)
    bs = config.batch_size
    clean_correct = predict_logits(model, x, bs).argmax(-1) == y
    robust = {}
    seconds = {}
    for name, attack in _attacks(config, num_classes, epsilon).items():
        ok = clean_correct.copy()
        progress = reporting.Progress(int(clean_correct.sum()), name, unit="images")
        start = time.perf_counter()
        for i in range(0, len(x), bs):
            idx = np.nonzero(clean_correct[i : i + bs])[0] + i
            if not len(idx):
                continue
            # Per-point seeds (seed, index): a point's starts do not depend on its batch.
            x_adv = attack(model, x[idx], y[idx], seeds.point_seeds(seed, idx)).x_adv
            ok[idx] = predict_logits(model, x_adv).argmax(-1) == y[idx]
            progress.update(
                len(idx), extra=f"robust so far {int(ok[: i + bs].sum())}/{min(i + bs, len(x))}"
            )
        robust[name] = ok
        seconds[name] = time.perf_counter() - start
    worst = np.logical_and.reduce(list(robust.values())) if robust else clean_correct
    n = len(x)
    pgd_name = f"PGD-{config.pgd_steps}"
    return {
        "num_examples": int(n),
        "clean_accuracy": float(clean_correct.mean()),
        "pgd_accuracy": float(robust[pgd_name].mean()),
        "clean": proportion(int(clean_correct.sum()), n),
        "robust": {name: proportion(int(ok.sum()), n) for name, ok in robust.items()},
        "worst_case": proportion(int(worst.sum()), n),
        "settings": {
            "epsilon": epsilon,
            "pgd_steps": config.pgd_steps,
            "pgd_step_size": config.pgd_step_size,
            "restarts": config.pgd_restarts,
            "loss": "xent",
            "random_start": True,
            "seed": seed,
            "apgd_steps": config.apgd_steps,
            "apgd_targets": config.apgd_targets,
        },
        "seconds": sum(seconds.values()),
        "seconds_per_attack": seconds,
    }


def accuracy_markdown(report: dict) -> str:
    s = report["settings"]
    rows = [["clean", format_proportion(report["clean"])]]
    rows += [
        [f"{name} (eps {s['epsilon']:g} px)", format_proportion(p)]
        for name, p in report["robust"].items()
    ]
    rows.append(["worst case of the attacks", format_proportion(report["worst_case"])])
    return (
        f"# Accuracy of `{report.get('checkpoint', 'the model')}` on {report['num_examples']} "
        f"test images\n\n"
        + reporting.markdown_table(["", "accuracy (n, 95% CI)"], rows)
        + "\nRobust accuracy: correct at x and at the attack's x'. Attacks give lower bounds on "
        "the true success rate, so these are upper bounds on the true robust accuracy.\n"
    )


def run_accuracy(
    model,
    x: np.ndarray,
    y: np.ndarray,
    config: AccuracyConfig,
    store,
    *,
    epsilon: float,
    seed: int = 0,
    metadata: dict | None = None,
) -> tuple[dict, str]:
    """Runs :func:`accuracy_report` on the first ``num_examples`` points; writes
    ``accuracy.{json,md}``."""
    if config.num_examples:
        x, y = x[: config.num_examples], y[: config.num_examples]
    report = accuracy_report(model, x, y, config, epsilon=epsilon, seed=seed)
    report.update(metadata or {})
    text = accuracy_markdown(report)
    store.write_report("accuracy", report, text)
    return report, text
