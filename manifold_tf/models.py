"""Madry et al.'s CIFAR-10 ResNet (``MadryLab/cifar10_challenge`` ``model.py``) in Keras 3.

Eval-mode math is the TF1 model's exactly (see ``shared/docs/METHOD.md``): per-image
standardisation of the 0..255 input, a 3x3 stem conv, three stages of five residual units with
leaky ReLU (0.1) and batch norm (momentum 0.9, epsilon 1e-3), an average-pool + channel zero-pad
shortcut, a final BN + leaky ReLU + global average pool and a dense layer to 10 logits.

Layers are named after the TF1 variable scopes (``init_conv``, ``unit_1_0`` ... ``unit_3_4``,
``unit_last``, ``logit``), so ``manifold_tf.checkpoints`` maps checkpoint names to weights by a
pure name mapping.
"""

from __future__ import annotations

import keras
import tensorflow as tf

FILTERS = {"wide": (16, 160, 320, 640), "narrow": (16, 16, 32, 64)}
STRIDES = (1, 2, 2)
ACTIVATE_BEFORE_RESIDUAL = (True, False, False)
UNITS_PER_STAGE = 5
LEAKINESS = 0.1
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3
WEIGHT_DECAY = 2e-4  # Madry: 0.0002 * sum(l2_loss(DW)), l2_loss(w) = sum(w^2) / 2.


def _kernel_regularizer() -> keras.regularizers.Regularizer:
    # keras' L2(l) is l * sum(w^2); Madry's decay is 2e-4 * sum(w^2) / 2.
    return keras.regularizers.L2(WEIGHT_DECAY / 2)


def _conv(filters: int, stride: int, name: str) -> keras.layers.Conv2D:
    # Madry initialises DW with N(0, sqrt(2 / (k * k * out))): He-normal over fan-out.
    return keras.layers.Conv2D(
        filters,
        3,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
        kernel_regularizer=_kernel_regularizer(),
        name=name,
    )


