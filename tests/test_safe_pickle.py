"""Untrusted files: crafted CIFAR-10 batches never run code, .keras files stay in Keras' safe mode,
TF1 checkpoints of the wrong shape or dtype are refused naming the variable.

Each crafted batch's payload would create a marker file if it ran: the test checks the marker is
absent and the error names the file and the refused global.
"""

from __future__ import annotations

import os
import pickle
import sys

import keras
import numpy as np
import pytest

import warm
from helpers import ROOT, subprocess_env
from manifold_tf import data, safe_pickle
from manifold_tf.checkpoints import load_model_weights, load_tf1_checkpoint
from manifold_tf.models import madry_resnet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tf1_reference  # noqa: E402  (test helper beside this file)


class _SystemPayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalPayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


class ForeignDict(dict):
    """A dict subclass from another module (this test's): a constructor the format never uses."""

    def __setitem__(self, key, value):  # unpickling fills a dict subclass through this
        if key == b"marker":
            open(value, "w").close()
        super().__setitem__(key, value)


def _batch(n: int = 2) -> dict:
    rng = np.random.default_rng(0)
    return {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def _folder(tmp_path, payload_batch) -> str:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    (folder / "test_batch").write_bytes(pickle.dumps(payload_batch, protocol=2))
    return str(tmp_path)


def _payloads(marker: str) -> dict:
    batch = _batch()
    foreign = ForeignDict(batch)
    dict.__setitem__(foreign, b"marker", marker)
    return {
        "os.system": {**batch, b"labels": _SystemPayload(marker)},
        "builtins.eval": {**batch, b"data": _EvalPayload(marker)},
        "ForeignDict": foreign,
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "ForeignDict"])
def test_crafted_batch_is_refused_and_its_code_never_runs(tmp_path, kind):
    marker = str(tmp_path / "payload_ran")
    root = _folder(tmp_path, _payloads(marker)[kind])
    # The control: plain pickle would run it (proves the payload is live).
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "rb") as f:
        pickle.load(f, encoding="bytes")
    assert os.path.exists(marker), "the payload is not live: the test would prove nothing"
    os.remove(marker)
    with pytest.raises(ValueError) as info:
        data.load_cifar10_arrays("test", root)
    message = str(info.value)
    assert not os.path.exists(marker), "the crafted file's code ran"
    assert os.path.join(root, "cifar-10-batches-py", "test_batch") in message
    assert "refused to unpickle global" in message
    expected = {
        "os.system": ("posix.system", "os.system"),
        "builtins.eval": ("builtins.eval", "__builtin__.eval"),
        "ForeignDict": ("ForeignDict",),
    }[kind]
    assert any(name in message for name in expected), message
    assert isinstance(info.value, safe_pickle.RefusedGlobal)


def test_the_real_sample_reads_the_same_as_plain_pickle(cifar_sample_dir):
    folder = os.path.join(cifar_sample_dir, "cifar-10-batches-py")
    for name in ("test_batch", "data_batch_1", "batches.meta"):
        path = os.path.join(folder, name)
        ours = safe_pickle.load(path)
        with open(path, "rb") as f:
            theirs = pickle.load(f, encoding="bytes")
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, np.ndarray):
                assert ours[key].dtype == value.dtype
                np.testing.assert_array_equal(ours[key], value)
            else:
                assert ours[key] == value


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_pickle_protocol_of_a_batch_is_read(tmp_path, protocol):
    batch = _batch(3)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    images, labels = data.load_cifar10_arrays("test", str(tmp_path))
    assert images.shape == (3, 32, 32, 3) and labels.tolist() == batch[b"labels"]


