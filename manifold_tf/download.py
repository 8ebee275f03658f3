"""Madry et al.'s released CIFAR-10 checkpoints on disk: finding them and downloading them.

:func:`find_checkpoint_prefix` finds the newest TF1 checkpoint in a directory (the loader in
:mod:`manifold_tf.checkpoints` and the download cache both use it, so it sits here, below the
loader). :func:`fetch_madry_model` downloads one of the released zips (``natural``,
``adv_trained``, ``secret``) with ``keras.utils.get_file``, checks it (SHA-256 when known, CRCs,
member paths) and unpacks it into a cache by an atomic rename; offline, it says how to place the
files by hand.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile

import keras
import tensorflow as tf
from absl import logging

_DOWNLOAD_CHUNK = 1 << 20  # bytes per read


class ModelDownloadError(OSError):
    """A released model could not be downloaded (no network, host unreachable, HTTP error)."""


# The released checkpoints, as fetched by Madry's ``fetch_model.py``. ``sha256`` is None where no
# digest has been published; then only the zip's own CRCs are checked.
MADRY_MODELS: dict[str, dict[str, str | None]] = {
    "natural": {
        "url": "https://www.dropbox.com/s/cgzd5odqoojvxzk/natural.zip?dl=1",
        "sha256": None,
    },
    "adv_trained": {
        "url": "https://www.dropbox.com/s/g4b6ntrp8zrudbz/adv_trained.zip?dl=1",
        "sha256": None,
    },
    "secret": {"url": "https://www.dropbox.com/s/ywc0hg8lr5ba8zd/secret.zip?dl=1", "sha256": None},
}


def find_checkpoint_prefix(directory: str) -> str | None:
    """Returns the newest TF1 checkpoint prefix in ``directory``, or None when it holds none.

    Uses the ``checkpoint`` state file (as ``tf.train.latest_checkpoint`` does). A state file
    written with paths relative to the training job's working directory
    (``models/x/checkpoint-70000``) points nowhere after the files moved, so its basename is tried
    in ``directory`` next; without a usable state file, the highest ``checkpoint-<step>.index``
    wins.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    # tf.train.latest_checkpoint's logic, minus its error log when the state file's path is stale.
    state = tf.train.get_checkpoint_state(directory)
    if state is not None and state.model_checkpoint_path:
        named = state.model_checkpoint_path  # get_checkpoint_state joins relative paths to it
        for candidate in (named, os.path.join(directory, os.path.basename(named))):
            if os.path.isfile(candidate + ".index"):
                return candidate
    steps = []
    for index in glob.glob(os.path.join(glob.escape(directory), "checkpoint-*.index")):
        match = re.fullmatch(r"checkpoint-(\d+)\.index", os.path.basename(index))
        if match:
            steps.append((int(match.group(1)), index[: -len(".index")]))
    return max(steps)[1] if steps else None


def _manual_instructions(name: str, url: str, cache_dir: str) -> str:
    return (
        f"To install it by hand: download {url} on a machine with network access, then either "
        f"unzip it so that {os.path.join(cache_dir, name, 'checkpoint-<step>.index')} exists "
        f"(with its '.data-*' files and the 'checkpoint' file beside it), or copy the zip here "
        f"and call fetch_madry_model({name!r}, {cache_dir!r}, url='file:///path/to/{name}.zip')."
    )


def _cached_prefix(target: str, name: str) -> str | None:
    # Accept both the intended layout and an archive unzipped in place (target/models/<name>/...).
    return find_checkpoint_prefix(target) or find_checkpoint_prefix(
        os.path.join(target, "models", name)
    )


def _download(url: str, destination: str, *, name: str, cache_dir: str, verbose: bool) -> str:
    """Fetches ``url`` with ``keras.utils.get_file`` into ``destination``; returns its hex SHA-256.

    ``destination`` is a private temporary path in the cache (the caller installs atomically from
    it), so a failed or partial download never leaves a file where the cache looks.
    """
    folder, fname = os.path.split(destination)
    try:
        path = keras.utils.get_file(
            fname=fname, origin=url, cache_dir=folder, cache_subdir="", force_download=True
        )
    except Exception as error:  # keras raises a bare Exception naming the URL; urllib errors too
        reason = getattr(error, "reason", error)
        raise ModelDownloadError(
            f"could not download model {name!r} from {url}: {reason}. "
            + _manual_instructions(name, url, cache_dir)
        ) from error
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_DOWNLOAD_CHUNK), b""):
            digest.update(chunk)
    if verbose:
        logging.info(
            f"[fetch_madry_model] {name}: downloaded {os.path.getsize(path):,} bytes from {url}"
        )
    return digest.hexdigest()


