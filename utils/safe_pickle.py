"""Read `.pdparams` files (pickles) without ever running code from them.

`paddle.load` is `pickle.load`: a crafted file can call any function while it is read.
Checkpoints, training states and teacher weights come from strangers' links in this
field, so every weights file of this project is read here instead, through an unpickler
that resolves only what a state dict holds: containers, numbers, strings, numpy arrays
and dtypes. A file asking for anything else (os.system, eval, a class) is refused before
that object is built, with one line: `FILE: not a plain weights file (refusing to
unpickle code)`. This is the policy of `torch.load(weights_only=True)`.

Nor can a file make reading it cost more than its size: numpy arrays are built only the
way numpy pickles them (their bytes are in the file; `numpy.ndarray(...)` itself, which
could describe a huge zero-stride array, is not callable), sets and non-scalar dict keys
(whose hashing walks shared structure) are refused, and shared references (a "billion
laughs" pickle) are checked once each, not once per path to them.

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
from .files import NotARegularFile, open_regular

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


class _NdarrayName:
    """Stands for numpy.ndarray in a file: usable only as _reconstruct's first argument
    (calling numpy.ndarray(shape, dtype, buffer, offset, strides) could make a huge
    zero-stride array out of four bytes)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("numpy.ndarray called")


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's own pickling: an empty array whose BUILD step then sets shape, dtype and
    the bytes stored in the file (numpy checks that they match)."""
    if subtype is not _NdarrayName or tuple(shape) != (0,):
        raise pickle.UnpicklingError("ndarray built another way")
    return _MULTIARRAY._reconstruct(np.ndarray, (0,), dtype)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytes"): _bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): np.dtype,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _reconstruct
    _ALLOWED[(_module, "scalar")] = _MULTIARRAY.scalar
# numpy >= 1.25 pickles a dtype's class as numpy.dtypes.<Name>DType
for _name in dir(np.dtypes):
    if _name.endswith("DType") and _name != "ObjectDType":
        _ALLOWED[("numpy.dtypes", _name)] = getattr(np.dtypes, _name)


class UnsafeWeightsError(UserError):
    """The file needs more than plain data to be read: refused, nothing was run."""


class WeightsFileError(UserError):
    """The file is missing, truncated or not a pickle at all."""


_KEY_TYPES = (str, bytes, int, float, bool, type(None))


def _checked_keys(items: list) -> list:
    for key in items[::2]:
        if not isinstance(key, _KEY_TYPES):  # a tuple key is hashed through all it shares
            raise _Refused("dict key type")
    return items


def _refuse_opcode(self: Any) -> None:
    raise _Refused("set")


class _PlainDataUnpickler(pickle._Unpickler):  # the Python one: its opcodes can be checked
    dispatch = dict(pickle._Unpickler.dispatch)

    def _setitem(self) -> None:
        _checked_keys([self.stack[-2]])
        pickle._Unpickler.load_setitem(self)

    def _setitems(self) -> None:
        items = _checked_keys(self.pop_mark())
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _dict(self) -> None:
        items = _checked_keys(self.pop_mark())
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    dispatch[pickle.SETITEM[0]] = _setitem
    dispatch[pickle.SETITEMS[0]] = _setitems
    dispatch[pickle.DICT[0]] = _dict
    for _op in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET):
        dispatch[_op[0]] = _refuse_opcode

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
    if not os.path.lexists(path):
        raise WeightsFileError(f"{path}: {what} not found")
    try:
        with open_regular(path) as f:  # a FIFO or device: refused, never blocks
            head = f.read(2)
            if not head:
                raise WeightsFileError(f"{path}: empty {what}")
            if head[:1] != b"\x80":  # every pickle of protocol 2+ starts with PROTO
                raise WeightsFileError(f"{path}: not a Paddle {what} (not a pickle)")
            f.seek(0)
            obj = _PlainDataUnpickler(_BoundedReader(f, os.fstat(f.fileno()).st_size),
                                      encoding="latin1").load()
    except _Refused:
        raise UnsafeWeightsError(refusal(path)) from None
    except WeightsFileError:
        raise
    except NotARegularFile as err:
        raise WeightsFileError(f"{path}: not a {what} ({err.reason})") from None
    except FileNotFoundError:  # a dangling link
        raise WeightsFileError(f"{path}: {what} not found") from None
    except PermissionError:
        raise WeightsFileError(f"{path}: cannot read {what} (permission denied)") from None
    except MemoryError:
        raise WeightsFileError(f"{path}: unreadable {what} (too large for memory)") from None
    except Exception as err:  # any failure to parse untrusted bytes: numpy's own checks
        # (wrong shape for the data, bad dtype), a stack underflow, a short frame...
        raise WeightsFileError(f"{path}: unreadable or truncated {what} ({type(err).__name__})") from None
    try:
        return _plain(_unpack_big_params(obj), {}, [0])
    except _Refused:
        raise UnsafeWeightsError(refusal(path)) from None
    except Exception as err:  # Paddle's bookkeeping entries malformed
        raise WeightsFileError(f"{path}: damaged {what} ({type(err).__name__})") from None


class _BoundedReader:
    """A file whose reads never ask for more than what is left: a length field claiming
    terabytes cannot make the reader allocate them."""

    def __init__(self, f: Any, size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(self.left if n < 0 or n > self.left else n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        data = self.f.readline(self.left)
        self.left -= len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


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
MAX_NODES = 10_000_000  # containers and values visited: far above any state dict


def _plain(obj: Any, done: dict[int, Any], count: list[int], depth: int = 0) -> Any:
    """Check the tree holds plain data only and turn Paddle's (name, ndarray) tensor
    pairs into arrays; drop Paddle's name table. A node shared by many parents (pickle's
    memo) is converted once (`done`), so the work is bounded by the file's size."""
    count[0] += 1
    if depth > 100 or count[0] > MAX_NODES:
        raise _Refused("nesting too deep or too many values")
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc" or obj.dtype.fields is not None or obj.dtype.subdtype is not None:
            raise _Refused("array of another dtype")
        return obj
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in "biufc":
            raise _Refused("scalar of another dtype")
        return obj
    if isinstance(obj, _SCALARS) or isinstance(obj, np.dtype):
        return obj
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        out: Any = _plain(obj[1], done, count, depth + 1)  # a Tensor as paddle.save writes it
    elif isinstance(obj, dict):
        out = obj.__class__() if type(obj) in (dict, collections.OrderedDict) else {}
        for key, value in obj.items():
            if key == "StructuredToParameterName@@":
                continue
            if not isinstance(key, _KEY_TYPES):
                raise _Refused("dict key type")
            out[key] = _plain(value, done, count, depth + 1)
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_plain(v, done, count, depth + 1) for v in obj)
    else:
        raise _Refused(type(obj).__name__)
    done[id(obj)] = out
    return out
