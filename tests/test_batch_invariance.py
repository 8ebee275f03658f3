"""A point's outcome does not depend on its batch (issue 23, part 2).

Every random draw for a point is keyed by the run's seed and the point's index (attacks, through
per-point seeds) or by a random shell's seed and the point's pixels (shells): evaluated alone, in a
batch of 7 or of 30, a point gets the same record entries.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import assert_same_across_batches, small_conv, uniform_images
from manifold_tf import attacks, seeds
from manifold_tf.evaluation import adaptive
from manifold_tf.evaluation.config import AdaptiveConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.store import RunStore
from manifold_tf.shells import HedgeShell, MCNShell

SHAPE = (8, 8, 3)


def test_the_numpy_and_tensorflow_generators_give_the_same_bits_and_are_uniform():
    keys = seeds.row_keys(np.array([3, -5, 2**40]), 3, "purpose", 7)
    a = seeds.uniform_rows(keys, (5, 4))
    b = seeds.tf_uniform_rows(tf.constant(keys), (5, 4)).numpy()
    np.testing.assert_array_equal(a, b)
    labels = np.array([0, 4, 9])
    np.testing.assert_array_equal(
        seeds.fold(keys, labels), seeds.tf_fold(tf.constant(keys), tf.constant(labels)).numpy()
    )
    u = seeds.uniform_rows(seeds.row_keys(1, 400, "u"), (250,))  # 100,000 draws
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    # Rows, purposes and seeds give unrelated streams (correlation of a pair of rows ~ N(0, 1/250)).
    c = np.corrcoef(u[:50])[np.triu_indices(50, 1)]
    assert np.abs(c).max() < 0.3
    other = seeds.uniform_rows(seeds.row_keys(1, 400, "v"), (250,))
    assert abs(np.corrcoef(u.ravel(), other.ravel())[0, 1]) < 0.02
    ints = seeds.integers_rows(seeds.row_keys(2, 3000, "i"), [3, 5], (2,))
    assert set(ints[:, 0]) == {0, 1, 2} and set(ints[:, 1]) == {0, 1, 2, 3, 4}


def test_a_row_draws_the_same_alone_and_in_a_batch():
    keys = seeds.point_seeds(11, np.arange(30))
    batch = seeds.uniform_rows(keys, SHAPE)
    np.testing.assert_array_equal(seeds.uniform_rows(keys[12:13], SHAPE)[0], batch[12])
    x = tf.constant(uniform_images(30, SHAPE, seed=3))
    fp = seeds.tf_fingerprint(x).numpy()
    np.testing.assert_array_equal(seeds.tf_fingerprint(x[5:12]).numpy(), fp[5:12])
    assert len(set(fp.tolist())) == 30
    # One pixel moved by one float step changes the fingerprint; -0 and +0 do not.
    y = x.numpy().copy()
    y[0, 1, 2, 0] = np.nextafter(y[0, 1, 2, 0], np.float32(300))
    assert seeds.tf_fingerprint(y[:1]).numpy()[0] != fp[0]
    zero = np.zeros((1,) + SHAPE, np.float32)
    np.testing.assert_array_equal(
        seeds.tf_fingerprint(zero).numpy(), seeds.tf_fingerprint(-zero).numpy()
    )
    with pytest.raises(ValueError, match="shape"):
        seeds.per_point(np.arange(4), 5)


@pytest.fixture(scope="module")
def problem():
    base = small_conv(seed=2, classes=4, shape=SHAPE)
    x = uniform_images(30, SHAPE, seed=5)
    y = base(x).numpy().argmax(1).astype(np.int64)
    return base, x, y


def _alone_and_in_batches(run, n=30, k=12):
    """``run(rows)`` -> per-row outputs; row ``k`` alone, in the 7 rows around it, in all ``n``."""
    full = run(np.arange(n))
    seven = run(np.arange(k - 3, k + 4))
    alone = run(np.array([k]))
    return full, seven, alone, k


@pytest.mark.parametrize(
    "attack",
    ["apgd_ce", "fab", "pgd", "square", "high_confidence"],
)
def test_an_attack_with_per_point_seeds_gives_a_point_the_same_output_in_any_batch(problem, attack):
    base, x, y = problem
    point = seeds.point_seeds(7, np.arange(len(x)))

    def run(rows):
        kw = dict(epsilon=16.0, seed=point[rows])
        xs, ys = x[rows], y[rows]
        if attack == "apgd_ce":
            settings = attacks.APGDSettings(steps=4, restarts=2)
            return attacks.apgd_ce(base, xs, ys, settings=settings, **kw)
        if attack == "fab":
            settings = attacks.FABSettings(steps=3, restarts=2)
            return attacks.fab(base, xs, ys, settings=settings, **kw)
        if attack == "pgd":
            settings = attacks.PGDSettings(restarts=2)
            return attacks.pgd(base, xs, ys, steps=3, step_size=4.0, settings=settings, **kw)
        if attack == "square":
            return attacks.square(base, xs, ys, settings=attacks.SquareSettings(queries=12), **kw)
        return attacks.high_confidence(
            base, xs, ys, steps=2, step_size=4.0, random_start=True, **kw
        )

    full, seven, alone, k = _alone_and_in_batches(run)
    for out, row in ((seven, 3), (alone, 0)):
        assert_same_across_batches(out.x_adv[row], full.x_adv[k])
        assert out.success[row] == full.success[k]
        np.testing.assert_array_equal(out.base_passes[row], full.base_passes[k])
    # The seeds matter: another seed array moves the random starts.
    other = attacks.pgd(
        base, x[:3], y[:3], epsilon=16.0, steps=0, step_size=4.0, seed=point[:3] + 1
    )
    same = attacks.pgd(base, x[:3], y[:3], epsilon=16.0, steps=0, step_size=4.0, seed=point[:3])
    assert not np.array_equal(other.x_adv, same.x_adv)


@pytest.mark.parametrize("kind", ["hedge", "mcn"])
def test_a_random_shell_answers_a_point_the_same_in_any_batch(problem, kind):
    base, x, _ = problem
    if kind == "hedge":
        shell = HedgeShell(base, 8.0, steps=3, seed=4)
    else:
        shell = MCNShell(base, 8.0, steps=3, random_start=True, seed=4)
    assert shell.is_random

    def run(rows):
        out = shell.embed_function(tf.constant(x[rows]))
        return {k: out[k].numpy() for k in ("label", "probabilities", "z")}

    full, seven, alone, k = _alone_and_in_batches(run)
    for out, row in ((seven, 3), (alone, 0)):
        for key in full:
            assert_same_across_batches(out[key][row], full[key][k], err_msg=key)
    # Another seed is another draw: the search's end points move.
    again = shell.with_seed(5).embed_function(tf.constant(x[:4]))["z"].numpy()
    assert not np.array_equal(again, full["z"][:4])


def _x_worst(tmp_path, size, record):
    path = tmp_path / f"b{size}" / "adaptive" / f"batch_{record['batch']:03d}_xadv.npy"
    return np.load(path)


def _record_rows(records):
    """Point index -> its entries of the adaptive record."""
    out = {}
    for r in records:
        for k, i in enumerate(r["indices"]):
            out[i] = dict(
                base_clean=r["base_clean"][k],
                shell_clean=r["shell_clean"][k],
                base_broken_by=r["base_broken_by"][k],
                shell_broken_by=r["shell_broken_by"][k],
                shell_adv=r["shell_adv"][k],
                linf=r["linf"][k],
                cw=r["cw_success"][k],
                ledger={s: {a: v[k] for a, v in r["ledger"][s].items()} for s in ("base", "shell")},
            )
    return out


class RowExact(keras.layers.Layer):
    """Logits ``sum_d x_d W_dk`` by a broadcast product and a per-row sum (no matrix product):
    each row's forward and backward passes are bit-identical in any batch on CPU."""

    def __init__(self, kernel, **kwargs):
        super().__init__(**kwargs)
        self.kernel = tf.constant(kernel, tf.float32)

    def get_config(self):  # a shell's copy (EOT) serialises its settings, the base among them
        return {**super().get_config(), "kernel": self.kernel.numpy().tolist()}

    def call(self, x):
        flat = tf.reshape(x, [tf.shape(x)[0], -1, 1])
        return tf.reduce_sum(flat * self.kernel[None], axis=1)