def _checked_members(archive: zipfile.ZipFile, source: str, name: str) -> str:
    """Validates the zip and returns the member directory holding the checkpoint (``models/x/``)."""
    bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"corrupt zip {source}: member {bad!r} fails its CRC check.")
    names = archive.namelist()
    for info in archive.infolist():
        member = info.filename
        parts = member.replace("\\", "/").split("/")
        mode = info.external_attr >> 16
        if member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member) or ".." in parts:
            raise ValueError(f"unsafe path {member!r} in zip {source}: refusing to extract.")
        if stat.S_ISLNK(mode):
            raise ValueError(f"symbolic link {member!r} in zip {source}: refusing to extract.")
    expected = f"models/{name}/checkpoint"
    if expected in names:
        return f"models/{name}/"
    indexes = sorted(m for m in names if re.search(r"(^|/)checkpoint-\d+\.index$", m))
    if indexes:
        return indexes[-1][: indexes[-1].rfind("/") + 1]
    raise ValueError(
        f"zip {source} holds no Madry checkpoint: expected {expected!r} or a "
        f"'checkpoint-<step>.index' member; it holds {names[:10]}"
        f"{' ...' if len(names) > 10 else ''}."
    )


def fetch_madry_model(
    name: str,
    cache_dir: str,
    *,
    url: str | None = None,
    sha256: str | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> str:
    """Downloads (once) one of Madry et al.'s released CIFAR-10 checkpoints; returns its prefix.

    The zip is streamed into a temporary file in ``cache_dir``, its SHA-256 checked when one is
    given or configured in :data:`MADRY_MODELS`, its CRCs and member paths checked, and it is
    unpacked into a temporary directory that is then renamed atomically to ``cache_dir/<name>``. A
    later call finds ``cache_dir/<name>`` and returns without touching the network.

    Args:
      name: ``"natural"``, ``"adv_trained"`` or ``"secret"`` (any ``[A-Za-z0-9_-]`` name when
        ``url`` is given).
      cache_dir: directory of the cache; created when absent.
      url: overrides the configured URL (``https://``, ``http://`` or ``file://``).
      sha256: expected hex digest of the zip; overrides the configured one.
      overwrite: download again even when the cache holds the model.
      verbose: print download progress (bytes) to stderr.

    Returns:
      The checkpoint prefix, e.g. ``cache_dir/adv_trained/checkpoint-70000``.

    Raises:
      ModelDownloadError: the download failed (offline); the message says how to install by hand.
      ValueError: unknown name, digest mismatch, corrupt or unexpected zip.
    """
    if url is None and name not in MADRY_MODELS:
        raise ValueError(
            f"unknown model {name!r}; expected one of {sorted(MADRY_MODELS)} or a url."
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
        raise ValueError(f"model name must match [A-Za-z0-9_-]+; got {name!r}.")
    config = MADRY_MODELS.get(name, {})
    url = url or config["url"]
    expected = (sha256 or config.get("sha256") or "").lower() or None
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    target = os.path.join(cache_dir, name)

    if os.path.exists(target) and not overwrite:
        prefix = _cached_prefix(target, name)
        if prefix is None:
            raise ValueError(
                f"{target!r} exists but holds no checkpoint ('checkpoint-<step>.index'); remove it "
                f"or pass overwrite=True. " + _manual_instructions(name, url, cache_dir)
            )
        return prefix

    os.makedirs(cache_dir, exist_ok=True)
    download_dir = tempfile.mkdtemp(prefix=f".{name}-download-", dir=cache_dir)
    zip_path = os.path.join(download_dir, f"{name}.zip")
    staging = None
    try:
        got = _download(url, zip_path, name=name, cache_dir=cache_dir, verbose=verbose)
        if expected is not None and got != expected:
            raise ValueError(
                f"SHA-256 mismatch for {url}: expected {expected}, got {got}. The file is corrupt "
                f"or not the released model; nothing was installed."
            )
        try:
            with zipfile.ZipFile(zip_path) as archive:
                member_dir = _checked_members(archive, url, name)
                staging = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir)
                archive.extractall(staging)
        except zipfile.BadZipFile as error:
            raise ValueError(f"corrupt zip from {url}: {error}.") from error
        source = (
            os.path.join(staging, *member_dir.rstrip("/").split("/")) if member_dir else staging
        )
        if overwrite and os.path.exists(target):
            # A directory cannot be replaced by os.replace: move the old one aside first (atomic).
            old = tempfile.mkdtemp(prefix=f".{name}-old-", dir=cache_dir)
            os.replace(target, os.path.join(old, name))
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(source, target)
        except OSError:
            # Another process installed the model meanwhile: use its copy if it is complete.
            if _cached_prefix(target, name) is None:
                raise
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    prefix = _cached_prefix(target, name)
    if prefix is None:  # unreachable after _checked_members, kept as a guard
        raise ValueError(f"no checkpoint found in {target!r} after extracting {url}.")
    if verbose:
        logging.info(f"[fetch_madry_model] {name}: installed {prefix}")
    return prefix
