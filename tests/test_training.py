"""Tests of training: adversarial batches inside train_step, resume == uninterrupted, no
clobbering."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import warm
from helpers import assert_config_round_trip, assert_in_ball_and_box, small_conv
from manifold_tf import data, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    base = dict(
        width="narrow",
        dataset="synthetic",
        adversarial=True,
        epsilon=8.0,
        pgd_steps=1,
        pgd_step_size=8.0,
        batch_size=8,
        steps=4,
        lr_boundaries=(2,),
        lr_values=(0.1, 0.01),
        checkpoint_every=2,
        log_every=2,
        seed=3,
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
    return data.synthetic_arrays("train", num_examples=48)


def _weights(model):
    return [v.numpy() for v in model.weights]


def test_resumed_run_equals_uninterrupted_run(tmp_path, arrays, stand_in):
    keras.utils.set_random_seed(0)
    full = training.train(_config(), str(tmp_path / "full"), train_arrays=arrays)
    keras.utils.set_random_seed(0)
    training.train(_config(steps=2), str(tmp_path / "split"), train_arrays=arrays)
    keras.utils.set_random_seed(99)  # a different init must be overwritten by the checkpoint
    resumed = training.train(_config(), str(tmp_path / "split"), resume=True, train_arrays=arrays)
    for a, b in zip(_weights(full), _weights(resumed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    loaded = keras.models.load_model(str(tmp_path / "full" / training.FINAL_WEIGHTS))
    x = arrays[0][:4]
    np.testing.assert_allclose(loaded(x).numpy(), full(x).numpy(), rtol=1e-6)


def test_refuses_a_non_empty_model_dir_and_mismatched_resume(tmp_path, arrays, stand_in):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume"):
        training.train(_config(steps=2), str(run), train_arrays=arrays)
    assert (run / "notes.txt").read_text() == "mine"
    training.train(_config(steps=2), str(tmp_path / "r2"), train_arrays=arrays)
    with pytest.raises(ValueError, match="pgd_steps"):
        training.train(
            _config(steps=2, pgd_steps=2), str(tmp_path / "r2"), resume=True, train_arrays=arrays
        )


def test_adversarial_batches_stay_in_the_ball_and_raise_the_loss(arrays):
    keras.utils.set_random_seed(0)
    trainer = training.build_trainer(_config(pgd_steps=5, pgd_step_size=2.0))
    x, y = tf.constant(arrays[0][:8]), tf.constant(arrays[1][:8])
    x_adv = trainer.perturb(x, y).numpy()
    assert_in_ball_and_box(x_adv, x.numpy(), 8.0, tol=1e-4, dtype=None)
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert float(xent(y, trainer.base(x_adv))) > float(xent(y, trainer.base(x)))


def test_cyclic_learning_rate_round_trips_through_its_config():
    schedule = training.CyclicLearningRate(0.05, 100, peak=0.3)
    clone = assert_config_round_trip(schedule, strict=True)
    steps = [0, 10, 30, 65, 100]
    np.testing.assert_array_equal(
        [float(clone(s)) for s in steps], [float(schedule(s)) for s in steps]
    )


def test_adversarial_trainer_round_trips_through_its_config():
    trainer = training.AdversarialTrainer(
        small_conv(seed=0, shape=(32, 32, 3)), epsilon=4.0, pgd_steps=3, pgd_step_size=1.5, seed=7
    )
    clone = assert_config_round_trip(trainer)
    assert (clone.epsilon, clone.pgd_steps, clone.pgd_step_size, clone.seed) == (4.0, 3, 1.5, 7)
    assert type(clone.base) is type(trainer.base)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(lr_values=(0.1,)), "one more learning rate"),
        (dict(width="tiny"), "width must be one of"),
        (dict(strategy="tpu"), "strategy must be"),
        (dict(ema_decay=1.0), "ema_decay must be in"),
        (dict(awp_gamma=-0.1), "awp_gamma must be >= 0"),
    ],
)
def test_bad_config_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        _config(**bad).validate()


@pytest.mark.parametrize(
    "model",
    ["stand_in", pytest.param("resnet", marks=pytest.mark.slow)],
)
def test_mirrored_strategy_on_two_logical_cpus(tmp_path, model):
    # The strategy's bookkeeping on the small stand-in by default; the narrow ResNet under slow.
    patch = "training.models.madry_resnet = resnet_stand_in" if model == "stand_in" else ""
    script = f"""
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {ROOT!r})
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
from helpers import resnet_stand_in
from manifold_tf import data, training
{patch}
arrays = data.synthetic_arrays("train", num_examples=32)
config = training.TrainConfig(width="narrow", dataset="synthetic", adversarial=True, pgd_steps=1,
    batch_size=8, steps=2, lr_boundaries=(), lr_values=(0.05,), checkpoint_every=2, log_every=1,
    strategy="mirrored", attack="trades", awp_gamma=0.005, ema_decay=0.5)
