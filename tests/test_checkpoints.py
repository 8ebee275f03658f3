"""TF1 checkpoint loading, width detection, Keras-file loading and the model download.

The Keras port is compared with an independent TF1 graph (``tests/tf1_reference.py``) whose random
checkpoint it loads: logits must agree to a relative error of 1e-4, also after removing the part
shared by every image (random weights give logits dominated by a constant), so the comparison
checks the input-dependent part too. A swapped-variable control shows the comparison has power.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from manifold_tf import checkpoints
from manifold_tf.checkpoints import (
    ModelDownloadError,
    detect_width,
    fetch_madry_model,
    load_model_weights,
    load_tf1_checkpoint,
)
from manifold_tf.models import madry_resnet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tf1_reference  # noqa: E402  (test helper beside this file)

RTOL = 1e-4
SEED = 3


def _images(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 32, 32, 3]`` pixels: half smooth (upsampled 4x4) images, half uniform noise."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (n - n // 2, 4, 4, 3)).astype(np.float32)
    smooth = tf.clip_by_value(tf.image.resize(low, (32, 32), "bicubic"), 0.0, 255.0).numpy()
    noise = rng.uniform(0, 255, (n // 2, 32, 32, 3)).astype(np.float32)
    return np.concatenate([smooth, noise])


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _assert_matches(logits: np.ndarray, reference: np.ndarray) -> None:
    assert _rel_err(logits, reference) <= RTOL
    # Centered: the per-image part of the logits, small next to the shared constant.
    centered, centered_ref = logits - logits.mean(0), reference - reference.mean(0)
    assert _rel_err(centered, centered_ref) <= RTOL
    np.testing.assert_array_equal(logits.argmax(1), reference.argmax(1))
    np.testing.assert_array_equal(centered.argmax(1), centered_ref.argmax(1))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return _images(16)


@pytest.fixture(scope="module")
def narrow_ref(tmp_path_factory, images) -> tf1_reference.ReferenceCheckpoint:
    directory = tmp_path_factory.mktemp("narrow_ref")
    return tf1_reference.build_reference_checkpoint("narrow", str(directory), SEED, images)


@pytest.fixture(scope="module")
def narrow_values(narrow_ref) -> dict:
    return tf1_reference.read_checkpoint(narrow_ref.prefix)


# --------------------------------------------------------------------------------------------------
# Numerical agreement with the TF1 graph


def test_narrow_matches_tf1_reference(narrow_ref, images):
    model = madry_resnet("narrow")
    summary = load_tf1_checkpoint(model, narrow_ref.prefix)
    assert summary["prefix"] == narrow_ref.prefix
    assert summary["global_step"] == tf1_reference.GLOBAL_STEP
    assert summary["num_loaded"] == len(tf1_reference.reference_variable_shapes("narrow"))
    assert summary["num_ignored"] == 5  # 4 Momentum slots + global_step
    _assert_matches(model(images, training=False).numpy(), narrow_ref.logits)


def test_load_from_directory_and_index_file(narrow_ref, images):
    for path in (os.path.dirname(narrow_ref.prefix), narrow_ref.prefix + ".index"):
        model = madry_resnet("narrow")
        assert load_tf1_checkpoint(model, path)["prefix"] == narrow_ref.prefix
        _assert_matches(model(images, training=False).numpy(), narrow_ref.logits)


def test_swapped_variables_are_detected_by_the_comparison(narrow_values, images, tmp_path):
    # Control: the comparison must fail when one BN's statistics are swapped.
    values = dict(narrow_values)
    mean, var = "unit_3_4/sub2/BatchNorm/moving_mean", "unit_3_4/sub2/BatchNorm/moving_variance"
    values[mean], values[var] = np.abs(values[var]), np.abs(values[mean]) + 0.5
    prefix = tf1_reference.write_checkpoint(values, str(tmp_path))
    model = madry_resnet("narrow")
    load_tf1_checkpoint(model, prefix)
    reference = madry_resnet("narrow")
    load_tf1_checkpoint(
        reference, tf1_reference.write_checkpoint(narrow_values, str(tmp_path / "ok"))
    )
    assert _rel_err(model(images).numpy(), reference(images).numpy()) > 1e-2


@pytest.mark.slow
def test_wide_matches_tf1_reference(tmp_path, images):
    x = images[:8]
    ref = tf1_reference.build_reference_checkpoint("wide", str(tmp_path), SEED, x)
    assert detect_width(ref.prefix) == "wide"
    model = load_model_weights(str(tmp_path))
    assert model.name == "madry_resnet_wide"
    _assert_matches(model(x, training=False).numpy(), ref.logits)


# --------------------------------------------------------------------------------------------------
# Strictness


@pytest.fixture(scope="module")
def fake_wide_prefix(tmp_path_factory) -> str:
    """A checkpoint with the wide model's names and shapes (zeros: only shapes matter here)."""
    shapes = tf1_reference.reference_variable_shapes("wide")
    values = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    values["global_step"] = np.array(70000, np.int64)
    return tf1_reference.write_checkpoint(values, str(tmp_path_factory.mktemp("wide_zeros")))


