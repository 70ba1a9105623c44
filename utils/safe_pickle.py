"""Read `.pdparams` files (pickles) without ever running code from them.

`paddle.load` is `pickle.load`: a crafted file can call any function while it is read.
Checkpoints, training states and teacher weights come from strangers' links in this
field, so every weights file of this project is read here instead, through an unpickler
that resolves only what a state dict holds: containers, numbers, strings, numpy arrays
and dtypes. A file asking for anything else (os.system, eval, a class) is refused before
that object is built, with one line: `FILE: not a plain weights file (refusing to
unpickle code)`. This is the policy of `torch.load(weights_only=True)`.

The result is what `paddle.load(path, return_numpy=True)` gives for the same file: Paddle
writes each tensor as the pair (name, ndarray) and may add 'StructuredToParameterName@@'
and 'UnpackBigParamInfor@@' bookkeeping; both are undone here.
"""
from __future__ import annotations

import codecs
import collections
import os
import pickle
from typing import Any

import numpy as np

from .errors import UserError

# numpy moved its pickling helpers from numpy.core to numpy._core in 2.0; files from
# either version name one or the other. Resolved to the running numpy's objects without
# importing the deprecated module.
_MULTIARRAY = np._core.multiarray  # type: ignore[attr-defined]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); any other codec
    is refused (it is not what a weights file needs)."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"codec {encoding!r}")
    return codecs.encode(text, "latin1")


def _bytes(*args: Any) -> bytes:
    """Protocol 2 writes b'' as bytes(); bytes(N) would allocate N bytes: refused."""
    if args and isinstance(args[0], int):
        raise pickle.UnpicklingError("bytes(int)")
    return bytes(*args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytes"): _bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _MULTIARRAY._reconstruct
    _ALLOWED[(_module, "scalar")] = _MULTIARRAY.scalar
# numpy >= 1.25 pickles a dtype's class as numpy.dtypes.<Name>DType
for _name in dir(np.dtypes):
    if _name.endswith("DType") and _name != "ObjectDType":
        _ALLOWED[("numpy.dtypes", _name)] = getattr(np.dtypes, _name)


class UnsafeWeightsError(UserError):
    """The file needs more than plain data to be read: refused, nothing was run."""


class WeightsFileError(UserError):
    """The file is missing, truncated or not a pickle at all."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent id")


class _Refused(pickle.UnpicklingError):
    pass


def refusal(path: str) -> str:
    return f"{path}: not a plain weights file (refusing to unpickle code)"


def load_plain_pickle(path: str, what: str = "weights file") -> Any:
    """Unpickle `path` allowing plain data only; Paddle's tensor pairs become ndarrays.

    Raises UnsafeWeightsError (it would run code, or holds objects of other types) or
    WeightsFileError (missing, empty, truncated, not a pickle), each one line naming
    the file.
    """
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path}: {what} not found")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            if not head:
                raise WeightsFileError(f"{path}: empty {what}")
            if head[:1] != b"\x80":  # every pickle of protocol 2+ starts with PROTO
                raise WeightsFileError(f"{path}: not a Paddle {what} (not a pickle)")
            f.seek(0)
            obj = _PlainDataUnpickler(f, encoding="latin1").load()
    except _Refused:
        raise UnsafeWeightsError(refusal(path)) from None
    except WeightsFileError:
        raise
    except PermissionError:
        raise WeightsFileError(f"{path}: cannot read {what} (permission denied)") from None
    except MemoryError:
        raise WeightsFileError(f"{path}: unreadable {what} (too large for memory)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, UnicodeError, OSError, RecursionError) as err:
        # numpy's own checks (wrong shape for the data, bad dtype) land here too
        raise WeightsFileError(f"{path}: unreadable or truncated {what} ({type(err).__name__})") from None
    try:
        return _plain(_unpack_big_params(obj))
    except _Refused:
        raise UnsafeWeightsError(refusal(path)) from None


def _unpack_big_params(obj: Any) -> Any:
    """Paddle splits arrays above 4 GB into slices when saving with protocol 2/3."""
    key = "UnpackBigParamInfor@@"
    if not isinstance(obj, dict) or key not in obj:
        return obj
    info = obj.pop(key)
    if not isinstance(info, dict):
        raise ValueError("bad UnpackBigParamInfor@@")
    for name, parts in info.items():
        obj[name] = np.concatenate([obj.pop(p) for p in parts["slices"]]).reshape(parts["OriginShape"])
    return obj


_SCALARS = (str, bytes, int, float, bool, complex, type(None))


def _plain(obj: Any, depth: int = 0) -> Any:
    """Check the tree holds plain data only and turn Paddle's (name, ndarray) tensor
    pairs into arrays; drop Paddle's name table."""
    if depth > 100:
        raise _Refused("nesting too deep")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise _Refused("object array")
        return obj
    if isinstance(obj, np.generic):
        if isinstance(obj, np.object_):
            raise _Refused("object scalar")
        return obj
    if isinstance(obj, _SCALARS) or isinstance(obj, np.dtype):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return _plain(obj[1], depth + 1)  # a Tensor as paddle.save writes it
    if isinstance(obj, dict):
        out = obj.__class__() if type(obj) in (dict, collections.OrderedDict) else {}
        for key, value in obj.items():
            if key == "StructuredToParameterName@@":
                continue
            if not isinstance(key, (str, int, float, bool, tuple, type(None))):
                raise _Refused("dict key type")
            out[key] = _plain(value, depth + 1)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(_plain(v, depth + 1) for v in obj)
    raise _Refused(type(obj).__name__)