model = training.train(config, {str(tmp_path / "m")!r}, train_arrays=arrays)
import numpy as np
assert all(np.all(np.isfinite(v.numpy())) for v in model.weights)
print("replicas", tf.distribute.MirroredStrategy().num_replicas_in_sync)
"""
    out = warm.run([sys.executable, "-c", script], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "replicas 2" in out.stdout
    assert os.path.exists(tmp_path / "m" / training.FINAL_WEIGHTS)


def test_weight_average_follows_its_recursion_and_survives_resume(tmp_path, arrays, stand_in):
    """The average is ``d_t * a + (1 - d_t) * w_t`` after each step, BN statistics included."""
    keras.utils.set_random_seed(0)
    config = _config(steps=3, checkpoint_every=1, ema_decay=0.5)
    trainer = training.build_trainer(config)
    average = [w.numpy() for w in trainer.base.weights]
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([w.numpy() for w in trainer.base.weights])

    ds = data.make_dataset(*arrays, batch_size=8, training=True, seed=0)
    trainer.fit(ds, epochs=1, steps_per_epoch=3, verbose=0, callbacks=[Record()])
    for t, weights in enumerate(seen, start=1):
        decay = min(0.5, (1 + t) / (10 + t))
        average = [decay * a + (1 - decay) * w for a, w in zip(average, weights, strict=True)]
    got = trainer.averaged_base().get_weights()
    assert any(
        not np.allclose(a, w) for a, w in zip(average, seen[-1], strict=True)
    )  # the average is not the last step
    for a, b in zip(average, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)

    keras.utils.set_random_seed(0)
    full = training.train(_config(ema_decay=0.9), str(tmp_path / "full"), train_arrays=arrays)
    keras.utils.set_random_seed(0)
    training.train(_config(steps=2, ema_decay=0.9), str(tmp_path / "split"), train_arrays=arrays)
    keras.utils.set_random_seed(99)
    resumed = training.train(
        _config(ema_decay=0.9), str(tmp_path / "split"), resume=True, train_arrays=arrays
    )
    for a, b in zip(
        _weights(full), _weights(resumed), strict=True
    ):  # final.keras holds the averaged weights
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_weight_perturbation_step_is_sgd_at_the_ascended_kernels():
    """One AWP step with plain SGD: ``w1 = w0 - lr * grad L(w0 + v)``, ``v = gamma ||w|| g/||g||``
    on kernels only, and the perturbation is gone from the weights afterwards."""
    base = small_conv(seed=2, shape=(32, 32, 3))
    x = np.random.default_rng(1).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    gamma, lr = 0.05, 0.1
    w0 = [w.numpy() for w in base.trainable_variables]

    def loss_grads(weights):
        for w, value in zip(base.trainable_variables, weights, strict=True):
            w.assign(value)
        with tf.GradientTape() as tape:
            logits = base(tf.constant(x), training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            )
        return [g.numpy() for g in tape.gradient(loss, base.trainable_variables)]

    g0 = loss_grads(w0)
    shifted = [
        w + gamma * np.linalg.norm(w) * g / np.linalg.norm(g) if w.ndim > 1 else w
        for w, g in zip(w0, g0, strict=True)
    ]
    expected = [w - lr * g for w, g in zip(w0, loss_grads(shifted), strict=True)]
    assert any(
        not np.allclose(a, b, atol=1e-6)
        for a, b in zip(expected, [w - lr * g for w, g in zip(w0, g0, strict=True)], strict=True)
    )  # AWP changes the step
    for w, value in zip(base.trainable_variables, w0, strict=True):
        w.assign(value)
    trainer = training.AdversarialTrainer(base, epsilon=0.0, pgd_steps=0, awp_gamma=gamma)
    trainer.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    trainer.train_on_batch(x, y)
    for got, want in zip(base.trainable_variables, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def test_strategy_and_workers_must_agree():
    from manifold_tf import distributed

    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        training._strategy("multi_worker", distributed.SINGLE)
    with pytest.raises(ValueError, match="--strategy=multi_worker"):
        training._strategy("default", distributed.Workers(0, 2))
    with pytest.raises(ValueError, match="ema_decay"):
        training.AdversarialTrainer(small_conv(seed=0, shape=(32, 32, 3)), ema_decay=1.5)
