"""Loading Madry et al.'s TF1 checkpoints (and Keras files) into :func:`madry_resnet`.

A pure name mapping: every variable of a TF1 checkpoint written by ``MadryLab/cifar10_challenge``
(``input/init_conv/DW``, ``unit_1_0/shared_activation/BatchNorm/gamma`` ... ``logit/biases``) is
assigned to the Keras variable that :func:`manifold_tf.models.tf1_variable_map` names for it.
Loading is strict: every mismatch is collected and reported in one ``ValueError`` before any weight
is assigned, so a failed load never leaves a half-loaded model.

``fetch_madry_model`` (:mod:`manifold_tf.download`, re-exported here) downloads one of the
released zips (``natural``, ``adv_trained``, ``secret``), checks it and unpacks it into a cache;
offline, it says how to place the files by hand. :func:`find_checkpoint_prefix` lives there too
(the download needs it to recognise a cached model), so only this module imports that one.
"""

from __future__ import annotations

import os
import zipfile

import h5py
import keras
import numpy as np
import tensorflow as tf

# fetch_madry_model and its table are re-exported: the public API names them in this module.
from manifold_tf.download import (  # noqa: F401
    MADRY_MODELS,
    ModelDownloadError,
    fetch_madry_model,
    find_checkpoint_prefix,
)
from manifold_tf.models import FILTERS, madry_resnet, tf1_variable_map

# The variable whose output channels tell the width: [3, 3, 16, 160] (wide) or [3, 3, 16, 16].
WIDTH_PROBE = "unit_1_0/sub1/conv1/DW"

# Checkpoint entries that are not model weights: the step counter and optimizer state (Momentum for
# Madry's SGD; Adam's slots and beta powers in case a checkpoint was trained with Adam).
_IGNORED_NAMES = frozenset({"global_step", "beta1_power", "beta2_power"})
_IGNORED_SUFFIXES = ("/Momentum", "/Adam", "/Adam_1", "/RMSProp", "/RMSProp_1", "/Adagrad")

# --------------------------------------------------------------------------------------------------
# Finding checkpoints


def _is_ignored(name: str) -> bool:
    return name in _IGNORED_NAMES or name.endswith(_IGNORED_SUFFIXES)


def resolve_checkpoint(path: str) -> str:
    """Turns a checkpoint prefix, a ``.index`` file or a checkpoint directory into a prefix.

    Raises:
      FileNotFoundError: nothing at ``path``, or a directory without a checkpoint (lists its files).
    """
    path = os.fspath(path)
    if path.endswith(".index") and os.path.isfile(path):
        return path[: -len(".index")]
    if os.path.isdir(path):
        prefix = find_checkpoint_prefix(path)
        if prefix is None:
            listing = sorted(os.listdir(path))
            raise FileNotFoundError(
                f"no TF1 checkpoint in directory {path!r}: expected a 'checkpoint' state file or "
                f"'checkpoint-<step>.index' files; it holds {listing[:20]}"
                f"{' ...' if len(listing) > 20 else ''}."
            )
        return prefix
    if os.path.isfile(path + ".index"):
        return path
    raise FileNotFoundError(
        f"no TF1 checkpoint at {path!r}: neither a directory with a 'checkpoint' file nor a prefix "
        f"with {path + '.index'!r}."
    )


def _width_of_channels(channels: int) -> str | None:
    for width, filters in FILTERS.items():
        if filters[1] == channels:
            return width
    return None


def _reader(prefix: str):
    """TensorFlow's checkpoint reader for ``prefix``; a corrupt index is a ValueError naming it."""
    try:
        return tf.train.load_checkpoint(prefix)
    except tf.errors.OpError as e:  # DataLossError and kin: "not an sstable (bad magic number)"
        raise ValueError(
            f"TF1 checkpoint {prefix!r} is unreadable ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}): truncated or corrupt? Re-download it."
        ) from None