def _bn(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _leaky(x: tf.Tensor) -> tf.Tensor:
    return tf.where(x < 0.0, LEAKINESS * x, x)


@keras.saving.register_keras_serializable(package="manifold_tf")
class PerImageStandardization(keras.layers.Layer):
    """``(x - mean) / max(std, 1 / sqrt(H * W * C))`` per image; ``[N, H, W, C]`` -> same shape.

    Input in pixels (0..255); output is unitless. The same as
    ``tf.image.per_image_standardization``.
    """

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.image.per_image_standardization(x)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="manifold_tf")
class ResidualUnit(keras.layers.Layer):
    """One pre-activation residual unit of Madry's ResNet.

    ``[N, H, W, in]`` -> ``[N, H/s, W/s, out]``.

    ``activate_before_residual=True`` shares the first BN + leaky ReLU between the residual branch
    and the shortcut (TF1 scope ``shared_activation``); otherwise the shortcut takes the raw input
    (``residual_only_activation``). When ``in != out`` the shortcut is average-pooled by the stride
    and zero-padded on the channel axis by ``(out - in) // 2`` on each side.
    """

    def __init__(
        self,
        in_filters: int,
        out_filters: int,
        stride: int,
        activate_before_residual: bool,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if in_filters <= 0 or out_filters < in_filters or (out_filters - in_filters) % 2:
            raise ValueError(
                f"need 0 < in_filters <= out_filters with an even difference; got "
                f"in_filters={in_filters}, out_filters={out_filters}."
            )
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2; got {stride}.")
        self.in_filters = int(in_filters)
        self.out_filters = int(out_filters)
        self.stride = int(stride)
        self.activate_before_residual = bool(activate_before_residual)
        self.pre_bn = _bn("pre_bn")
        self.conv1 = _conv(out_filters, stride, "conv1")
        self.bn2 = _bn("bn2")
        self.conv2 = _conv(out_filters, 1, "conv2")

    @property
    def pre_scope(self) -> str:
        """The TF1 scope of the first batch norm."""
        return "shared_activation" if self.activate_before_residual else "residual_only_activation"

    def build(self, input_shape):
        shape = tuple(input_shape)
        self.pre_bn.build(shape)
        self.conv1.build(shape)
        mid = self.conv1.compute_output_shape(shape)
        self.bn2.build(mid)
        self.conv2.build(mid)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if self.activate_before_residual:
            x = _leaky(self.pre_bn(x, training=training))
            orig = x
        else:
            orig = x
            x = _leaky(self.pre_bn(x, training=training))
        x = self.conv1(x)
        x = self.conv2(_leaky(self.bn2(x, training=training)))
        if self.in_filters != self.out_filters:
            if self.stride > 1:
                orig = tf.nn.avg_pool2d(orig, self.stride, self.stride, "VALID")
            pad = (self.out_filters - self.in_filters) // 2
            orig = tf.pad(orig, [[0, 0], [0, 0], [0, 0], [pad, pad]])
        return x + orig

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        s = self.stride
        return (
            n,
            None if h is None else -(-h // s),
            None if w is None else -(-w // s),
            self.out_filters,
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            in_filters=self.in_filters,
            out_filters=self.out_filters,
            stride=self.stride,
            activate_before_residual=self.activate_before_residual,
        )
        return config


@keras.saving.register_keras_serializable(package="manifold_tf")
class LeakyReLU(keras.layers.Layer):
    """``x if x >= 0 else 0.1 * x`` as in Madry's ``_relu``; any shape."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return _leaky(x)

    def compute_output_shape(self, input_shape):
        return input_shape


def madry_resnet(
    width: str = "narrow", num_classes: int = 10, name: str | None = None
) -> keras.Model:
    """Builds Madry et al.'s CIFAR-10 ResNet.

    Args:
      width: ``"wide"`` (filters 16/160/320/640, the released checkpoints) or ``"narrow"``
        (16/16/32/64).
      num_classes: number of logits.

    Returns:
      A functional ``keras.Model``: input ``[N, 32, 32, 3]`` float32 pixels in 0..255, output logits
      ``[N, num_classes]``. Call with ``training=True`` for batch statistics in BN (training).
    """
    if width not in FILTERS:
        raise ValueError(f"width must be one of {sorted(FILTERS)}; got {width!r}.")
    filters = FILTERS[width]
    inputs = keras.Input((32, 32, 3), dtype="float32", name="image")
    x = PerImageStandardization(name="standardize")(inputs)
    x = _conv(filters[0], 1, "init_conv")(x)
    for stage in range(3):
        for i in range(UNITS_PER_STAGE):
            first = i == 0
            x = ResidualUnit(
                filters[stage] if first else filters[stage + 1],
                filters[stage + 1],
                STRIDES[stage] if first else 1,
                ACTIVATE_BEFORE_RESIDUAL[stage] and first,
                name=f"unit_{stage + 1}_{i}",
            )(x)
    x = _bn("unit_last")(x)
    x = LeakyReLU(name="unit_last_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.VarianceScaling(1.0, "fan_in", "uniform"),
        kernel_regularizer=_kernel_regularizer(),
        name="logit",
    )(x)
    return keras.Model(inputs, logits, name=name or f"madry_resnet_{width}")


def tf1_variable_map(model: keras.Model) -> dict[str, keras.Variable]:
    """Maps each TF1 variable name of Madry's checkpoints to the Keras variable it fills.

    Works on any model built by :func:`madry_resnet`. Keys are exact TF1 names
    (``unit_1_0/shared_activation/BatchNorm/gamma``, ``logit/DW`` ...).
    """

    def bn(prefix: str, layer: keras.layers.BatchNormalization) -> dict:
        return {
            f"{prefix}/BatchNorm/gamma": layer.gamma,
            f"{prefix}/BatchNorm/beta": layer.beta,
            f"{prefix}/BatchNorm/moving_mean": layer.moving_mean,
            f"{prefix}/BatchNorm/moving_variance": layer.moving_variance,
        }

    names: dict[str, keras.Variable] = {}
    for layer in model.layers:
        if isinstance(layer, ResidualUnit):
            u = layer.name
            names.update(bn(f"{u}/{layer.pre_scope}", layer.pre_bn))
            names[f"{u}/sub1/conv1/DW"] = layer.conv1.kernel
            names.update(bn(f"{u}/sub2", layer.bn2))
            names[f"{u}/sub2/conv2/DW"] = layer.conv2.kernel
        elif layer.name == "init_conv":
            names["input/init_conv/DW"] = layer.kernel
        elif layer.name == "unit_last":
            names.update(bn("unit_last", layer))
        elif layer.name == "logit":
            names["logit/DW"] = layer.kernel
            names["logit/biases"] = layer.bias
    return names