def test_detect_width(narrow_ref, fake_wide_prefix):
    assert detect_width(narrow_ref.prefix) == "narrow"
    assert detect_width(os.path.dirname(narrow_ref.prefix)) == "narrow"
    assert detect_width(fake_wide_prefix) == "wide"


def test_wide_checkpoint_into_narrow_model_lists_every_mismatch(fake_wide_prefix):
    model = madry_resnet("narrow")
    with pytest.raises(ValueError) as info:
        load_tf1_checkpoint(model, fake_wide_prefix)
    message = str(info.value)
    assert "shape mismatch" in message
    assert "unit_1_0/sub1/conv1/DW: checkpoint [3, 3, 16, 160] vs model [3, 3, 16, 16]" in message
    assert "unit_3_4/sub2/conv2/DW" in message  # all of them, not only the first
    assert "logit/DW: checkpoint [640, 10] vs model [64, 10]" in message
    assert 'width="wide"' in message


def test_missing_and_unexpected_variables_are_all_listed(narrow_values, tmp_path):
    values = dict(narrow_values)
    del values["logit/biases"]
    del values["unit_2_3/sub2/BatchNorm/gamma"]
    values["unit_4_0/sub1/conv1/DW"] = np.zeros([3, 3, 64, 64], np.float32)
    values["logit/DW/Adam"] = np.zeros([64, 10], np.float32)  # optimizer slot: ignored
    values["beta1_power"] = np.float32(0.9)  # Adam's: ignored
    prefix = tf1_reference.write_checkpoint(values, str(tmp_path))

    model = madry_resnet("narrow")
    before = [v.numpy().copy() for v in model.weights]
    with pytest.raises(ValueError) as info:
        load_tf1_checkpoint(model, prefix)
    message = str(info.value)
    assert "2 model variable(s) missing from the checkpoint" in message
    assert "logit/biases" in message and "unit_2_3/sub2/BatchNorm/gamma" in message
    assert "1 checkpoint variable(s) the model does not have" in message
    assert "unit_4_0/sub1/conv1/DW [3, 3, 64, 64]" in message
    assert "Adam" not in message and "beta1_power" not in message
    # Nothing is assigned when the load fails.
    for b, v in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(b, v.numpy())


def test_checkpoint_without_global_step_or_slots(narrow_values, narrow_ref, images, tmp_path):
    values = {k: v for k, v in narrow_values.items() if k != "global_step" and "Momentum" not in k}
    prefix = tf1_reference.write_checkpoint(values, str(tmp_path), global_step=None)
    model = madry_resnet("narrow")
    summary = load_tf1_checkpoint(model, prefix)
    assert summary["global_step"] is None and summary["num_ignored"] == 0
    _assert_matches(model(images).numpy(), narrow_ref.logits)


