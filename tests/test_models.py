"""Tests of the Keras Madry ResNet: shapes, serialisation, the TF1 name map, input checks."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import assert_config_round_trip, assert_saving_round_trip, uniform_images
from manifold_tf import models
from manifold_tf.validation import check_logits, validate_images


@pytest.fixture(scope="module")
def narrow():
    keras.utils.set_random_seed(1)
    return models.madry_resnet("narrow")


def _images(n=3, seed=0):
    return uniform_images(n, (32, 32, 3), seed)


def test_output_is_logits_of_shape_n_by_10(narrow):
    out = narrow(_images())
    assert out.shape == (3, 10)
    assert out.dtype == tf.float32


def test_keras_save_and_load_roundtrip_gives_identical_outputs(narrow, tmp_path):
    # Non-trivial BN statistics so that a mis-restored moving average would show.
    for v in narrow.non_trainable_variables:
        v.assign(np.random.default_rng(2).uniform(0.5, 1.5, v.shape).astype(np.float32))
    assert_saving_round_trip(narrow, _images(), tmp_path, atol=0)


@pytest.mark.parametrize(
    "layer",
    [
        models.PerImageStandardization(),
        models.LeakyReLU(),
        models.ResidualUnit(16, 32, 2, False, name="u"),
    ],
)
def test_custom_layers_config_roundtrip_through_json(layer):
    assert_config_round_trip(layer, strict=True)


def test_standardization_matches_formula():
    x = _images(2)
    flat = x.reshape(2, -1)
    expected = (flat - flat.mean(1, keepdims=True)) / np.maximum(
        flat.std(1, keepdims=True), 1 / np.sqrt(3072)
    )
    got = models.PerImageStandardization()(x).numpy().reshape(2, -1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # A constant image has std 0: the floor 1/sqrt(3072) keeps it finite.
    const = np.full((1, 32, 32, 3), 7.0, np.float32)
    assert np.all(models.PerImageStandardization()(const).numpy() == 0)


def test_leaky_relu_slope():
    x = tf.constant([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(models.LeakyReLU()(x).numpy(), [-0.2, 0.0, 3.0])


def test_residual_unit_shortcut_is_avgpool_and_channel_zero_pad():
    unit = models.ResidualUnit(2, 6, 2, activate_before_residual=False)
    x = tf.random.stateless_normal((1, 4, 4, 2), seed=[0, 1])
    unit(x)
    # With zero conv kernels the residual branch vanishes and only the shortcut is left.
    unit.conv2.kernel.assign(tf.zeros_like(unit.conv2.kernel))
    out = unit(x).numpy()
    pooled = tf.nn.avg_pool2d(x, 2, 2, "VALID").numpy()
    np.testing.assert_allclose(out[..., 2:4], pooled, rtol=1e-6)
    assert np.all(out[..., :2] == 0) and np.all(out[..., 4:] == 0)


def test_tf1_variable_map_covers_every_weight_with_madry_names(narrow):
    names = models.tf1_variable_map(narrow)
    assert len(names) == 157  # 1 + 15 * 10 + 4 + 2
    mapped = {id(v) for v in names.values()}
    assert mapped == {id(v) for v in narrow.weights}
    for expected in [
        "input/init_conv/DW",
        "unit_1_0/shared_activation/BatchNorm/gamma",
        "unit_1_1/residual_only_activation/BatchNorm/moving_variance",
        "unit_2_0/residual_only_activation/BatchNorm/beta",
        "unit_3_4/sub2/conv2/DW",
        "unit_last/BatchNorm/moving_mean",
        "logit/DW",
        "logit/biases",
    ]:
        assert expected in names


def test_wide_model_filter_counts():
    wide = models.madry_resnet("wide")
    names = models.tf1_variable_map(wide)
    assert tuple(names["unit_1_0/sub1/conv1/DW"].shape) == (3, 3, 16, 160)
    assert tuple(names["unit_3_4/sub2/conv2/DW"].shape) == (3, 3, 640, 640)
    assert tuple(names["logit/DW"].shape) == (640, 10)


def test_weight_decay_matches_madry(narrow):
    # Madry: 0.0002 * sum over DW of sum(w^2) / 2.
    kernels = [v for k, v in models.tf1_variable_map(narrow).items() if k.endswith("DW")]
    expected = 0.0002 * sum(float(tf.reduce_sum(tf.square(k))) / 2 for k in kernels)
    narrow(_images(1))
    np.testing.assert_allclose(float(tf.add_n(narrow.losses)), expected, rtol=1e-4)


def test_bad_width_is_rejected():
    with pytest.raises(ValueError, match="width must be one of"):
        models.madry_resnet("huge")


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((32, 32, 3), np.float32), "batch axis"),
        (np.zeros((2, 28, 28, 3), np.float32), r"images of shape \(32, 32, 3\)"),
        (np.zeros((2, 32, 32, 3), np.uint8), "floating-point"),
        (np.full((2, 32, 32, 3), 300.0, np.float32), r"\[0, 255\]"),
        (np.full((2, 32, 32, 3), -1.0, np.float32), r"\[0, 255\]"),
        (np.full((2, 32, 32, 3), np.nan, np.float32), r"\[0, 255\]"),
    ],
)
def test_validate_images_names_the_problem(x, message):
    with pytest.raises(ValueError, match=message):
        validate_images(x)


def test_unit_interval_images_warn_but_pixel_images_do_not():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="multiply|Multiply"):
        validate_images(rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_images(rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32))
        validate_images(np.zeros((2, 32, 32, 3), np.float32))  # a black image is legal and silent


def test_check_logits_rejects_a_softmax_model(narrow):
    probs = keras.Sequential([narrow, keras.layers.Softmax()])
    with pytest.raises(ValueError, match="probabilities"):
        check_logits(probs, tf.constant(_images(2)))
    assert check_logits(narrow, tf.constant(_images(2))).shape == (2, 10)