@pytest.mark.parametrize(
    "value, refused",
    [
        (np.array([object()], dtype=object), "numpy.dtype('O8')"),
        (np.zeros(2, dtype=[("a", "u1")]), "numpy.dtype('V1')"),
        (np.ma.array([1, 2]), "numpy.ma.core._mareconstruct"),
        (np.matrix([[1]]), "numpy.matrix"),
    ],
)
def test_numpy_objects_beyond_plain_arrays_are_refused(value, refused):
    for protocol in (2, 5):
        with pytest.raises(safe_pickle.RefusedGlobal) as info:
            safe_pickle.loads(pickle.dumps(value, protocol=protocol), path="crafted.pkl")
        assert info.value.name == refused and "crafted.pkl" in str(info.value)


def test_direct_ndarray_call_and_huge_shapes_are_refused():
    # numpy.ndarray((2**40,)) by REDUCE: an allocation bomb the format never uses.
    crafted = b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x01\x85R."
    with pytest.raises(safe_pickle.RefusedGlobal, match="numpy.ndarray"):
        safe_pickle.loads(crafted)
    bomb = (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        b"\x8a\x05\x00\x00\x00\x00\x01\x85C\x01b\x87R."
    )
    with pytest.raises(safe_pickle.RefusedGlobal, match="shape"):
        safe_pickle.loads(bomb)


@pytest.mark.parametrize(
    "field, value, message",
    [
        (b"labels", [0, 10], "labels must be integers in 0..9"),
        (b"labels", [0.5, 1.0], "labels must be integers"),
        (b"data", np.full((2, 3072), 300, np.int64), "data must be integers in 0..255"),
        (b"data", np.full((2, 3072), np.nan), "data must be integers"),
        (b"labels", [0], "N labels"),
    ],
)
def test_malformed_batch_values_are_named(tmp_path, field, value, message):
    root = _folder(tmp_path, {**_batch(), field: value})
    with pytest.raises(ValueError, match=message):
        data.load_cifar10_arrays("test", root)


def test_crafted_batch_through_the_command_line(tmp_path):
    marker = str(tmp_path / "payload_ran")
    root = _folder(tmp_path, _payloads(marker)["os.system"])
    done = warm.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            "--mode=accuracy",
            "--dataset=cifar10",
            f"--data_dir={root}",
            f"--output_dir={tmp_path / 'out'}",
        ],
        env=subprocess_env(),
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "test_batch: refused to unpickle global" in done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.exists(marker)


# --------------------------------------------------------------------------------------------------
# Keras files and TF1 checkpoints


def test_keras_file_with_a_lambda_layer_is_refused(tmp_path):
    marker = str(tmp_path / "lambda_ran")

    # A lambda is saved as its bytecode (a named function only by name): loading it would run
    # whatever the file's author wrote.
    inputs = keras.Input((32, 32, 3))
    layer = keras.layers.Lambda(lambda x: (open(marker, "w").close(), x)[1])
    model = keras.Model(inputs, layer(inputs))
    if os.path.exists(marker):
        os.remove(marker)  # building the model traced the Lambda once
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    with pytest.raises(ValueError) as info:
        load_model_weights(path)
    message = str(info.value)
    assert path in message and "Lambda" in message and "safe_mode" in message, message
    assert not os.path.exists(marker)


def test_tf1_checkpoint_of_the_wrong_dtype_is_refused_naming_the_variable(tmp_path):
    model = madry_resnet("narrow")
    values = {
        name: np.zeros(v.shape, np.float32) for name, v in tf1_reference_variable_map(model).items()
    }
    values["logit/DW"] = np.zeros(values["logit/DW"].shape, np.int32)
    values["unit_1_0/sub1/conv1/DW"] = np.zeros([3, 3, 16, 17], np.float32)
    prefix = tf1_reference.write_checkpoint(values, str(tmp_path))
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError) as info:
        load_tf1_checkpoint(model, prefix)
    message = str(info.value)
    assert "logit/DW: checkpoint dtype int32, expected float" in message
    assert "unit_1_0/sub1/conv1/DW: checkpoint [3, 3, 16, 17] vs model [3, 3, 16, 16]" in message
    for b, w in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(b, w)  # nothing assigned


def tf1_reference_variable_map(model):
    from manifold_tf.checkpoints import tf1_variable_map

    return tf1_variable_map(model)
