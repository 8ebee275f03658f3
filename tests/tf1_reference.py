"""An independent TF1 graph of Madry et al.'s CIFAR-10 ResNet, for tests and benchmarks only.

Written with ``tf.compat.v1`` from ``shared/docs/METHOD.md`` ("The base model") and the layout of
``MadryLab/cifar10_challenge/model.py``, without importing ``manifold_tf.models``: the Keras port is
checked against this graph, so the two must not share code. Batch norm is the eval-mode fused
kernel that ``tf.contrib.layers.batch_norm`` used (``fused_batch_norm(is_training=False)``), the
input is standardised image by image with ``map_fn`` as Madry did, and every variable lives under
the exact TF1 scope, so a ``Saver`` writes checkpoints named like the released ones.

Each graph lives in its own ``tf.Graph`` and ``tf.compat.v1.Session``, so this works inside a TF2
(eager) process.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

v1 = tf.compat.v1

FILTERS = {"wide": [16, 160, 320, 640], "narrow": [16, 16, 32, 64]}
GLOBAL_STEP = 70000  # the step of Madry's released adv_trained checkpoint


class ReferenceCheckpoint(NamedTuple):
    prefix: str  # checkpoint prefix, "<directory>/checkpoint-<global_step>"
    logits: np.ndarray  # [N, 10] reference logits for the given images


def _stride_arr(stride: int) -> list[int]:
    return [1, stride, stride, 1]


class _Builder:
    """Builds the eval-mode graph; ``random_stats`` draws non-trivial BN parameters and statistics.

    With ``random_stats`` the weights are drawn so that a wrong mapping of any single variable
    (gamma vs beta, mean vs variance, a swapped unit) changes the logits: BN statistics and affine
    parameters are far from their trivial initial values (0 / 1).
    """

    def __init__(self, random_stats: bool = True):
        self.random_stats = random_stats

    def _bn(self, x):
        channels = int(x.shape[-1])
        with v1.variable_scope("BatchNorm"):
            if self.random_stats:
                beta_init = v1.random_normal_initializer(stddev=0.2)
                gamma_init = v1.random_uniform_initializer(0.5, 1.5)
                mean_init = v1.random_normal_initializer(stddev=0.3)
                var_init = v1.random_uniform_initializer(0.5, 2.0)
            else:
                beta_init, gamma_init = v1.zeros_initializer(), v1.ones_initializer()
                mean_init, var_init = v1.zeros_initializer(), v1.ones_initializer()
            beta = v1.get_variable("beta", [channels], tf.float32, beta_init)
            gamma = v1.get_variable("gamma", [channels], tf.float32, gamma_init)
            mean = v1.get_variable(
                "moving_mean", [channels], tf.float32, mean_init, trainable=False
            )
            var = v1.get_variable(
                "moving_variance", [channels], tf.float32, var_init, trainable=False
            )
        y, _, _ = v1.nn.fused_batch_norm(
            x, gamma, beta, mean=mean, variance=var, epsilon=0.001, is_training=False
        )
        return y

    @staticmethod
    def _relu(x, leakiness=0.1):
        return tf.where(tf.less(x, 0.0), leakiness * x, x)

    @staticmethod
    def _conv(name, x, size, in_filters, out_filters, strides):
        with v1.variable_scope(name):
            n = size * size * out_filters
            kernel = v1.get_variable(
                "DW",
                [size, size, in_filters, out_filters],
                tf.float32,
                initializer=v1.random_normal_initializer(stddev=np.sqrt(2.0 / n)),
            )
            return tf.nn.conv2d(x, kernel, strides, padding="SAME")

    def _residual(self, x, in_filter, out_filter, stride, activate_before_residual):
        if activate_before_residual:
            with v1.variable_scope("shared_activation"):
                x = self._relu(self._bn(x))
                orig_x = x
        else:
            with v1.variable_scope("residual_only_activation"):
                orig_x = x
                x = self._relu(self._bn(x))
        with v1.variable_scope("sub1"):
            x = self._conv("conv1", x, 3, in_filter, out_filter, stride)
        with v1.variable_scope("sub2"):
            x = self._relu(self._bn(x))
            x = self._conv("conv2", x, 3, out_filter, out_filter, [1, 1, 1, 1])
        with v1.variable_scope("sub_add"):
            if in_filter != out_filter:
                orig_x = tf.nn.avg_pool2d(orig_x, stride, stride, "VALID")
                pad = (out_filter - in_filter) // 2
                orig_x = tf.pad(orig_x, [[0, 0], [0, 0], [0, 0], [pad, pad]])
            return x + orig_x

    def logits(self, x_input, width: str):
        """``x_input`` ``[N, 32, 32, 3]`` pixels 0..255 -> logits ``[N, 10]``."""
        filters = FILTERS[width]
        with v1.variable_scope("input"):
            standardized = tf.map_fn(tf.image.per_image_standardization, x_input)
            x = self._conv("init_conv", standardized, 3, 3, 16, _stride_arr(1))
        strides, activate = [1, 2, 2], [True, False, False]
        for stage in range(3):
            for i in range(5):
                with v1.variable_scope(f"unit_{stage + 1}_{i}"):
                    if i == 0:
                        x = self._residual(
                            x,
                            filters[stage],
                            filters[stage + 1],
                            _stride_arr(strides[stage]),
                            activate[stage],
                        )
                    else:
                        x = self._residual(
                            x, filters[stage + 1], filters[stage + 1], _stride_arr(1), False
                        )
        with v1.variable_scope("unit_last"):
            x = self._relu(self._bn(x))
            x = tf.reduce_mean(x, [1, 2])
        with v1.variable_scope("logit"):
            w = v1.get_variable(
                "DW", [int(x.shape[-1]), 10], tf.float32, v1.glorot_uniform_initializer()
            )
            bias_init = (
                v1.random_normal_initializer(stddev=0.1)
                if self.random_stats
                else v1.zeros_initializer()
            )
            b = v1.get_variable("biases", [10], tf.float32, bias_init)
            return tf.compat.v1.nn.xw_plus_b(x, w, b)


def _build_graph(
    width: str, seed: int, random_stats: bool = True, *, loss: bool = False, xla: bool = False
):
    """A fresh graph: ``(graph, x, y, logits, grad)``; ``grad`` (d summed xent / dx) when ``loss``.

    ``xla`` builds the model and its gradient inside ``jit_scope``, which marks every op for XLA
    compilation; unlike ``global_jit_level`` auto-clustering this needs no flag on CPU.
    """
    if width not in FILTERS:
        raise ValueError(f"width must be one of {sorted(FILTERS)}; got {width!r}.")
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(seed)
        x = v1.placeholder(tf.float32, [None, 32, 32, 3], name="x_input")
        y = v1.placeholder(tf.int64, [None], name="y_input")
        with v1.xla.experimental.jit_scope() if xla else contextlib.nullcontext():
            logits = _Builder(random_stats).logits(x, width)
            grad = None
            if loss:
                xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                (grad,) = tf.gradients(tf.reduce_sum(xent), [x])
    return graph, x, y, logits, grad


def build_reference_checkpoint(
    width: str,
    directory: str,
    seed: int,
    images: np.ndarray,
    *,
    global_step: int = GLOBAL_STEP,
    num_momentum_slots: int = 4,
) -> ReferenceCheckpoint:
    """Builds the reference graph with random non-trivial weights, saves it and returns its logits.

    The checkpoint mimics a released one: ``<directory>/checkpoint-<global_step>.{index,data-*}``,
    a ``checkpoint`` state file, an int64 ``global_step`` and ``<var>/Momentum`` optimizer slots for
    the first ``num_momentum_slots`` trainable variables (all of them with ``-1``).

    Args:
      width: ``"narrow"`` or ``"wide"``.
      directory: where to save (created when absent).
      seed: graph-level seed of every initializer.
      images: ``[N, 32, 32, 3]`` float32 pixels in 0..255.

    Returns:
      ``ReferenceCheckpoint(prefix, logits [N, 10])``.
    """
    graph, x, _, logits, _ = _build_graph(width, seed)
    with graph.as_default():
        trainable = v1.trainable_variables()
        slots = trainable if num_momentum_slots < 0 else trainable[:num_momentum_slots]
        for v in slots:
            v1.get_variable(
                f"{v.op.name}/Momentum",
                v.shape,
                tf.float32,
                v1.random_normal_initializer(),
                trainable=False,
            )
        v1.get_variable(
            "global_step", [], tf.int64, v1.constant_initializer(global_step), trainable=False
        )
        saver = v1.train.Saver(v1.global_variables())  # weights, slots and global_step
        init = v1.global_variables_initializer()
    os.makedirs(directory, exist_ok=True)
    with v1.Session(graph=graph) as sess:
        sess.run(init)
        prefix = saver.save(sess, os.path.join(directory, "checkpoint"), global_step=global_step)
        out = sess.run(logits, {x: np.asarray(images, np.float32)})
    return ReferenceCheckpoint(prefix, out)


def write_checkpoint(
    values: dict[str, np.ndarray],
    directory: str,
    global_step: int | None = GLOBAL_STEP,
    state_path: str | None = None,
) -> str:
    """Writes ``{tf1_name: array}`` as a TF1 (V2-format) checkpoint; returns the prefix.

    Used to make deliberately broken checkpoints (a variable dropped, swapped or added, wrong
    shapes). ``SaveV2`` writes the same bundle as a ``Saver`` without building a graph full of
    constants. The ``checkpoint`` state file names ``state_path`` (default: the absolute prefix;
    Madry's zips may hold a path relative to the training job's directory instead).
    """
    os.makedirs(directory, exist_ok=True)
    name = "model.ckpt" if global_step is None else f"checkpoint-{global_step}"
    prefix = os.path.join(directory, name)
    names = sorted(values)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.convert_to_tensor(values[n]) for n in names],
    )
    v1.train.update_checkpoint_state(directory, state_path or prefix)
    return prefix


def reference_variable_shapes(width: str) -> dict[str, list[int]]:
    """``{tf1_name: shape}`` of the model variables (no slots, no global_step); builds no values."""
    graph, _, _, _, _ = _build_graph(width, 0)
    with graph.as_default():
        return {v.op.name: v.shape.as_list() for v in v1.global_variables()}


def read_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint, by name."""
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