def test_missing_paths_raise(tmp_path):
    model = madry_resnet("narrow")
    (tmp_path / "notes.txt").write_text("no checkpoint here")
    with pytest.raises(FileNotFoundError, match=r"no TF1 checkpoint in directory .*notes\.txt"):
        load_tf1_checkpoint(model, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoint-123.index"):
        load_tf1_checkpoint(model, str(tmp_path / "checkpoint-123"))


# --------------------------------------------------------------------------------------------------
# load_model_weights


def test_load_model_weights_detects_formats(narrow_ref, images, tmp_path):
    model = load_model_weights(narrow_ref.prefix)  # TF1 prefix, width detected
    assert model.name == "madry_resnet_narrow"
    _assert_matches(model(images).numpy(), narrow_ref.logits)
    expected = model(images).numpy()

    keras_path = str(tmp_path / "model.keras")
    model.save(keras_path)
    np.testing.assert_allclose(load_model_weights(keras_path)(images).numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="holds a narrow model; width='wide'"):
        load_model_weights(keras_path, width="wide")

    h5_path = str(tmp_path / "model.weights.h5")
    model.save_weights(h5_path)
    np.testing.assert_allclose(load_model_weights(h5_path)(images).numpy(), expected, rtol=1e-6)

    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model_weights(str(tmp_path / "absent.keras"))
    other = tmp_path / "weights.npz"
    other.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="unknown model format"):
        load_model_weights(str(other))
    with pytest.raises(ValueError, match="width must be one of"):
        load_model_weights(narrow_ref.prefix, width="medium")


# --------------------------------------------------------------------------------------------------
# fetch_madry_model


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release_zip(narrow_ref, tmp_path_factory) -> tuple[str, str]:
    """A zip laid out like Madry's release: ``models/adv_trained/checkpoint-70000.*``.

    Its ``checkpoint`` state file names the prefix relative to the training job's directory, as a
    TF1 ``Saver`` run from the repository root would; the loader must still find the files.
    """
    directory = os.path.dirname(narrow_ref.prefix)
    files = {}
    for name in os.listdir(directory):
        if name.startswith("checkpoint-"):
            with open(os.path.join(directory, name), "rb") as f:
                files[f"models/adv_trained/{name}"] = f.read()
    files["models/adv_trained/checkpoint"] = (
        b'model_checkpoint_path: "models/adv_trained/checkpoint-70000"\n'
        b'all_model_checkpoint_paths: "models/adv_trained/checkpoint-70000"\n'
    )
    path = tmp_path_factory.mktemp("release") / "adv_trained.zip"
    data = _zip_bytes(files)
    path.write_bytes(data)
    return str(path), hashlib.sha256(data).hexdigest()


def _url(path) -> str:
    return "file://" + os.path.abspath(str(path))


def _leftovers(cache_dir) -> list[str]:
    return [n for n in os.listdir(cache_dir) if n.startswith(".")]


def test_fetch_end_to_end_then_cached(release_zip, narrow_ref, images, tmp_path, capsys):
    zip_path, digest = release_zip
    cache = tmp_path / "cache"
    prefix = fetch_madry_model("adv_trained", str(cache), url=_url(zip_path), sha256=digest)
    assert prefix == str(cache / "adv_trained" / "checkpoint-70000")
    captured = capsys.readouterr()
    assert "Downloading data from" in captured.out + captured.err  # keras.utils.get_file's progress
    assert _leftovers(cache) == []
    model = load_model_weights(prefix)
    _assert_matches(model(images).numpy(), narrow_ref.logits)

    # Cached: a URL that does not exist is never opened.
    again = fetch_madry_model("adv_trained", str(cache), url=_url(tmp_path / "gone.zip"))
    assert again == prefix
    # overwrite=True downloads again.
    assert (
        fetch_madry_model("adv_trained", str(cache), url=_url(zip_path), overwrite=True) == prefix
    )
    assert _leftovers(cache) == []


