"""Read `.pdparams` files (pickles) without ever running code from them.

`paddle.load` is `pickle.load`: a crafted file can call any function while it is read.
Checkpoints, training states and teacher weights come from strangers' links in this
field, so every weights file of this project is read here instead, through an unpickler
that resolves only what a state dict holds: containers, numbers, strings, numpy arrays
and dtypes. A file asking for anything else (os.system, eval, a class) is refused before
that object is built, with one line: `FILE: not a plain weights file (refusing to
unpickle code)`. This is the policy of `torch.load(weights_only=True)`.

Nor can a file make reading it cost more than its size. Containers are built only by
the pickle's own opcodes (dict(...) and OrderedDict(...) take no arguments; SETITEMS fills
them), dict keys are flat (str, bytes, small ints: no tuple whose hash walks all it
shares), sets and calls by NEWOBJ/OBJ/INST are refused, and each allowed call has its
arguments checked. numpy arrays are built only the way numpy pickles them (their bytes
are in the file; `numpy.ndarray(...)` itself, which could describe a huge zero-stride
array, is not callable). BUILD sets the state only of an array or dtype the reader has
just made (dtypes are made as copies), so a file cannot change the reader's own objects
or numpy's for the rest of the process. The work done (elements and bytes copied, values
and array bytes of the result visited, once per path: a "billion laughs" pickle, or one
array shared under many keys, is refused) is counted
against WORK_PER_BYTE per byte of the file, and nesting is bounded by MAX_DEPTH.

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
    """Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'). Any other codec is
    refused: a weights file needs none, and some cost more than linear time in their
    input (punycode is quadratic: 60 KB of text took minutes)."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise _Refused(f"codec {encoding[:40]!r}")
    return codecs.encode(text, "latin1")


def _bytes(*args: Any) -> bytes:
    """Protocol 2 writes b'' as bytes(). bytes(N) would allocate N bytes, and bytes(str,
    codec) runs any codec (punycode is quadratic): only bytes() and bytes(str, 'latin1')."""
    if not args:
        return b""
    if len(args) != 2 or type(args[0]) is not str or type(args[1]) is not str:
        raise _Refused("bytes arguments")
    return _latin1_encode(*args)


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


# Dict keys are flat values whose hash costs at most their length once (str and bytes
# cache theirs); an int key is bounded, as Python hashes an int digit by digit every time.
_KEY_TYPES = (str, bytes, bool, type(None))
_MAX_INT_KEY_BITS = 64
# Work a file may cost per byte of its size: a container element copied, a byte copied
# into an array, a value of the result visited. A state dict costs about 3; a file whose
# reading would cost more (a shared list copied again and again) is refused.
WORK_PER_BYTE, WORK_BASE = 16, 100_000
MAX_DEPTH = 100  # containers inside containers: a state dict nests 3 or 4 deep


class _Work:
    """The work a file's reading has cost so far, against what its size allows."""

    def __init__(self, size: int) -> None:
        self.spent, self.limit = 0, WORK_BASE + WORK_PER_BYTE * size

    def spend(self, units: int) -> None:
        self.spent += units
        if self.spent > self.limit:
            raise _Refused("more work than the file's size allows")


def _checked_keys(items: list) -> list:
    for key in items[::2]:
        if not (isinstance(key, _KEY_TYPES) or isinstance(key, int) and key.bit_length() <= _MAX_INT_KEY_BITS):
            raise _Refused("dict key type")  # a tuple key is hashed through all it shares
    return items


def _need(target: Any, types: tuple) -> Any:
    if type(target) not in types:
        raise _Refused("items added to another type")
    return target


def _refuse_opcode(self: Any) -> None:
    raise _Refused("opcode")


def _is_basic_dtype(dtype: Any) -> bool:
    """A dtype of plain numbers: bool, integers, floats, complex (no fields, no sub-array)."""
    return (isinstance(dtype, np.dtype) and dtype.kind in "biufc" and dtype.fields is None
            and dtype.subdtype is None)


