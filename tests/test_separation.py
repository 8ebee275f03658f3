"""Separation statistics against known values, and the batched run with resume."""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import small_conv
from manifold_tf import reporting
from manifold_tf.evaluation import separation, stats
from manifold_tf.evaluation.config import SeparationConfig
from manifold_tf.evaluation.store import RunStore


def test_chebyshev_epsilon_known_values():
    assert stats.chebyshev_epsilon(300, 0.9) == pytest.approx(np.sqrt(1.0 / 120.0))
    assert stats.chebyshev_epsilon(300, 0.9) == pytest.approx(0.0913, abs=1e-4)
    # The paper's e = 0.1 at alpha = 0.9 holds from t = 250 on.
    assert stats.chebyshev_epsilon(250, 0.9) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        stats.chebyshev_epsilon(300, 1.0)


def test_clopper_pearson_known_values():
    lo, hi = stats.clopper_pearson(5, 10)
    assert (lo, hi) == pytest.approx((0.187086, 0.812914), abs=1e-5)  # textbook value
    # Edges are closed-form: k = 0 -> [0, 1 - (a/2)^(1/n)], k = n -> [(a/2)^(1/n), 1].
    assert stats.clopper_pearson(0, 300) == pytest.approx((0.0, 1 - 0.025 ** (1 / 300)))
    assert stats.clopper_pearson(300, 300) == pytest.approx((0.025 ** (1 / 300), 1.0))
    lo, hi = stats.clopper_pearson(26, 300)
    assert lo < 26 / 300 < hi and hi < 26 / 300 + stats.chebyshev_epsilon(300)
    with pytest.raises(ValueError):
        stats.clopper_pearson(4, 3)


def test_curve_monotone_and_consistent_with_count():
    rng = np.random.default_rng(0)
    conf = rng.beta(0.5, 0.5, size=(10, 30))
    conf[0, :3] = [0.9, 0.5, 0.99]  # values exactly on the grid count as ">= p"
    s = separation.summarize(conf, p=0.9)
    counts = np.array(s["curve"]["count"])
    assert np.all(np.diff(counts) <= 0)
    assert s["curve"]["p"][0] == 0.5 and max(s["curve"]["p"]) < 1.0
    i = s["curve"]["p"].index(0.9)
    assert counts[i] == s["total"] == int((conf >= 0.9).sum()) == sum(s["per_batch"])
    assert s["points"] == 300 and s["fraction"] == pytest.approx(s["total"] / 300)
    assert s["chebyshev"]["q_upper"] == pytest.approx(s["fraction"] + np.sqrt(1 / 120))
    lo, hi = s["clopper_pearson"]["interval"]
    assert s["curve"]["ci_low"][i] == lo and s["curve"]["ci_high"][i] == hi


def test_sample_indices_seeded_and_distinct():
    a = separation.sample_indices(100, num_batches=3, batch_points=7, seed=4)
    assert a.shape == (3, 7) and len(set(a.ravel())) == 21
    np.testing.assert_array_equal(
        a, separation.sample_indices(100, num_batches=3, batch_points=7, seed=4)
    )
    with pytest.raises(ValueError, match="only 20"):
        separation.sample_indices(20, num_batches=3, batch_points=7, seed=0)


