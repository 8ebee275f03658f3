"""The adaptive evaluation, the verdict: a worst-case attack suite on the shell, and on the base alone.

Points: the first ``num_points`` of the seeded walk order, right or wrong at ``x``. A classifier is
robust on a point when it is right at ``x`` and at the ``x'`` of every attack; attacks run in order,
AutoAttack style, each only on the points still standing, and a success always means the real
classifier (the shell itself, run again) answered a wrong label at an ``x'`` inside ``N(x, epsilon)``
and the pixel box. The shell G and its base F are attacked on the same points, each by its own
strongest attacks (METHOD.md, "Adaptive evaluation"):

- F alone: the paper's CW L-inf, APGD-CE, APGD-T (DLR loss).
- G: ``transfer_cw`` (the paper's CW x' on F), ``transfer_confident`` (the most confident wrong
  point of ``N(x, epsilon)`` for F: the separation search), ``lift`` (MCN answers the label that can
  be made most confident within delta of its input: a confident point of ``N(x, epsilon + delta)``
  clipped into ``N(x, epsilon)``), ``bpda`` (identity BPDA, APGD schedule, from x, from the
  transfer x' and random starts), ``bpda_targeted`` (the shell's top wrong labels) and ``square``
  (score-based black box on the shell's probabilities; it tells whether gradients are masked).

Each batch's outcome is one record in the run store (resumable); the report, the sanity checks
and ``summary.json`` are built from the records (:mod:`~manifold_tf.evaluation.adaptive_report`).
"""

from __future__ import annotations

import time

from absl import logging
import numpy as np

from manifold_tf import reporting
from manifold_tf.evaluation.config import AdaptiveConfig
from manifold_tf.evaluation.inputs import predict_logits
from manifold_tf.shells.base import answer

PROTOCOL = "adaptive"


def shell_labels(shell, x: np.ndarray, batch_size: int = 30) -> np.ndarray:
    """The shell's labels on ``x`` (:func:`~manifold_tf.shells.base.answer`), batch by batch: a fresh
    evaluation, what every success is checked on."""
    if not len(x):
        return np.zeros(0, np.int64)
    return np.concatenate([answer(shell.embed_function(np.asarray(x[i : i + batch_size], np.float32)))
                           for i in range(0, len(x), batch_size)])


def passes_per_prediction(shell) -> int:
    """Forward+backward passes of the base in one shell prediction of one image (its search)."""
    c = int(shell.num_classes)
    if hasattr(shell, "rounds"):  # NCN: steps per penalty round
        return c * int(shell.steps) * int(shell.rounds)
    if hasattr(shell, "max_iterations"):  # CW shell: up to two constants
        return c * 2 * int(shell.max_iterations)
    return c * int(shell.steps)


class _Ticker:
    """A throttled progress callback for an attack: a line with counts, rate and ETA every 20 s."""

    def __init__(self, desc: str, every: float = 20.0):
        self.desc, self.every = desc, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done, total=None, standing=None):
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if total and rate > 0 else float("nan")
        logging.info(f"{self.desc}: {done}/{total if total else '?'} steps, {rate:.2g} steps/s, "
                     f"ETA {reporting.format_duration(eta)}"
                     + (f", {standing} points standing" if standing is not None else ""))


def _shell_suite(shell, base, config: AdaptiveConfig, epsilon: float, seed: int, desc: str = ""):
    """``[(name, run(x, y, x_transfer) -> dict)]`` in the order they run."""
    from manifold_tf import attacks

    eot = config.eot_samples if getattr(shell, "random_start", False) else 0
    targets = "all" if config.targets == 0 else config.targets
    runs = {
        "transfer_cw": None,  # x' given: only the shell's answer there is needed
        "transfer_confident": lambda x, y, xt: dict(x_adv=np.asarray(attacks.high_confidence(
            base, x, y, delta=epsilon, steps=config.steps, step_size=2.5 * epsilon / max(config.steps, 1),
            seed=seed)[0]), base_passes=(shell.num_classes - 1) * config.steps),
        "lift": lambda x, y, xt: attacks.lift(
            shell, x, y, epsilon=epsilon, num_targets=targets, steps=config.lift_steps, seed=seed,
            progress=_Ticker(f"{desc}: lift")),
        "bpda": lambda x, y, xt: attacks.bpda_restarts(
            shell, x, y, epsilon=epsilon, steps=config.steps, x_init=xt, from_x=True,
            random_restarts=config.restarts, seed=seed, eot_samples=eot,
            progress=_Ticker(f"{desc}: bpda")),
        "bpda_targeted": lambda x, y, xt: attacks.bpda_targeted(
            shell, x, y, epsilon=epsilon, num_targets=targets, steps=config.steps, x_init=xt,
            from_x=False, seed=seed, eot_samples=eot, progress=_Ticker(f"{desc}: bpda_targeted")),
        "square": lambda x, y, xt: attacks.square(
            shell, x, y, epsilon=epsilon, queries=config.square_queries, seed=seed,
            output="probabilities", progress=lambda q, standing, t=_Ticker(f"{desc}: square (queries)"):
            t(q, config.square_queries, standing)),
    }
    return [(name, runs[name]) for name in config.shell_attacks]


