"""Random draws that depend on a point, not on its batch: per-point seeds and keyed noise.

A point's outcome in an evaluation must not depend on which other points share its batch, or in
which order they come (issue 23): the sequential rule and the finite-population guarantee assume
each point's outcome is fixed. So every random choice for a point is a pure function of a *key*
derived from the run's seed and the point's index in the data set (attacks, :func:`point_seeds`),
or, for a random shell whose ``call(x)`` knows no indices, from the shell's seed and a fingerprint
of the row's pixels (:func:`tf_fingerprint`): the same point then draws the same in any batch.

The generator is counter based: element ``j`` of a row keyed ``k`` is ``splitmix64(k + (j + 1) *
GOLDEN)`` (Steele, Lea & Flood 2014), the top 24 bits read as a float32 in [0, 1). A numpy and a
TensorFlow implementation give the same bits (tests/test_batch_invariance.py checks it), so a draw
made eagerly in numpy (Square) and one made inside a compiled search (a shell) follow one rule.
Keys are 64-bit, carried as int64 (the same bits as uint64).
"""

from __future__ import annotations

import zlib

import numpy as np
import tensorflow as tf

__all__ = [
    "fold",
    "point_seeds",
    "row_keys",
    "tf_fingerprint",
    "tf_fold",
    "tf_input_keys",
    "tf_uniform_rows",
    "uniform_rows",
    "word",
]

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_U24 = 1.0 / (1 << 24)


