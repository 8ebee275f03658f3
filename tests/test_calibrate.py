"""``--p=auto``: NCN's p as a quantile of the base's clean top-label confidence on held-out points
(``manifold_tf.shells.calibrate``), the threat model's parsing of ``p`` and where the runner
resolves it.

Tiny shapes: 4x4x3 images (pixels 0..255), 3 classes, a linear base.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from helpers import linear_model, np_logits, np_softmax
from manifold_tf.evaluation import runner
from manifold_tf.evaluation.config import EvaluationConfig, ShellConfig, ThreatConfig
from manifold_tf.evaluation.walk import walk_order
from manifold_tf.shells import NCNShell, calibrate

SHAPE = (4, 4, 3)
D = int(np.prod(SHAPE))


def problem(n=40, seed=0):
    rng = np.random.default_rng(seed)
    kernel, bias = rng.normal(0.0, 0.003, size=(D, 3)), rng.normal(0.0, 0.3, size=3)
    x = rng.uniform(0.0, 255.0, size=(n,) + SHAPE).astype(np.float32)
    return linear_model(SHAPE, kernel, bias), kernel, bias, x


def test_the_quantile_of_top_label_confidence_is_numpy_s():
    base, kernel, bias, x = problem()
    conf = np_softmax(np_logits(x, kernel, bias)).max(1)
    np.testing.assert_allclose(calibrate.top_confidence(base, x, batch_size=7), conf, rtol=1e-5)
    for q in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert calibrate.confidence_quantile(base, x, q) == pytest.approx(
            np.quantile(conf, q), rel=1e-5
        )
    with pytest.raises(ValueError, match="quantile must lie in"):
        calibrate.confidence_quantile(base, x, 1.5)
    with pytest.raises(ValueError, match="no held-out images"):
        calibrate.confidence_quantile(base, x[:0], 0.5)


def test_p_comes_from_the_points_after_the_evaluated_ones_only():
    base, kernel, bias, x = problem()
    order = np.random.default_rng(3).permutation(len(x))
    p, record = calibrate.resolve_p(base, x, order, num_points=10, quantile=0.5, count=25)
    conf = np_softmax(np_logits(x, kernel, bias)).max(1)
    assert p == pytest.approx(np.median(conf[order[10:35]]), rel=1e-5)
    assert record["points"] == 25 and record["quantile"] == 0.5 and record["p"] == p
    assert "after the 10 evaluated" in record["source"]
    # The evaluated points do not matter: replace them and p stays.
    other = x.copy()
    other[order[:10]] = 255.0 - other[order[:10]]
    assert calibrate.resolve_p(base, other, order, num_points=10, count=25)[0] == p
    # Fewer remain than asked: all of them; none remain: a clear error.
    assert calibrate.resolve_p(base, x, order, num_points=30, count=25)[1]["points"] == 10
    with pytest.raises(ValueError, match="held-out test points after the 40 evaluated"):
        calibrate.resolve_p(base, x, order, num_points=40)


def test_threat_p_parses_numbers_and_auto():
    assert ThreatConfig().p == 0.9 and isinstance(ThreatConfig().p, float)
    assert ThreatConfig(p="0.75").p == 0.75
    assert ThreatConfig(p="AUTO").p == "auto"
    with pytest.raises(ValueError, match="p must be a number in"):
        ThreatConfig(p="often")
    with pytest.raises(ValueError, match="p must lie in"):
        ThreatConfig(p=1.0)
    with pytest.raises(ValueError, match="p_quantile must lie in"):
        ShellConfig(p_quantile=2.0)
    base, _, _, _ = problem()
    with pytest.raises(ValueError, match="must be resolved"):
        ShellConfig(kind="ncn").build(base, ThreatConfig(p="auto"))
    shell = ShellConfig(kind="ncn", steps=1, ncn_rounds=1).build(
        base, ThreatConfig(p="auto"), p=0.42
    )
    assert isinstance(shell, NCNShell) and shell.settings()["p"] == 0.42


def test_the_runner_resolves_auto_on_the_walk_order_s_held_out_points():
    base, kernel, bias, x = problem()
    config = EvaluationConfig(mode="defence")
    config = dataclasses.replace(
        config,
        threat=ThreatConfig(p="auto"),
        defence=dataclasses.replace(
            config.defence, shell=ShellConfig(kind="ncn", p_quantile=0.25, p_calibration_points=12)
        ),
    )
    p, record = runner._shell_p(config, base, x, num_points=8)
    order = walk_order(len(x), seed=config.run.seed, kind=config.defence.permutation)
    conf = np_softmax(np_logits(x, kernel, bias)).max(1)
    assert p == pytest.approx(np.quantile(conf[order[8:20]], 0.25), rel=1e-5)
    assert record["quantile"] == 0.25 and record["points"] == 12
    fixed = dataclasses.replace(config, threat=ThreatConfig(p=0.6))
    assert runner._shell_p(fixed, base, x, num_points=8) == (0.6, None)