def test_fetch_rejects_sha256_mismatch(release_zip, tmp_path):
    zip_path, _ = release_zip
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        fetch_madry_model("adv_trained", str(cache), url=_url(zip_path), sha256="0" * 64)
    assert not (cache / "adv_trained").exists()
    assert _leftovers(cache) == []


def test_fetch_rejects_corrupt_zips(release_zip, tmp_path):
    zip_path, _ = release_zip
    data = open(zip_path, "rb").read()
    cache = tmp_path / "cache"

    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt zip"):
        fetch_madry_model("adv_trained", str(cache), url=_url(truncated))

    # A flipped byte inside a stored member: the central directory is intact, the CRC is not.
    files = {
        "models/adv_trained/checkpoint-1.index": b"x" * 1000,
        "models/adv_trained/checkpoint": b"",
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    flipped = bytearray(buffer.getvalue())
    flipped[flipped.index(b"x" * 1000) + 500] ^= 0xFF
    bad_crc = tmp_path / "bad_crc.zip"
    bad_crc.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="CRC"):
        fetch_madry_model("adv_trained", str(cache), url=_url(bad_crc))

    not_model = tmp_path / "other.zip"
    not_model.write_bytes(_zip_bytes({"README.md": b"hello"}))
    with pytest.raises(ValueError, match="holds no Madry checkpoint"):
        fetch_madry_model("adv_trained", str(cache), url=_url(not_model))

    unsafe = tmp_path / "unsafe.zip"
    unsafe.write_bytes(
        _zip_bytes({"../evil/checkpoint-1.index": b"", "models/adv_trained/checkpoint": b""})
    )
    with pytest.raises(ValueError, match="unsafe path"):
        fetch_madry_model("adv_trained", str(cache), url=_url(unsafe))

    assert not (cache / "adv_trained").exists()
    assert not (tmp_path / "evil").exists()
    assert _leftovers(cache) == []


def test_fetch_offline_says_how_to_install_by_hand(tmp_path):
    url = "http://127.0.0.1:9/x.zip"  # discard port: connection refused at once
    with pytest.raises(ModelDownloadError) as info:
        fetch_madry_model("natural", str(tmp_path), url=url, verbose=False)
    message = str(info.value)
    assert url in message
    assert os.path.join(str(tmp_path), "natural", "checkpoint-<step>.index") in message
    assert "url='file:///path/to/natural.zip'" in message
    assert isinstance(info.value, OSError)
    assert _leftovers(tmp_path) == []


def test_fetch_uses_files_placed_by_hand(narrow_values, tmp_path):
    # The default (Dropbox) URL is unreachable here: returning at all proves no download happened.
    prefix = tf1_reference.write_checkpoint(
        narrow_values, str(tmp_path / "natural"), state_path="checkpoint-70000"
    )
    assert fetch_madry_model("natural", str(tmp_path)) == prefix
    # A zip unpacked in place (cache/secret/models/secret/...) is accepted too.
    nested = tf1_reference.write_checkpoint(
        narrow_values, str(tmp_path / "secret" / "models" / "secret")
    )
    assert fetch_madry_model("secret", str(tmp_path)) == nested


def test_fetch_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'robust'"):
        fetch_madry_model("robust", str(tmp_path))
    with pytest.raises(ValueError, match="must match"):
        fetch_madry_model("../x", str(tmp_path), url="file:///nowhere.zip")
    (tmp_path / "natural").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        fetch_madry_model("natural", str(tmp_path))
    assert set(checkpoints.MADRY_MODELS) == {"natural", "adv_trained", "secret"}


def test_a_truncated_keras_file_is_reported_as_corrupt_not_missing(tmp_path):
    from manifold_tf import pretrained

    blob = open(pretrained.path("synthetic_narrow"), "rb").read()
    path = tmp_path / "model.keras"
    path.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ValueError, match="not a valid .keras file"):
        load_model_weights(str(path))