class _PlainDataUnpickler(pickle._Unpickler):  # the Python one: its opcodes can be checked
    """Containers come only from the pickle's own opcodes (EMPTY_DICT, SETITEMS...); a call
    (REDUCE) is one of the few a state dict needs, each with its arguments checked and its
    cost counted; BUILD sets the state of an array or dtype this reader has just made."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, work: _Work) -> None:
        super().__init__(file, encoding="latin1")
        self.work = work
        self.unbuilt: dict[int, Any] = {}  # id -> object made here whose BUILD is still due

    def _setitem(self) -> None:
        _checked_keys([self.stack[-2]])
        _need(self.stack[-3], (dict, collections.OrderedDict))  # an array's item set from a list
        pickle._Unpickler.load_setitem(self)                     # would walk the list's sharing

    def _setitems(self) -> None:
        items = _checked_keys(self.pop_mark())
        target = _need(self.stack[-1], (dict, collections.OrderedDict))
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _append(self) -> None:
        _need(self.stack[-2], (list,))
        pickle._Unpickler.load_append(self)

    def _appends(self) -> None:
        items = self.pop_mark()
        _need(self.stack[-1], (list,)).extend(items)

    def _dict(self) -> None:
        items = _checked_keys(self.pop_mark())
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def _reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            raise _Refused("call arguments")
        self.stack[-1] = self._call(func, args)

    def _call(self, func: Any, args: tuple) -> Any:
        if func is dict or func is collections.OrderedDict:  # filled by SETITEMS, never from pairs
            if args:
                raise _Refused("dict built from arguments")
            return func()
        if func is tuple or func is list:  # paddle.save writes a tensor as tuple((name, array))
            if len(args) != 1 or type(args[0]) not in (tuple, list):
                raise _Refused("container built from arguments")
            self.work.spend(len(args[0]))
            return func(args[0])
        if func is _latin1_encode or func is _bytes:
            if not all(type(a) is str for a in args):
                raise _Refused("bytes built from arguments")
            self.work.spend(sum(len(a) for a in args))
            return func(*args)
        if func is _reconstruct:
            return self._unbuilt(_reconstruct(*args))
        if func is np.dtype:
            # ('f4', align, copy=True): a copy, so its BUILD never changes numpy's own dtype
            if (len(args) != 3 or type(args[0]) is not str or len(args[0]) > 8
                    or type(args[1]) is not bool or args[2] is not True):
                raise _Refused("dtype arguments")
            dtype = np.dtype(*args)
            if not _is_basic_dtype(dtype):
                raise _Refused("dtype")
            return self._unbuilt(dtype)
        if func is _MULTIARRAY.scalar:
            if (len(args) != 2 or not _is_basic_dtype(args[0]) or type(args[1]) is not bytes
                    or len(args[1]) != args[0].itemsize):
                raise _Refused("scalar arguments")
            return func(*args)
        raise _Refused("call")

    def _unbuilt(self, obj: Any) -> Any:
        self.unbuilt[id(obj)] = obj  # kept alive: its id cannot be reused meanwhile
        return obj

    def _build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if self.unbuilt.pop(id(inst), None) is not inst:
            raise _Refused("BUILD on an object this reader did not just make")
        if isinstance(inst, np.dtype):
            # numpy's own: (3, '<', None, None, None, -1, -1, 0), and version 4 adds metadata
            ok = (type(state) is tuple and len(state) in (8, 9) and state[0] in (3, 4)
                  and state[1] in ("<", ">", "|", "=") and all(v is None for v in state[2:5])
                  and state[5:8] == (-1, -1, 0) and state[8:] in ((), (None,)))
        else:  # an array from _reconstruct: (version, shape, dtype, is_fortran, bytes)
            ok = (type(state) is tuple and len(state) == 5 and state[0] == 1 and type(state[1]) is tuple
                  and all(type(n) is int and n >= 0 for n in state[1]) and _is_basic_dtype(state[2])
                  and type(state[3]) is bool and type(state[4]) is bytes)
            if ok:
                self.work.spend(len(state[4]))
        if not ok:
            raise _Refused("state")
        inst.__setstate__(state)

    dispatch[pickle.SETITEM[0]] = _setitem
    dispatch[pickle.SETITEMS[0]] = _setitems
    dispatch[pickle.DICT[0]] = _dict
    dispatch[pickle.APPEND[0]] = _append
    dispatch[pickle.APPENDS[0]] = _appends
    dispatch[pickle.REDUCE[0]] = _reduce
    dispatch[pickle.BUILD[0]] = _build
    # sets (hashing), calls by other opcodes (cls(*args) unchecked), out-of-band buffers
    for _op in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET, pickle.NEWOBJ, pickle.NEWOBJ_EX,
                pickle.OBJ, pickle.INST, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
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
            size = os.fstat(f.fileno()).st_size
            work = _Work(size)
            obj = _PlainDataUnpickler(_BoundedReader(f, size), work).load()
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
        return _unpack_big_params(_plain(obj, work))
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
    """Paddle splits arrays above 4 GB into slices when saving with protocol 2/3. Run on
    the checked tree: slice names are strings and slices arrays (a shared nested list
    given to numpy would be walked path by path)."""
    key = "UnpackBigParamInfor@@"
    if not isinstance(obj, dict) or key not in obj:
        return obj
    info = obj.pop(key)
    if not isinstance(info, dict):
        raise ValueError("bad UnpackBigParamInfor@@")
    for name, parts in info.items():
        slices, shape = parts["slices"], parts["OriginShape"]
        if (not isinstance(slices, list | tuple) or not all(isinstance(s, str) for s in slices)
                or not isinstance(shape, list | tuple) or not all(type(n) is int for n in shape)):
            raise ValueError("bad UnpackBigParamInfor@@")
        arrays = [obj.pop(s) for s in slices]
        if not all(isinstance(a, np.ndarray) for a in arrays):
            raise ValueError("bad UnpackBigParamInfor@@")
        obj[name] = np.concatenate(arrays).reshape(shape)
    return obj


_SCALARS = (str, bytes, int, float, bool, complex, type(None))


def _plain(obj: Any, work: _Work, depth: int = 0) -> Any:
    """Check the tree holds plain data only, turn Paddle's (name, ndarray) tensor pairs
    into arrays and numpy scalars into Python numbers, and drop Paddle's name table.
    Walked as a tree: a part shared by many parents (pickle's memo) is visited, and
    copied, once per path, each visit counted as work, so a file whose tree is larger
    than its size allows ("billion laughs") is refused, and what is returned can be
    walked, printed or compared in time proportional to the file's size."""
    work.spend(1)
    if depth > MAX_DEPTH:
        raise _Refused("nesting too deep")
    if isinstance(obj, np.ndarray):
        if not _is_basic_dtype(obj.dtype):
            raise _Refused("array of another dtype")
        # its bytes, once per path: whoever scans the values (finiteness, the cast to
        # float32) does so per key, so one array shared under 10**4 keys would cost 10**4
        # times its size to check while the file holds it once
        work.spend(obj.nbytes)
        return obj
    if isinstance(obj, np.generic):
        return _python_number(obj)
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return _plain(obj[1], work, depth + 1)  # a Tensor as paddle.save writes it
    if type(obj) in (dict, collections.OrderedDict):
        out = type(obj)()
        for key, value in obj.items():
            if key != "StructuredToParameterName@@":
                out[key] = _plain(value, work, depth + 1)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v, work, depth + 1) for v in obj)
    raise _Refused(type(obj).__name__)  # a dtype, a class, anything else


def _python_number(value: np.generic) -> bool | int | float | complex:
    """A numpy scalar as the Python number it stands for, so a checkpoint's field is the
    same whichever way it was written (YAML and JSON writers refuse numpy's). float128
    beyond float64's range becomes inf, which the checks of each field then refuse."""
    kind = value.dtype.kind
    if kind == "b":
        return bool(value)
    if kind in "iu":
        return int(value)
    with np.errstate(over="ignore"):
        if kind == "f":
            return float(value)
        if kind == "c":
            return complex(value)
    raise _Refused("scalar of another dtype")
