"""Tests of held-out PGD early stopping: the best checkpoint, catastrophic-overfitting stop,
resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from manifold_tf import data, early_stopping, training


def _config(**overrides):
    base = dict(
        width="narrow",
        dataset="synthetic",
        adversarial=True,
        attack="fgsm",
        epsilon=8.0,
        batch_size=8,
        steps=6,
        lr_schedule="cyclic",
        lr_max=0.05,
        checkpoint_every=2,
        log_every=2,
        seed=3,
        holdout=16,
        holdout_pgd_steps=2,
        overfit_drop=0.2,
    )
    base.update(overrides)
    return training.TrainConfig(**base)


@pytest.fixture
def stand_in(monkeypatch):
    """The trainer around :func:`helpers.resnet_stand_in` instead of the narrow ResNet (the
    ResNet itself trains in test_kill_resume's and test_signals' command-line runs)."""
    from helpers import resnet_stand_in

    monkeypatch.setattr(training.models, "madry_resnet", resnet_stand_in)


@pytest.fixture(scope="module")
def arrays():
    return data.synthetic_arrays("train", num_examples=64)


def test_split_holdout_is_seeded_disjoint_and_complete():
    x = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1)
    y = np.arange(20)
    tx, ty, hx, hy = early_stopping.split_holdout(x, y, 5, seed=1)
    assert len(hx) == 5 and len(tx) == 15
    assert sorted(np.concatenate([ty, hy]).tolist()) == list(range(20))
    assert early_stopping.split_holdout(x, y, 5, seed=1)[3].tolist() == hy.tolist()
    with pytest.raises(ValueError, match="holdout"):
        early_stopping.split_holdout(x, y, 20, seed=1)


def test_fgsm_config_is_one_step_of_1_25_epsilon():
    config = _config()
    assert (config.attack_steps, config.attack_step_size) == (1, 10.0)
    assert _config(attack="pgd", pgd_steps=7, pgd_step_size=2.0).attack_step_size == 2.0


def test_best_checkpoint_is_kept_and_a_collapse_stops_the_run(
    tmp_path, arrays, monkeypatch, stand_in
):
    # Held-out PGD accuracy 0.5, then 0.6, then a collapse to 0.1: best is step 4, the run stops at
    # 6 (it would have gone on to step 8).
    values = iter([(0.5, 0.5), (0.7, 0.6), (0.9, 0.1), (0.9, 0.1)])
    monkeypatch.setattr(early_stopping.HoldoutMonitor, "measure", lambda self, base: next(values))
    run = str(tmp_path / "run")
    training.train(_config(steps=8), run, train_arrays=arrays)
    history = json.load(open(os.path.join(run, early_stopping.HOLDOUT_LOG)))
    assert [e["step"] for e in history["entries"]] == [2, 4, 6]
    assert history["best"]["step"] == 4 and history["stopped"]["step"] == 6
    assert "catastrophic overfitting" in history["stopped"]["reason"]
    assert os.path.exists(os.path.join(run, early_stopping.BEST_WEIGHTS))
    # A resumed run keeps the verdict instead of training on.
    training.train(_config(steps=8), run, resume=True, train_arrays=arrays)
    again = json.load(open(os.path.join(run, early_stopping.HOLDOUT_LOG)))
    assert again["stopped"] == history["stopped"] and len(again["entries"]) == 3


def test_real_holdout_measurement_writes_history(tmp_path, arrays, stand_in):
    run = str(tmp_path / "run")
    training.train(_config(steps=2), run, train_arrays=arrays)
    history = json.load(open(os.path.join(run, early_stopping.HOLDOUT_LOG)))
    entry = history["entries"][0]
    assert entry["n"] == 16 and 0 <= entry["pgd_accuracy"] <= entry["clean_accuracy"] <= 1


def test_trades_trains_on_the_kl_objective_and_its_examples_stay_in_the_ball(
    tmp_path, arrays, stand_in
):
    import tensorflow as tf

    from helpers import assert_in_ball_and_box

    config = _config(
        attack="trades", trades_beta=6.0, pgd_steps=3, pgd_step_size=3.0, holdout=0, steps=2
    )
    trainer = training.build_trainer(config)
    x = tf.constant(arrays[0][:8])
    x_adv = trainer.perturb_kl(x).numpy()
    assert_in_ball_and_box(x_adv, x.numpy(), 8.0, dtype=None)
    assert np.abs(x_adv - x.numpy()).max() > 1.0  # it moved
    base = training.train(config, str(tmp_path / "run"), train_arrays=arrays)
    assert base.output_shape[-1] == 10