def detect_width(path: str) -> str:
    """``"wide"`` or ``"narrow"`` from the shape of ``unit_1_0/sub1/conv1/DW`` in a TF1 checkpoint.

    Args:
      path: checkpoint prefix, ``.index`` file or directory (see :func:`resolve_checkpoint`).
    """
    prefix = resolve_checkpoint(path)
    shapes = _reader(prefix).get_variable_to_shape_map()
    if WIDTH_PROBE not in shapes:
        raise ValueError(
            f"checkpoint {prefix!r} has no variable {WIDTH_PROBE!r}: not one of Madry's CIFAR-10 "
            f"ResNets (it holds {len(shapes)} variables, e.g. {sorted(shapes)[:5]})."
        )
    shape = list(shapes[WIDTH_PROBE])
    width = _width_of_channels(shape[-1]) if len(shape) == 4 else None
    if width is None:
        raise ValueError(
            f"{WIDTH_PROBE!r} in {prefix!r} has shape {shape}; expected [3, 3, 16, 160] (wide) or "
            f"[3, 3, 16, 16] (narrow)."
        )
    return width


# --------------------------------------------------------------------------------------------------
# Loading


def _model_width(variables: dict) -> str | None:
    probe = variables.get(WIDTH_PROBE)
    return None if probe is None else _width_of_channels(int(probe.shape[-1]))