def tiny_problem():
    """A random 3-class linear model of ``pixels / 64``; 20 images ``[4, 4, 3]``, random labels."""
    model = small_conv(seed=0, classes=3, shape=(4, 4, 3), scale=1 / 64.0, offset=0.0, filters=0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(20, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=20).astype(np.int32)
    return model, images, labels


def test_run_separation_saves_and_resumes(tmp_path, monkeypatch):
    model, images, labels = tiny_problem()
    config = SeparationConfig(batches=3, batch_points=4, steps=3)
    kw = dict(delta=8.0, seed=1)
    run_dir = str(tmp_path / "run")
    batch_dir = os.path.join(run_dir, "separation")
    first = separation.run_separation(model, images, labels, config, store=RunStore(run_dir), **kw)
    assert first["confidence"].shape == (3, 4)
    assert sorted(os.listdir(batch_dir)) == [f"batch_{b:03d}.json" for b in range(3)] + [
        "settings.json"
    ]
    assert first["settings"]["attack"]["step_size"] == pytest.approx(2.5 * 8 / 3)

    # Resume: only the missing batch is recomputed, and the results are identical.
    os.remove(os.path.join(batch_dir, "batch_001.json"))
    from manifold_tf import attacks

    calls = []
    real = attacks.high_confidence
    monkeypatch.setattr(
        attacks, "high_confidence", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    second = separation.run_separation(
        model, images, labels, config, store=RunStore(run_dir, resume=True), **kw
    )
    assert len(calls) == 1
    np.testing.assert_allclose(second["confidence"], first["confidence"], atol=1e-6)

    # Other settings in the same directory are refused rather than mixed.
    with pytest.raises(ValueError, match="delta: saved 8.0, now 4.0"):
        separation.run_separation(
            model,
            images,
            labels,
            config,
            store=RunStore(run_dir, resume=True),
            **dict(kw, delta=4.0),
        )


def test_plot_separation_curve(tmp_path):
    conf = np.random.default_rng(1).uniform(size=(2, 30))
    curves = {"a": separation.summarize(conf)["curve"], "b": separation.summarize(conf**3)["curve"]}
    path = str(tmp_path / "curve.png")
    reporting.plot_separation_curve(curves, path, p=0.9, title="t", reference={"paper": 0.5})
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_convergence_check_reruns_the_first_batches_and_a_restart_never_lowers_the_count(tmp_path):
    model, images, labels = tiny_problem()
    store = RunStore(str(tmp_path / "run"))
    config = SeparationConfig(
        batches=3,
        batch_points=4,
        steps=2,
        step_size=8.0,
        optimizer="sign",
        random_start=False,
        convergence_steps=(5,),
        convergence_batches=2,
    )
    run = separation.run_separation(model, images, labels, config, delta=8.0, seed=1, store=store)
    out = separation.convergence_check(model, images, labels, run, config, p=0.5, store=store)
    assert out["points"] == 8 and [r["name"] for r in out["rows"]] == [
        "2 steps (main run)",
        "5 steps",
        "2 steps + 1 random restart",
    ]
    assert out["rows"][2]["count"] >= out["rows"][0]["count"]  # per point the max of both runs
    assert sorted(os.listdir(tmp_path / "run" / "separation_convergence")) == [
        "batch_000.json",
        "batch_001.json",
        "settings.json",
    ]


def test_a_named_run_and_its_convergence_check_use_its_protocols_and_the_searched_radius(tmp_path):
    # The run searches N(x, delta + extra_radius) and records that radius; the convergence check
    # reruns the run's own settings (radius, seed, attack) under "<protocol>_convergence".
    model, images, labels = tiny_problem()
    store = RunStore(str(tmp_path / "run"))
    config = SeparationConfig(
        batches=2, batch_points=3, steps=2, extra_radius=4.0, convergence_steps=(3,)
    )
    run = separation.run_separation(
        model, images, labels, config, delta=4.0, seed=2, store=store, name="m"
    )
    assert run["settings"]["delta"] == 8.0
    assert run["settings"]["attack"] == config.attack(4.0)
    assert config.attack(4.0)["step_size"] == pytest.approx(2.5 * 8.0 / 2)
    out = separation.convergence_check(
        model, images, labels, run, config, p=0.5, store=store, name="m"
    )
    assert out["points"] == 6 and out["rows"][0]["name"] == "2 steps (main run)"
    folders = sorted(f for f in os.listdir(tmp_path / "run") if not f.startswith("."))
    assert folders == ["separation_m", "separation_m_convergence"]
    saved = store.settings("separation_m_convergence")
    assert (saved["delta"], saved["seed"]) == (8.0, 2)
    assert saved["variants"][0][1]["step_size"] == pytest.approx(2.5 * 8.0 / 3)
    off = SeparationConfig(convergence_batches=0)
    assert separation.convergence_check(model, images, labels, run, off, p=0.5) == {}