def _base_suite(base, config: AdaptiveConfig, epsilon: float, seed: int):
    from manifold_tf import attacks

    suite = [("apgd_ce", lambda x, y: attacks.apgd_ce(base, x, y, epsilon=epsilon,
                                                       steps=config.base_apgd_steps, seed=seed))]
    if int(base.output_shape[-1]) >= 4:
        suite.append(("apgd_t", lambda x, y: attacks.apgd_t(base, x, y, epsilon=epsilon,
                                                             steps=config.base_apgd_steps, seed=seed)))
    return suite


def _cw_transfer(base, x, y, epsilon, cw_kwargs, known: dict, indices) -> np.ndarray:
    """The paper's CW x' on the base: from Table 2's run where it has the point, else computed."""
    from manifold_tf import attacks

    x_adv = x.copy()
    todo = [k for k, i in enumerate(indices) if int(i) not in known]
    for k, i in enumerate(indices):
        if int(i) in known:
            x_adv[k] = known[int(i)]
    if todo:
        out = attacks.cw_linf_details(base, x[todo], y[todo], epsilon=epsilon, **cw_kwargs)
        x_adv[todo] = np.asarray(out["x_adv"])
    return x_adv


def adaptive_batch(base, shell, x, y, indices, *, config: AdaptiveConfig, epsilon: float,
                   cw_kwargs: dict, known_transfer: dict, seed: int, desc: str = "") -> tuple[dict, np.ndarray]:
    """One batch of the suite: ``(record, x_worst [N, H, W, C])`` (the breaking x' per point, else x)."""
    t0 = time.perf_counter()
    n = len(y)
    f_x = predict_logits(base, x).argmax(-1)
    g_x = shell_labels(shell, x)
    per_pred = passes_per_prediction(shell)
    x_cw = _cw_transfer(base, x, y, epsilon, cw_kwargs, known_transfer, indices)
    cost = dict(base_passes=0, shell_predictions=2 * n)  # G at x, and the final check below
    # The base alone: CW (the transfer x'), then APGD-CE and APGD-T on what stands.
    base_broken = np.where(f_x != y, "clean", "").astype(object)
    cw_ok = predict_logits(base, x_cw).argmax(-1) == y
    base_broken[(base_broken == "") & ~cw_ok] = "transfer_cw"
    base_suite = _base_suite(base, config, epsilon, seed)
    for name, run in base_suite:
        todo = np.nonzero(base_broken == "")[0]
        if len(todo):
            x_adv = np.clip(np.asarray(run(x[todo], y[todo])), x[todo] - epsilon, x[todo] + epsilon)
            ok = predict_logits(base, x_adv).argmax(-1) == y[todo]
            base_broken[todo[~ok]] = name
            cost["base_passes"] += len(todo) * config.base_apgd_steps * (9 if name == "apgd_t" else 1)
    # The shell: every attack of the suite on the points still standing.
    shell_broken = np.where(g_x != y, "clean", "").astype(object)
    shell_adv = g_x.copy()  # the shell's answer at each point's breaking x' (G(x) where none)
    x_worst = x.copy()
    attempted, seconds = {}, {}
    for name, run in _shell_suite(shell, base, config, epsilon, seed, desc=desc or "adaptive"):
        todo = np.nonzero(shell_broken == "")[0]
        attempted[name] = int(len(todo))
        t = time.perf_counter()
        if len(todo):
            if run is None:
                x_adv = x_cw[todo]
            else:
                out = run(x[todo], y[todo], x_cw[todo])
                x_adv = np.asarray(out["x_adv"], np.float32)
                cost["shell_predictions"] += int(np.sum(out.get("shell_evals", out.get("queries", 0))))
                cost["base_passes"] += int(np.sum(out.get("base_passes", 0)))
            x_adv = np.clip(x_adv, np.maximum(x[todo] - epsilon, 0), np.minimum(x[todo] + epsilon, 255))
            answer = shell_labels(shell, x_adv)  # success is verified by a fresh shell prediction
            broken = answer != y[todo]
            cost["shell_predictions"] += len(todo)
            shell_broken[todo[broken]] = name
            shell_adv[todo[broken]] = answer[broken]
            x_worst[todo[broken]] = x_adv[broken]
        seconds[name] = time.perf_counter() - t
        if desc:
            logging.info(f"{desc}: {name}: {int(np.sum(shell_broken == name))}/{attempted[name]} broken "
                  f"({seconds[name]:.0f} s); shell robust so far {int(np.sum(shell_broken == ''))}/{n}")
    cost["base_passes"] += cost["shell_predictions"] * per_pred
    record = dict(indices=[int(i) for i in indices], labels=y.tolist(), base_clean=f_x.tolist(),
                  shell_clean=g_x.tolist(), base_broken_by=base_broken.tolist(),
                  base_attacks=["transfer_cw"] + [name for name, _ in base_suite],
                  shell_broken_by=shell_broken.tolist(), shell_adv=shell_adv.tolist(), attempted=attempted,
                  linf=np.abs(x_worst - x).reshape(n, -1).max(-1).tolist(), cost=cost,
                  seconds=dict(total=time.perf_counter() - t0, **seconds))
    return record, x_worst