def load_tf1_checkpoint(model: keras.Model, path: str) -> dict:
    """Assigns every weight of ``model`` from a TF1 checkpoint of Madry's ResNet, by TF1 name.

    Optimizer slots (``*/Momentum``, Adam's) and ``global_step`` are skipped. Every other entry must
    match a model variable in name and shape, and every model variable must be in the checkpoint;
    all problems are collected and raised together before anything is assigned.

    Args:
      model: a model built by :func:`manifold_tf.models.madry_resnet`.
      path: checkpoint prefix (``models/adv_trained/checkpoint-70000``), its ``.index`` file, or a
        directory holding a ``checkpoint`` state file.

    Returns:
      ``{"prefix": str, "num_loaded": int, "num_ignored": int, "global_step": int | None}``.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      ValueError: names or shapes do not match (each problem listed; a width mismatch says which
        ``width`` to build).
    """
    prefix = resolve_checkpoint(path)
    reader = _reader(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    variables = tf1_variable_map(model)
    if not variables:
        raise ValueError(
            f"model {model.name!r} has no layers named after Madry's TF1 scopes; build it with "
            f"manifold_tf.models.madry_resnet(width)."
        )

    weights = {name: shape for name, shape in shapes.items() if not _is_ignored(name)}
    unexpected = sorted(set(weights) - set(variables))
    missing = sorted(set(variables) - set(weights))
    mismatched = []
    for name in sorted(set(weights) & set(variables)):
        want, got = tuple(variables[name].shape), tuple(weights[name])
        if want != got:
            mismatched.append(f"  {name}: checkpoint {list(got)} vs model {list(want)}")
        elif not dtypes[name].is_floating:
            mismatched.append(f"  {name}: checkpoint dtype {dtypes[name].name}, expected float")

    if unexpected or missing or mismatched:
        lines = [f"cannot load TF1 checkpoint {prefix!r} into model {model.name!r}:"]
        if mismatched:
            lines.append(f"{len(mismatched)} shape mismatch(es) (checkpoint vs model):")
            lines.extend(mismatched)
        if missing:
            lines.append(f"{len(missing)} model variable(s) missing from the checkpoint:")
            lines.extend(f"  {name}" for name in missing)
        if unexpected:
            lines.append(f"{len(unexpected)} checkpoint variable(s) the model does not have:")
            lines.extend(f"  {name} {list(weights[name])}" for name in unexpected)
        ckpt_width = (
            _width_of_channels(int(weights[WIDTH_PROBE][-1])) if WIDTH_PROBE in weights else None
        )
        if ckpt_width is not None and ckpt_width != _model_width(variables):
            lines.append(
                f"The checkpoint holds the {ckpt_width} model: build it with "
                f'madry_resnet(width="{ckpt_width}") (or use load_model_weights(path), which '
                f"detects the width)."
            )
        raise ValueError("\n".join(lines))

    for name, variable in variables.items():
        variable.assign(np.asarray(reader.get_tensor(name), dtype=variable.dtype))
    global_step = int(reader.get_tensor("global_step")) if "global_step" in shapes else None
    return {
        "prefix": prefix,
        "num_loaded": len(variables),
        "num_ignored": len(shapes) - len(weights),
        "global_step": global_step,
    }


def _is_tf1_checkpoint(path: str) -> bool:
    if os.path.isdir(path):
        return (
            os.path.isfile(os.path.join(path, "checkpoint"))
            or find_checkpoint_prefix(path) is not None
        )
    return (path.endswith(".index") and os.path.isfile(path)) or os.path.isfile(path + ".index")


def _h5_width(path: str) -> str | None:
    """The width of a ``.weights.h5`` saved from :func:`madry_resnet`, or None when unreadable.

    Keras 3 stores layers by class-derived names; the first residual unit (``unit_1_0``) is
    ``layers/residual_unit`` and its ``conv1`` kernel is ``[3, 3, 16, 16 or 160]``.
    """
    try:
        with h5py.File(path, "r") as f:
            return _width_of_channels(int(f["layers/residual_unit/conv1/vars/0"].shape[-1]))
    except (OSError, KeyError, IndexError, TypeError):
        return None


def load_model_weights(path: str, width: str | None = None) -> keras.Model:
    """Builds Madry's ResNet and loads weights from a TF1 checkpoint or a Keras file.

    Formats, by what ``path`` is:
      * a TF1 checkpoint (prefix with ``.index``, the ``.index`` file, or a directory with a
        ``checkpoint`` state file): the width is read from the checkpoint when ``width`` is None;
      * ``*.keras``: a full saved model (``width``, when given, is checked against it);
      * ``*.weights.h5``: weights only; with ``width=None`` the width is read from the file (or, if
        that fails, the narrow then the wide model is tried).

    Returns:
      The model: ``[N, 32, 32, 3]`` pixels in 0..255 -> ``[N, 10]`` logits.

    Raises:
      FileNotFoundError: nothing at ``path``.
      ValueError: unknown format, or weights that fit neither width / the requested width.
    """
    path = os.fspath(path)
    if width is not None and width not in FILTERS:
        raise ValueError(f"width must be one of {sorted(FILTERS)} or None; got {width!r}.")
    if _is_tf1_checkpoint(path):
        model = madry_resnet(width or detect_width(path))
        load_tf1_checkpoint(model, path)
        return model
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no model at {path!r}: expected a TF1 checkpoint prefix (with '.index'), a directory "
            f"with a 'checkpoint' file, a '.keras' file or a '.weights.h5' file."
        )
    if path.endswith(".keras"):
        # The custom layers are registered by importing manifold_tf.models (at the top).
        if not zipfile.is_zipfile(path):  # keras would report a truncated file as "not found"
            raise ValueError(
                f"{path!r} is not a valid .keras file (not a zip archive: truncated or "
                f"corrupt?). Re-save or re-download the model."
            )
        try:
            model = keras.saving.load_model(path)
        except (zipfile.BadZipFile, KeyError, OSError, ValueError, TypeError) as e:
            # TypeError: the file names a layer or function this process has not registered.
            raise ValueError(
                f"{path!r} could not be loaded as a Keras model ({type(e).__name__}: "
                f"{e}); is it truncated or corrupt?"
            ) from None
        got = _model_width(tf1_variable_map(model))
        if width is not None and got != width:
            raise ValueError(f"{path!r} holds a {got} model; width={width!r} was requested.")
        return model
    if path.endswith(".weights.h5"):
        if not h5py.is_hdf5(path):  # checked before building a ResNet to try it on
            raise ValueError(
                f"{path!r} is not a valid .weights.h5 file (not HDF5: truncated or corrupt?). "
                f"Re-save or re-download the weights."
            )
        errors = []
        chosen = width or _h5_width(path)
        candidates = [chosen] if chosen else ["narrow", "wide"]  # narrow first: cheaper to build
        for candidate in candidates:
            model = madry_resnet(candidate)
            try:
                model.load_weights(path)
                return model
            except ValueError as error:  # keras raises ValueError on a shape/layer mismatch
                errors.append(f"width={candidate!r}: {error}")
        raise ValueError(f"weights {path!r} fit no Madry ResNet:\n" + "\n".join(errors))
    raise ValueError(
        f"unknown model format at {path!r}: expected a TF1 checkpoint (prefix with '.index', or a "
        f"directory with a 'checkpoint' file), '*.keras' or '*.weights.h5'."
    )