def row_exact_model(classes: int = 4) -> keras.Model:
    kernel = np.random.default_rng(0).normal(0.0, 0.02, (int(np.prod(SHAPE)), classes))
    inp = keras.Input(SHAPE)
    return keras.Model(inp, RowExact(kernel)(keras.layers.Rescaling(1 / 32, offset=-4.0)(inp)))


def test_a_points_adaptive_record_is_the_same_in_batches_of_30_7_and_1(tmp_path):
    # Measured on CPU (TF 2.21): a Dense or Conv2D base's backward pass differs by ~5e-10 between
    # batch sizes (the matrix kernels' blocking), and CW's Adam steps amplify that to ~1e-4
    # pixels at its boundary x', where a conv base's shell answer can flip (1 point of 30 with
    # small_conv). That is float rounding, not seeding: on a base whose rows are computed alike
    # in any batch the whole record is bit-identical. (Adam's per-example bias correction used
    # to be a second source: a vectorised pow rounds by position; it is now exact.)
    base = row_exact_model()
    x = uniform_images(30, SHAPE, seed=5)
    y = base(x).numpy().argmax(1).astype(np.int64)
    shell = HedgeShell(base, 6.0, steps=2, seed=1)
    cfg = AdaptiveConfig(
        num_points=30,
        budget=None,
        steps=3,
        restarts=1,
        lift_steps=2,
        square_queries=6,
        eot_samples=2,
        base_apgd_steps=3,
        base_targets=2,
        base_attacks=("apgd_ce", "apgd_t", "fab_t", "square"),
        base_square_queries=6,
        sanity_points=0,
    )
    runs, worst = {}, {}
    # All 30 points in one batch; the first 14 of the order in batches of 7; the first 5 alone.
    for size, points in ((30, 30), (7, 14), (1, 5)):
        run = adaptive.run_adaptive(
            base,
            shell,
            x,
            y,
            dataclasses.replace(cfg, num_points=points),
            RunContext(
                store=RunStore(str(tmp_path / f"b{size}")),
                epsilon=3.0,  # about half the points stand: every attack runs
                cw_settings=attacks.CWSettings(max_iterations=3),
                seed=3,
                batch_points=size,
            ),
        )
        runs[size] = _record_rows(run.records)
        worst[size] = {
            i: a
            for r in run.records
            for i, a in zip(r["indices"], _x_worst(tmp_path, size, r), strict=True)
        }
    assert len(runs[30]) == 30 and len(runs[7]) == 14 and len(runs[1]) == 5
    for size in (7, 1):
        for i, entry in runs[size].items():
            assert entry == runs[30][i], (size, i)
            np.testing.assert_array_equal(worst[size][i], worst[30][i])
    # Not a vacuous comparison: the attacks broke some points and left some standing.
    for who in ("shell", "base"):
        outcomes = [e[f"{who}_broken_by"] for e in runs[30].values()]
        assert len(set(outcomes) - {"", "clean"}) >= 2 and "" in outcomes, outcomes
