"""Reading untrusted pickle files (the CIFAR-10 python batches) without running their code.

A pickle is a program: ``pickle.load`` imports and calls whatever globals the file names
(``os.system``, ``builtins.eval``, any class's constructor), so a crafted ``test_batch`` runs code
the moment it is read. :class:`RestrictedUnpickler` resolves only the globals a CIFAR-10 batch
really references, found by listing the ``GLOBAL``/``STACK_GLOBAL`` opcodes of the real batches (the
original Python 2 archive and the sample re-pickled by Python 3 with protocol 2):

- ``numpy.core.multiarray._reconstruct`` (``numpy._core.multiarray`` under numpy 2),
  ``numpy.ndarray`` and ``numpy.dtype``: how numpy pickles an array (``data``);
- ``_codecs.encode``: how Python 3's protocol 2 pickles a ``bytes`` object (``filenames``);
- ``numpy._core.numeric._frombuffer``: how protocol 5 pickles an array (a re-pickled batch).

Each is wrapped so that it builds only what the format holds: plain ``ndarray`` s (no subclass) of
a non-object dtype, a bounded element count, and ``bytes`` from a ``str`` in latin-1. Everything
else (dict, list, str, int, bytes, bool, None) needs no global at all. Any other global is refused
with :class:`RefusedGlobal`, naming the file and the global, before anything of it runs.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
from typing import Any

import numpy as np

# numpy moved multiarray to numpy._core in 2.0; pickles name either module.
try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

# A CIFAR-10 batch holds 10,000 x 3072 bytes; a file asking for far more is an allocation bomb.
MAX_ELEMENTS = 1 << 28
_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1")


class RefusedGlobal(pickle.UnpicklingError, ValueError):
    """A pickle referenced a global (a function or class) it is not allowed to use.

    ``path`` is the file (or ``"<bytes>"``), ``name`` the refused ``module.qualname``.
    """

    def __init__(self, path: str, name: str, why: str = "not a type a CIFAR-10 batch holds"):
        self.path, self.name = path, name
        super().__init__(
            f"{path}: refused to unpickle global {name!r} ({why}); its code was not run. The file "
            f"is not an original CIFAR-10 batch: replace it with the one from the CIFAR-10 "
            f"'python version' archive."
        )


class _NdarrayType:
    """Stands for ``numpy.ndarray`` in a pickle: accepted as ``_reconstruct``'s subtype only.

    Calling ``numpy.ndarray(shape, dtype, buffer)`` directly would allocate any shape and
    reinterpret any buffer, which no CIFAR-10 batch does.
    """

    def __init__(self, path: str):
        self.path = path

    def __call__(self, *args, **kwargs):
        raise RefusedGlobal(self.path, "numpy.ndarray(...)", "arrays come only from _reconstruct")


def _reconstruct(path: str):
    def reconstruct(subtype, shape, dtype):
        # numpy calls _reconstruct(ndarray, (0,), b'b'); the real shape arrives with BUILD.
        if not isinstance(subtype, _NdarrayType):
            raise RefusedGlobal(
                path,
                f"_reconstruct({getattr(subtype, '__name__', subtype)!r})",
                "only plain numpy arrays are allowed",
            )
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if not all(isinstance(d, int) and d >= 0 for d in dims) or math.prod(dims) > MAX_ELEMENTS:
            raise RefusedGlobal(
                path,
                f"_reconstruct(shape={shape!r})",
                f"shape must be at most {MAX_ELEMENTS} elements",
            )
        return _np_reconstruct(np.ndarray, dims, _dtype(path)(dtype))

    return reconstruct


def _frombuffer(path: str):
    def frombuffer(buf, dtype, shape, order):
        # Protocol 5 pickles an array as _frombuffer(bytes, dtype, shape, order).
        made = _dtype(path)(dtype.str if isinstance(dtype, np.dtype) else dtype)
        if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)) or order not in "CF":
            raise RefusedGlobal(path, "_frombuffer(...)", "only a bytes buffer is allowed")
        dims = tuple(shape)
        if not all(isinstance(d, int) and d >= 0 for d in dims):
            raise RefusedGlobal(path, f"_frombuffer(shape={shape!r})", "bad shape")
        flat = np.frombuffer(buf, dtype=made)
        return flat.reshape(dims, order=order).copy()

    return frombuffer


def _dtype(path: str):
    def dtype(spec, align=False, copy=False):
        if isinstance(spec, bytes):
            spec = spec.decode("latin1")
        if not isinstance(spec, str):
            raise RefusedGlobal(path, f"numpy.dtype({spec!r})", "dtypes must be given by code")
        made = np.dtype(spec, align=bool(align), copy=bool(copy))
        if made.hasobject or made.kind in "OV":
            # An object array's state is a list of arbitrary pickled objects, and BUILD can give a
            # void dtype object fields: neither is in a CIFAR-10 batch.
            raise RefusedGlobal(
                path, f"numpy.dtype({spec!r})", "object and record dtypes are not allowed"
            )
        return made

    return dtype


def _encode(path: str):
    def encode(obj, encoding="utf-8", errors="strict"):
        if not isinstance(obj, str) or str(encoding).lower() not in _LATIN1:
            raise RefusedGlobal(
                path,
                f"_codecs.encode(..., {encoding!r})",
                "only latin-1 encoding of a str is allowed",
            )
        return codecs.encode(obj, "latin1", errors)

    return encode


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of a CIFAR-10 batch (module docstring).

    Args:
      file: a binary file object.
      path: the file's name, for error messages.
      encoding: how Python 2 ``str`` objects are decoded (``"bytes"`` keeps them as bytes, as
        the CIFAR-10 format expects).
    """

    def __init__(self, file, path: str = "<bytes>", *, encoding: str = "bytes"):
        super().__init__(file, encoding=encoding)
        self.path = path
        self._allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct(path),
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct(path),
            ("numpy", "ndarray"): _NdarrayType(path),
            ("numpy", "dtype"): _dtype(path),
            ("numpy.core.numeric", "_frombuffer"): _frombuffer(path),
            ("numpy._core.numeric", "_frombuffer"): _frombuffer(path),
            ("_codecs", "encode"): _encode(path),
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(self.path, f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise RefusedGlobal(self.path, f"persistent id {pid!r}", "persistent ids are not allowed")


class CorruptPickle(pickle.UnpicklingError, ValueError):
    """A truncated or corrupt pickle; the message names the file (``path``) and what failed."""

    def __init__(self, path: str, error: BaseException):
        self.path = path
        super().__init__(
            f"{path}: corrupt or truncated pickle ({type(error).__name__}: {error})."[:500]
        )


# What the unpickler raises on malformed bytes (as pickle.load does): each becomes CorruptPickle.
_CORRUPT = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    OverflowError,
    RecursionError,
    UnicodeDecodeError,
)


def _load(file, path: str, encoding: str) -> Any:
    try:
        return RestrictedUnpickler(file, path, encoding=encoding).load()
    except RefusedGlobal:
        raise
    except _CORRUPT as e:
        raise CorruptPickle(path, e) from None
    except MemoryError:
        # A length field of garbage asks for gigabytes before the bytes run out.
        raise CorruptPickle(
            path, MemoryError("asks for more memory than this machine has")
        ) from None


def load(path: str, *, encoding: str = "bytes") -> Any:
    """Reads one pickle from ``path`` with :class:`RestrictedUnpickler`.

    Raises:
      RefusedGlobal: the file names a global outside the allowed set (a ``ValueError``).
      CorruptPickle: a corrupt or truncated file (a ``ValueError`` and ``pickle.UnpicklingError``
        naming ``path``).
    """
    with open(path, "rb") as f:
        return _load(f, path, encoding)


def loads(data: bytes, *, path: str = "<bytes>", encoding: str = "bytes") -> Any:
    """:func:`load` for bytes in memory (``path`` only names them in errors)."""
    return _load(io.BytesIO(data), path, encoding)