def word(purpose) -> int:
    """A 32-bit constant for a purpose (a string such as ``"apgd"``, or an int as it is), so that
    draws for different purposes of one point are independent."""
    if isinstance(purpose, str):
        return zlib.crc32(purpose.encode())
    return int(purpose) & 0xFFFFFFFFFFFFFFFF


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _u64(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.uint64:
        return a
    return a.astype(np.int64).view(np.uint64) if a.dtype.kind == "i" else a.astype(np.uint64)


def _purpose(p) -> np.ndarray:
    if isinstance(p, (str, int, np.integer)):
        return np.asarray(word(p), np.uint64)
    return _u64(p)  # an int array: one purpose per row (e.g. a point's index)


def fold(keys, *purposes) -> np.ndarray:
    """``keys`` (int ``[N]`` or a scalar) with each of ``purposes`` (a str, an int, or an int
    array ``[N]``, one per row) folded in: int64 keys of the same shape, an independent stream
    per (key, purposes)."""
    k = _u64(keys)
    with np.errstate(over="ignore"):
        for p in purposes:
            k = _mix(k ^ _mix(_purpose(p) + GOLDEN))
    return np.asarray(k, np.uint64).view(np.int64)


def point_seeds(seed: int, indices) -> np.ndarray:
    """int64 ``[N]``: the seeds of the points ``indices`` (their positions in the data set) in a
    run seeded ``seed``. A point's seed depends on nothing else."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    return fold(np.full(idx.shape, int(seed), np.int64), "point", idx)


def row_keys(seed, n: int, *purposes) -> np.ndarray:
    """int64 ``[n]``: one key per row for the draw named by ``purposes``.

    ``seed`` is what an attack accepts: an int array ``[n]`` of per-point seeds (each row's draw
    then depends on its own seed only: the same in any batch), or an int, read as the seeds
    :func:`point_seeds` gives rows ``0..n-1`` (a row's draw then depends on its position).
    """
    return fold(per_point(seed, n), *purposes)


def per_point(seed, n: int) -> np.ndarray:
    """The per-point seeds int64 ``[n]`` of an attack's ``seed`` (see :func:`row_keys`)."""
    if np.ndim(seed) == 0:
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int or an int array [N]; got {seed!r}.")
        if int(seed) < 0:  # refused here, not only where a random draw first needs it
            raise ValueError(f"seed must be a non-negative int; got {seed!r}.")
        return point_seeds(int(seed), np.arange(n))
    arr = np.asarray(seed)
    if arr.dtype.kind not in "iu" or arr.shape != (n,):
        raise ValueError(
            f"seed must be an int or an int array of shape [{n}] (one per point); got "
            f"{arr.dtype} of shape {arr.shape}."
        )
    return arr.astype(np.uint64).view(np.int64) if arr.dtype.kind == "u" else arr.astype(np.int64)


def take(seed, idx):
    """The seeds of the rows ``idx`` of a batch: an int stays an int (positional), an array is
    indexed. What a step that runs on a subset of the points passes on."""
    return seed if np.ndim(seed) == 0 else np.asarray(seed)[np.asarray(idx)]


def uniform_rows(keys, shape) -> np.ndarray:
    """float32 ``[N, *shape]`` uniform on [0, 1): row ``i`` a function of ``keys[i]`` alone."""
    k = _u64(keys).reshape(-1, 1)
    d = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):
        counters = np.arange(1, d + 1, dtype=np.uint64) * GOLDEN
        z = _mix(k + counters[None, :])
    u = (z >> np.uint64(40)).astype(np.float32) * np.float32(_U24)
    return u.reshape((len(k),) + tuple(shape))


def integers_rows(keys, high, shape=()) -> np.ndarray:
    """int64 ``[N, *shape]`` uniform on ``0..high-1`` (``high``: an int, or an int array that
    broadcasts against ``[N, *shape]``), keyed as :func:`uniform_rows` (bias below 2^-24 * high)."""
    u = uniform_rows(keys, shape).astype(np.float64)
    high = np.asarray(high, np.int64)
    return np.minimum((u * high).astype(np.int64), high - 1)


# ---- TensorFlow ---------------------------------------------------------------------------------


def _tf_mix(z: tf.Tensor) -> tf.Tensor:
    sh = tf.bitwise.right_shift
    z = tf.bitwise.bitwise_xor(z, sh(z, tf.constant(30, tf.uint64))) * tf.constant(_M1)
    z = tf.bitwise.bitwise_xor(z, sh(z, tf.constant(27, tf.uint64))) * tf.constant(_M2)
    return tf.bitwise.bitwise_xor(z, sh(z, tf.constant(31, tf.uint64)))


def _tf_u64(keys) -> tf.Tensor:
    keys = tf.convert_to_tensor(keys)
    if keys.dtype == tf.uint64:
        return keys
    return tf.bitcast(tf.cast(keys, tf.int64), tf.uint64)


def tf_fold(keys, purpose) -> tf.Tensor:
    """:func:`fold` in a graph: ``keys`` int64/uint64 ``[N]``, ``purpose`` a str/int or an int
    tensor ``[N]`` (e.g. a label per row). Returns int64 ``[N]``, the same bits as numpy's."""
    k = _tf_u64(keys)
    if isinstance(purpose, (str, int, np.integer)):
        with np.errstate(over="ignore"):
            p = tf.constant(np.asarray(word(purpose), np.uint64) + GOLDEN, tf.uint64)
    else:
        p = tf.bitcast(tf.cast(purpose, tf.int64), tf.uint64) + tf.constant(GOLDEN)
    return tf.bitcast(_tf_mix(tf.bitwise.bitwise_xor(k, _tf_mix(p))), tf.int64)


def tf_uniform_rows(keys, shape) -> tf.Tensor:
    """:func:`uniform_rows` in a graph: ``keys`` int64 ``[N]`` -> float32 ``[N, *shape]`` on
    [0, 1), row ``i`` a function of ``keys[i]`` alone (bit-identical to the numpy version)."""
    k = _tf_u64(keys)[:, None]
    shape = tf.cast(shape, tf.int64)
    d = tf.reduce_prod(shape)
    counters = tf.cast(tf.range(1, d + 1, dtype=tf.int64), tf.uint64) * tf.constant(GOLDEN)
    z = _tf_mix(k + counters[None, :])
    u = tf.cast(tf.bitwise.right_shift(z, tf.constant(40, tf.uint64)), tf.float32) * _U24
    return tf.reshape(u, tf.concat([tf.shape(k, out_type=tf.int64)[:1], shape], 0))


def tf_fingerprint(x: tf.Tensor) -> tf.Tensor:
    """int64 ``[N]``: a hash of each row of ``x`` ``[N, ...]`` float32 (its exact bits; -0 and +0
    alike), independent of the other rows: what keys a random shell's draw for that input."""
    x = tf.convert_to_tensor(x, tf.float32)
    flat = tf.reshape(tf.where(tf.equal(x, 0.0), tf.zeros_like(x), x), [tf.shape(x)[0], -1])
    bits = tf.cast(tf.bitcast(flat, tf.uint32), tf.uint64)
    pos = tf.cast(tf.range(1, tf.shape(flat, out_type=tf.int64)[1] + 1), tf.uint64)
    # A sum of per-element hashes: integer addition is exact in any order, so the fingerprint does
    # not depend on how the reduction is split (batch size, XLA or not).
    h = _tf_mix(bits * tf.constant(GOLDEN) + _tf_mix(pos * tf.constant(_M2)))
    return tf.bitcast(_tf_mix(tf.reduce_sum(h, axis=1)), tf.int64)


def tf_input_keys(x: tf.Tensor, seed: int, purpose: str) -> tf.Tensor:
    """int64 ``[N]``: the key of a random shell's draw for each row of ``x``: its seed, the
    purpose and the row's pixels (:func:`tf_fingerprint`), so a point draws the same in any
    batch, and another seed (:meth:`~manifold_tf.shells.FactorShell.with_seed`) draws afresh."""
    return tf_fold(tf_fold(tf_fingerprint(x), int(seed)), purpose)