class ReferenceRunner(NamedTuple):
    forward: Callable[[], np.ndarray]  # runs the logits [N, 10] on the fixed batch
    grad: Callable[[], np.ndarray]  # runs d sum(xent) / d images, [N, 32, 32, 3]
    close: Callable[[], None]  # closes the session


def make_reference_runner(
    width: str, images: np.ndarray, labels: np.ndarray, *, xla: bool = False, seed: int = 0
) -> ReferenceRunner:
    """An open session on the reference graph with random weights, fed one fixed batch.

    Args:
      images: ``[N, 32, 32, 3]`` pixels in 0..255; labels: ``[N]`` ints in 0..9.
      xla: compile the model and its gradient with XLA (``jit_scope``).
    """
    graph, x, y, logits, grad = _build_graph(width, seed, loss=True, xla=xla)
    with graph.as_default():
        init = v1.global_variables_initializer()
    feed = {x: np.asarray(images, np.float32), y: np.asarray(labels, np.int64)}
    sess = v1.Session(graph=graph)
    sess.run(init)
    return ReferenceRunner(
        forward=lambda: sess.run(logits, feed), grad=lambda: sess.run(grad, feed), close=sess.close
    )


def time_reference(
    width: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    warmup: int = 2,
    iters: int = 5,
    repeats: int = 3,
    xla: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Times the reference graph: forward, and forward + gradient of the summed cross-entropy wrt x.

    Args:
      images: ``[N, 32, 32, 3]`` pixels; labels: ``[N]`` ints.
      warmup: untimed runs of each op; ``iters`` runs per timed repeat; ``repeats`` timed repeats.
      xla: compile the graph with XLA (``jit_scope``).

    Returns:
      ``{"forward_s": ..., "grad_s": ...}``: median seconds per batch over the repeats.
    """
    runner = make_reference_runner(width, images, labels, xla=xla, seed=seed)
    result = {}
    try:
        for key, fn in (("forward_s", runner.forward), ("grad_s", runner.grad)):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                times.append((time.perf_counter() - start) / iters)
            result[key] = float(np.median(times))
    finally:
        runner.close()
    return result
