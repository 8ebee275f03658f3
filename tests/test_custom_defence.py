"""A defence defined outside the package runs the whole verdict.

The shell below, a randomly dithered input quantisation (Guo et al. 2018's quantisation with a
random dither), lives in this file only: it subclasses FactorShell, registers its own kind,
declares its cost and its randomness, and is then built by kind and judged by
``manifold_tf.evaluation`` end to end (the adaptive suite on shell and base, the paired
differences, ``summary.json``), on a tiny linear model and synthetic clustered data. It is also
the README's example ("Test-time defences beyond the paper").

Tiny shapes: 8x8x3 images (pixels 0..255), 3 classes.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import tensorflow as tf

from helpers import nearest_centre_model
from manifold_tf import shells
from manifold_tf.attacks import CWSettings
from manifold_tf.evaluation import adaptive, adaptive_report
from manifold_tf.evaluation.config import AdaptiveConfig, ShellConfig, ThreatConfig
from manifold_tf.evaluation.context import RunContext
from manifold_tf.evaluation.store import RunStore
from manifold_tf.shells import FactorShell, register
from manifold_tf.validation import PIXEL_MAX

SHAPE = (8, 8, 3)
C = 3


@register("test_dither")
@keras.saving.register_keras_serializable(package="tests")
class DitherShell(FactorShell):
    """``G(x) = F(q * round((x + u) / q))``, ``u`` uniform in ``[-q/2, q/2]`` from ``seed``.

    Args: base (images -> logits), step ``q`` in pixels, seed. One point per image; cost:
    one forward pass of the base (declared as 1 pass); random (a seeded dither).
    """

    def __init__(self, base, step: float = 32.0, *, seed: int = 0, **kwargs):
        self.step = float(step)
        self.seed = int(seed)
        super().__init__(base, **kwargs)

    @classmethod
    def from_settings(cls, base, settings, *, delta, p, seed=0):
        del settings, p  # its own knob is the threat model's delta, read as the step
        return cls(base, step=delta, seed=seed, jit_compile=False)

    def _shell_config(self):
        return dict(step=self.step, seed=self.seed)

    def get_config(self):
        return {**super().get_config(), **self._shell_config()}

    def settings(self):
        return dict(shell=self.kind, **self._shell_config())

    def passes_per_prediction(self):
        return 1  # one forward pass, no search

    @property
    def search_radius(self):
        return self.step  # the dithered point is within q of x

    @property
    def rows_per_image(self):
        return 1

    @property
    def is_random(self):
        return True

    def with_seed(self, seed):
        return self._replace(seed=seed)

    def _embed_graph(self, x):
        u = tf.random.stateless_uniform(tf.shape(x), seed=[self.seed, 1], minval=-0.5, maxval=0.5)
        z = tf.clip_by_value(self.step * tf.round(x / self.step + u), 0.0, PIXEL_MAX)
        return self._at_point(z)  # BPDA: every label's slot is z, identity approximation


def clustered_data(n=24, seed=0):
    """Three classes around three grey levels, spread so that a few points are near the
    boundary."""
    rng = np.random.default_rng(seed)
    centres = np.stack([np.full(SHAPE, v, np.float32) for v in (70.0, 128.0, 186.0)])
    y = rng.integers(0, C, n)
    x = np.clip(centres[y] + rng.normal(0.0, 25.0, size=(n,) + SHAPE), 0, 255).astype(np.float32)
    return centres, x, y.astype(np.int64)


def test_a_defence_defined_outside_the_package_runs_the_whole_verdict(tmp_path):
    centres, x, y = clustered_data()
    base = nearest_centre_model(centres, temperature=2000.0)
    # Built by kind from the evaluation's settings, as evaluate.py does.
    assert shells.SHELLS["test_dither"] is DitherShell
    shell = ShellConfig(kind="test_dither").build(base, ThreatConfig(delta=16.0), seed=3)
    assert isinstance(shell, DitherShell) and shell.step == 16.0 and shell.seed == 3
    assert shell.is_random and shell.with_seed(5).seed == 5
    probs = shell.predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)

    store = RunStore(str(tmp_path / "run"))
    cfg = AdaptiveConfig(
        num_points=12,
        steps=3,
        square_queries=30,
        sanity_points=6,
        sanity_steps=3,
        lift_steps=2,
        base_apgd_steps=3,
        eot_samples=2,
        shell_attacks=("transfer_cw", "bpda", "square"),
    )
    run = adaptive.run_adaptive(
        base,
        shell,
        x,
        y,
        cfg,
        RunContext(
            store=store,
            epsilon=24.0,
            cw_settings=CWSettings(max_iterations=5),
            seed=0,
            batch_points=6,
        ),
    )
    report = adaptive_report.write_adaptive_report(run, x, store)
    assert report["verdict"]["n"] == 12
    with open(store.path("summary.json")) as f:
        summary = json.load(f)
    assert summary["n"] == 12
    assert summary["shell"]["settings"] == dict(shell="test_dither", step=16.0, seed=3)
    for key in ("robust_accuracy", "clean_accuracy"):
        d = summary["difference"][key]
        assert d["n"] == 12 and d["ci_low"] <= d["estimate"] <= d["ci_high"]
        assert d["estimate"] == (d["shell_only"] - d["base_only"]) / 12
    # Its declared cost reaches the report.
    assert summary["passes_per_point"]["shell_predictions"] >= 1


class HalfApproximation(DitherShell):
    """The same shell with a non-identity BPDA approximation ``x / 2`` (a test of the hook)."""

    def bpda_approximation(self, x):
        return 0.5 * x


def test_bpda_vjp_is_the_identity_by_default_and_the_approximation_s_jacobian_otherwise():
    centres, x, _ = clustered_data(n=4)
    base = nearest_centre_model(centres, temperature=2000.0)
    g = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    assert DitherShell(base).bpda_vjp(x, g) is g
    np.testing.assert_allclose(HalfApproximation(base).bpda_vjp(x, g).numpy(), 0.5 * g, rtol=1e-6)