def run_adaptive(base, shell, images: np.ndarray, labels: np.ndarray, config: AdaptiveConfig, store, *,
                 epsilon: float, cw_kwargs: dict, seed: int = 0, permutation: str = "numpy",
                 batch_points: int = 30, class_names=None, metadata: dict | None = None) -> dict:
    """Runs (or resumes) the suite on the first ``num_points`` of the order; writes the reports.

    Reuses the CW ``x'`` of a Table-2 run in the same store for the points it has. Returns the
    report (also written as ``adaptive.json``/``.md``, ``summary.json`` and figures); under several
    workers each computes its own batches and only the chief returns (and writes) the report.
    """
    from manifold_tf.evaluation import adaptive_report, defence

    order = defence.walk_order(len(images), seed=seed, kind=permutation)[: config.num_points]
    batches = [order[i : i + batch_points] for i in range(0, len(order), batch_points)]
    settings = reporting._to_jsonable(dict(
        protocol="adaptive (METHOD.md, Adaptive evaluation)", epsilon=float(epsilon),
        shell=shell.settings(), suite=config, base_attack_cw=cw_kwargs, seed=int(seed),
        permutation=permutation, num_points=int(len(order)), batch_points=int(batch_points),
        num_test_points=int(len(images)), **(metadata or {})))
    settings = store.bind(PROTOCOL, settings, free=("strategy",))
    known = {}
    for b in store.finished(defence.PROTOCOL):
        rec = store.load(defence.PROTOCOL, b)
        x_adv = store.load_array(defence.PROTOCOL, b, "xadv")
        for k, i in enumerate(rec["indices"]):
            if rec["base_success"][k]:  # the probe x' of base-robust points is not CW's
                known[int(i)] = x_adv[k]
            else:
                known[int(i)] = images[int(i)]
    records = [store.load(PROTOCOL, b) for b in range(len(batches))]
    progress = store.progress([len(b) for b in batches], records, "adaptive")
    for b, idx in enumerate(batches):
        if records[b] is not None or not store.mine(b):
            continue
        record, x_worst = adaptive_batch(
            base, shell, images[idx].astype(np.float32), labels[idx].astype(np.int64), idx,
            config=config, epsilon=epsilon, cw_kwargs=cw_kwargs, known_transfer=known, seed=seed + b,
            desc=f"adaptive batch {b + 1}/{len(batches)}")
        record["batch"] = b
        store.save(PROTOCOL, b, record, arrays={"xadv": x_worst.astype(np.float32)})
        records[b] = record
        progress.update(len(idx), extra=(
            f"batch {b + 1}/{len(batches)}: shell robust {record['shell_broken_by'].count('')}/"
            f"{len(idx)}, base robust {record['base_broken_by'].count('')}/{len(idx)}"))
    records = store.gather(PROTOCOL, len(batches))
    if not store.workers.is_chief:
        return None  # the chief runs the sanity checks and writes the reports
    store = store.alone()
    sanity = adaptive_report.sanity_checks(base, shell, images, labels, order, config, store,
                                           epsilon=epsilon, seed=seed, records=records)
    return adaptive_report.write_adaptive_report(records, settings, sanity, images, store,
                                                 class_names=class_names)
