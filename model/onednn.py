"""1x1, 3x3 and transposed convolutions on oneDNN in Paddle's dynamic graph on the CPU.

Paddle 3.3.1's eager CPU `conv2d` and its gradients are im2col + GEMM kernels, 1.1-2.3x
slower than oneDNN's direct convolutions on the student's and bottleneck's 3x3 layers
(1.7x over all of them, which are half of a training step on Paddle's kernels). Paddle's
own wheel carries oneDNN (paddle/libs/libdnnl.so.3, used by Paddle Inference) but its
eager kernels do not call it, and the wheel has no oneDNN headers to compile against.
So this module calls oneDNN's stable C API through ctypes (nothing to compile) and wraps
forward and both backward passes in a PyLayer. The student's 2x2 stride-2 transposed
convolutions go the same way (oneDNN's deconvolution), and so do the 1x1 convolutions:
at 256 px Paddle's GEMM was 1.5-3.7x slower on them than oneDNN on a 2-core AMD EPYC
(tools/benchmark_convs.py), and an RD4AD training step 1.5x faster with them on oneDNN.
The teacher's 7x7 stem stays on Paddle's kernel (one layer, forward only, no gain).

- Same results as Paddle's kernels up to float32 rounding (tests/test_onednn.py: forward
  and both gradients within 1e-5 relative; the model's gradients as close to a float64
  run as Paddle's own).
- Only where it applies: the dynamic graph, float32 on the CPU, 4-D NCHW, groups 1,
  dilation 1, no bias, equal strides, an int padding (no output padding or output size
  for a transposed one). Anything else, and every static graph (to_static, export), runs
  Paddle's own kernel: exported models never contain this.
- `--conv_backend auto` uses oneDNN where Paddle's wheel has a tested version of it (x86-64
  Linux CPU builds) and the device is the CPU, else Paddle's kernels; `onednn` insists;
  `paddle` never uses it.
- Limits of Paddle 3.3.1's PyLayer, which training here never meets: a second
  `backward(retain_graph=True)` through any PyLayer crashes the process; hooks on a
  PyLayer's output are not called; `paddle.grad` for a strict subset of the leaves that
  need a gradient is refused; second-order gradients are refused here. Switch back with
  `use_conv_backend(net, "paddle")`.
- Import paddle before torch: oneDNN's OpenMP calls go to the OpenMP runtime loaded first,
  and with torch's first a review measured these convolutions slower than Paddle's own.

The C API's constants below are the values oneDNN 3.x defines (dnnl_types.h). A wrong one
could crash the process rather than fail, so `auto` uses only a library of a version the
tests passed with (TESTED_VERSIONS), read before any other call; any other version runs
Paddle's kernels, with one line saying why (`onednn` still runs it, with a warning). A
oneDNN call that fails (a status other than success) is never an error of the run: that
layer warns once and runs Paddle's kernel from then on. `paddle` reads no private
attribute of Paddle's layers (only _conv_settings does, and only for auto and onednn), so
it keeps working if a Paddle release renames them.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections import OrderedDict

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

try:
    from paddle.base.dygraph.base import in_sot_simulation_mode
except ImportError:  # a Paddle without SOT
    def in_sot_simulation_mode() -> bool:
        return False

from utils.errors import UserError
from utils.log import warn
from utils.runtime import eager_threads

from .choices import CONV_BACKENDS  # plain names, read by the settings

LIBRARY_NAME = "libdnnl.so.3"
# oneDNN versions tests/test_onednn.py passed with (Paddle 3.3.1's wheel: 3.6.2). Add one
# only after those tests pass with it; `auto` refuses the others.
TESTED_VERSIONS = ("3.6.2",)

# oneDNN 3.x C API values (dnnl_types.h / dnnl_common_types.h).
_MAX_NDIMS = 12
_F32 = 3                      # dnnl_f32
_TAG_ANY, _TAG_ABCD = 1, 5    # dnnl_format_tag_any, dnnl_abcd (plain NCHW / OIHW)
_CPU_ENGINE = 1               # dnnl_cpu
_IN_ORDER = 1                 # dnnl_stream_in_order
_FORWARD_TRAINING = 64        # dnnl_forward_training
_CONVOLUTION_DIRECT = 1       # dnnl_convolution_direct
_DECONVOLUTION_DIRECT = 0xA   # dnnl_deconvolution_direct
_Q_SRC, _Q_DIFF_SRC, _Q_WEIGHTS, _Q_DIFF_WEIGHTS, _Q_DST, _Q_DIFF_DST = 129, 130, 131, 132, 133, 134
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS = 1, 17, 33
_ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS = 129, 145, 161
_STATUS = {1: "out of memory", 2: "invalid arguments", 3: "unimplemented", 5: "runtime error",
           6: "not required", 7: "invalid graph", 8: "invalid graph op", 9: "invalid shape",
           10: "invalid data type"}

_Dims = ctypes.c_int64 * _MAX_NDIMS
_P = ctypes.c_void_p


class OneDNNUnavailable(UserError):
    """--conv_backend onednn was asked for where Paddle carries no usable oneDNN."""


class OneDNNCallFailed(RuntimeError):
    """A oneDNN C function returned a status other than success."""


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _P)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


def _dims(values: list[int]) -> _Dims:
    dims = _Dims()
    for i, v in enumerate(values):
        dims[i] = v
    return dims


class OneDNNLibrary:
    """Paddle's own libdnnl.so.3: the C functions used here, one CPU engine and stream."""

    def __init__(self, path: str) -> None:
        """Declare the functions and make the engine and stream: call only for a 3.x
        library (library_version)."""
        self.path = path
        self.version = library_version(path)
        lib = ctypes.CDLL(path)
        signatures = {
            "dnnl_engine_create": [ctypes.POINTER(_P), ctypes.c_int, ctypes.c_size_t],
            "dnnl_stream_create": [ctypes.POINTER(_P), _P, ctypes.c_uint],
            "dnnl_stream_wait": [_P],
            "dnnl_memory_desc_create_with_tag": [ctypes.POINTER(_P), ctypes.c_int, _Dims, ctypes.c_int, ctypes.c_int],
            "dnnl_memory_desc_create_with_strides": [ctypes.POINTER(_P), ctypes.c_int, _Dims, ctypes.c_int, _Dims],
            "dnnl_memory_desc_get_size": [_P],
            "dnnl_memory_create": [ctypes.POINTER(_P), _P, _P, _P],
            "dnnl_memory_set_data_handle": [_P, _P],
            # convolution and deconvolution take the same arguments
            **{f"dnnl_{kind}_{part}_primitive_desc_create": argtypes
               for kind in ("convolution", "deconvolution")
               for part, argtypes in (
                   ("forward", [ctypes.POINTER(_P), _P, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P,
                                _Dims, _Dims, _Dims, _Dims, _P]),
                   ("backward_data", [ctypes.POINTER(_P), _P, ctypes.c_int, _P, _P, _P,
                                      _Dims, _Dims, _Dims, _Dims, _P, _P]),
                   ("backward_weights", [ctypes.POINTER(_P), _P, ctypes.c_int, _P, _P, _P, _P,
                                         _Dims, _Dims, _Dims, _Dims, _P, _P]))},
            "dnnl_reorder_primitive_desc_create": [ctypes.POINTER(_P), _P, _P, _P, _P, _P],
            "dnnl_primitive_desc_query_md": [_P, ctypes.c_int, ctypes.c_int],
            "dnnl_memory_desc_equal": [_P, _P],
            "dnnl_primitive_create": [ctypes.POINTER(_P), _P],
            "dnnl_primitive_execute": [_P, _P, ctypes.c_int, ctypes.POINTER(_ExecArg)],
            "dnnl_primitive_destroy": [_P],
            "dnnl_primitive_desc_destroy": [_P],
            "dnnl_memory_destroy": [_P],
            "dnnl_memory_desc_destroy": [_P],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        lib.dnnl_primitive_desc_query_md.restype = _P
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        self.lib = lib
        self._omp_setters = _omp_thread_setters(os.path.dirname(path))
        self.engine = self._make(lib.dnnl_engine_create, _CPU_ENGINE, 0, what="engine")
        self.stream = self._make(lib.dnnl_stream_create, self.engine, _IN_ORDER, what="stream")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise OneDNNCallFailed(f"oneDNN {what}: {_STATUS.get(status, f'status {status}')}")

    def _make(self, fn, *args, what: str) -> _P:
        handle = _P()
        self.check(fn(ctypes.byref(handle), *args), what)
        return handle

    def plain_desc(self, shape: list[int]) -> _P:
        return self._make(self.lib.dnnl_memory_desc_create_with_tag, len(shape), _dims(shape), _F32, _TAG_ABCD,
                          what="memory descriptor")

    def strided_desc(self, shape: list[int], strides: list[int]) -> _P:
        return self._make(self.lib.dnnl_memory_desc_create_with_strides, len(shape), _dims(shape), _F32,
                          _dims(strides), what="memory descriptor")

    def any_desc(self, shape: list[int]) -> _P:
        return self._make(self.lib.dnnl_memory_desc_create_with_tag, len(shape), _dims(shape), _F32, _TAG_ANY,
                          what="memory descriptor")

    def query(self, primitive_desc: _P, what: int) -> _P:
        return _P(self.lib.dnnl_primitive_desc_query_md(primitive_desc, what, 0))

    def memory(self, desc: _P) -> _P:
        return self._make(self.lib.dnnl_memory_create, desc, self.engine, None, what="memory")

    def primitive(self, primitive_desc: _P) -> _P:
        return self._make(self.lib.dnnl_primitive_create, primitive_desc, what="primitive")

    def execute(self, primitive: _P, args: list[tuple[int, _P]], what: str) -> None:
        exec_args = (_ExecArg * len(args))(*[_ExecArg(arg, memory) for arg, memory in args])
        self.check(self.lib.dnnl_primitive_execute(primitive, self.stream, len(args), exec_args), what)

    def wait(self) -> None:
        self.check(self.lib.dnnl_stream_wait(self.stream), "stream wait")

    def set_threads(self, threads: int) -> None:
        """OpenMP's thread count for the next primitives, in each OpenMP runtime of the
        process. libdnnl.so.3 names GNU OpenMP, but its calls bind to whichever OpenMP was
        loaded first: Paddle's Intel OpenMP (libiomp5) when paddle is imported first, GNU
        OpenMP when torch is (checked in tests/test_onednn.py by oneDNN's own verbose log).
        MKL's own count is left alone."""
        for set_num_threads in self._omp_setters:
            set_num_threads(threads)


def _omp_thread_setters(folder: str) -> list:
    """omp_set_num_threads of Paddle's Intel OpenMP (beside libdnnl) and of GNU OpenMP (which
    libdnnl names, so it is loaded with it)."""
    setters = []
    for name in (os.path.join(folder, "libiomp5.so"), "libgomp.so.1"):
        try:
            setters.append(ctypes.CDLL(name).omp_set_num_threads)
        except (OSError, AttributeError):
            pass
    return setters


def wheel_library_path() -> str:
    """Where Paddle's wheel keeps its oneDNN (x86-64 Linux builds)."""
    return os.path.join(os.path.dirname(paddle.__file__), "libs", LIBRARY_NAME)


def library_version(path: str) -> str:
    """The library's "major.minor.patch", from dnnl_version (whose struct is the same in
    every oneDNN since 1.0): nothing else of it is called before this is known."""
    lib = ctypes.CDLL(path)
    lib.dnnl_version.restype = ctypes.POINTER(_Version)
    v = lib.dnnl_version().contents
    return f"{v.major}.{v.minor}.{v.patch}"


@functools.lru_cache(maxsize=None)
def _open_library(path: str) -> OneDNNLibrary:
    return OneDNNLibrary(path)


def load_library(path: str | None = None, allow_untested: bool = False) -> OneDNNLibrary | str:
    """Paddle's oneDNN library, or the reason it cannot be used (one line). Only a version
    in TESTED_VERSIONS unless `allow_untested` (then any 3.x)."""
    path = path or wheel_library_path()
    if not os.path.isfile(path):
        return f"{path}: not found (this Paddle build carries no oneDNN)"
    try:
        version = library_version(path)
        if not version.startswith("3."):
            return f"{path}: oneDNN {version}, this module speaks the 3.x C API"
        if version not in TESTED_VERSIONS and not allow_untested:
            return (f"{path}: oneDNN {version}, not a version this module was tested with "
                    f"({', '.join(TESTED_VERSIONS)})")
        return _open_library(path)
    except (OSError, AttributeError, RuntimeError) as e:
        return f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warn(message)


class _Scratch:
    """Growing buffers for the blocked layouts oneDNN wants: one per role (source-like,
    weights-like, destination-like), reused by every convolution, so the extra memory is
    three tensors' worth rather than one set per layer shape."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def pointer(self, role: str, nbytes: int) -> int:
        buf = self.buffers.get(role)
        if buf is None or buf.nbytes < nbytes + 64:
            buf = self.buffers[role] = np.empty(nbytes + 64, dtype=np.uint8)
        address = buf.ctypes.data
        return address + (-address % 64)  # 64-byte aligned, as oneDNN prefers


class _Owned:
    """The oneDNN objects made for one shape, destroyed together when it leaves the cache."""

    def __init__(self, lib: OneDNNLibrary) -> None:
        self.lib, self.handles = lib, []

    def __call__(self, kind: str, handle: _P) -> _P:
        """Own `handle`, a dnnl_{kind}_t (primitive, primitive_desc, memory or memory_desc)."""
        self.handles.append((kind, handle))
        return handle

    def close(self) -> None:
        for kind, handle in reversed(self.handles):
            getattr(self.lib.lib, f"dnnl_{kind}_destroy")(handle)
        self.handles.clear()


class _Layout:
    """A tensor's plain NCHW/OIHW buffer as one primitive argument: the primitive's own
    layout in a scratch buffer, with the reorder between them, where the two differ."""

    def __init__(self, own: _Owned, plain: _P, wanted: _P, role: str, out: bool) -> None:
        lib = self.lib = own.lib
        self.role, self.out = role, out
        self.user = own("memory", lib.memory(plain))
        self.direct = bool(lib.lib.dnnl_memory_desc_equal(plain, wanted))
        self.work = self.user if self.direct else own("memory", lib.memory(wanted))
        self.nbytes = int(lib.lib.dnnl_memory_desc_get_size(wanted))
        self.reorder = None
        if not self.direct:
            source, target = (wanted, plain) if out else (plain, wanted)
            desc = own("primitive_desc", lib._make(lib.lib.dnnl_reorder_primitive_desc_create, source, lib.engine,
                                                   target, lib.engine, None, what="reorder"))
            self.reorder = own("primitive", lib.primitive(desc))

    def bind(self, tensor: paddle.Tensor, scratch: _Scratch, reorder: bool = True) -> _P:
        """Point at `tensor` (reordered into scratch for an input, unless the scratch holds
        it already: `reorder` False); the memory to pass."""
        set_handle = self.lib.lib.dnnl_memory_set_data_handle
        self.lib.check(set_handle(self.user, _P(tensor.data_ptr())), "set data handle")
        if not self.direct:
            self.lib.check(set_handle(self.work, _P(scratch.pointer(self.role, self.nbytes))), "set data handle")
            if not self.out and reorder:
                self.lib.execute(self.reorder, [(_ARG_SRC, self.user), (_ARG_DST, self.work)], "reorder")
        return self.work

    def finish(self) -> None:
        """For an output: reorder the primitive's layout back into the tensor."""
        if not self.direct:
            self.lib.execute(self.reorder, [(_ARG_SRC, self.work), (_ARG_DST, self.user)], "reorder")


class _ConvPrimitives:
    """Forward, backward-data and backward-weights primitives for one (transposed)
    convolution shape, with the layouts of their arguments."""

    def __init__(self, lib: OneDNNLibrary, x_shape: list[int], w_shape: list[int], stride: int,
                 padding: int, transposed: bool) -> None:
        own = self.owned = _Owned(lib)
        try:
            self._build(own, list(x_shape), list(w_shape), stride, padding, transposed)
        except Exception:
            own.close()
            raise

    def _build(self, own: _Owned, xs: list[int], w_shape: list[int], stride: int, padding: int,
               transposed: bool) -> None:
        lib = own.lib
        n, c, h, w = xs
        if transposed:  # Paddle's weight [C_in, C_out, kh, kw]; oneDNN's logical order (out, in, kh, kw)
            i, o, kh, kw = w_shape
            self.y_shape = [n, o, (h - 1) * stride - 2 * padding + kh, (w - 1) * stride - 2 * padding + kw]
            logical_w = [o, i, kh, kw]
            plain_w = own("memory_desc", lib.strided_desc(logical_w, [kh * kw, o * kh * kw, kw, 1]))
            kind, algorithm = "deconvolution", _DECONVOLUTION_DIRECT
        else:
            o, _, kh, kw = w_shape
            self.y_shape = [n, o, (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1]
            logical_w = w_shape
            plain_w = own("memory_desc", lib.plain_desc(logical_w))
            kind, algorithm = "convolution", _CONVOLUTION_DIRECT
        ys = self.y_shape
        any_x, any_w, any_y = (own("memory_desc", lib.any_desc(s)) for s in (xs, logical_w, ys))
        plain_x, plain_y = (own("memory_desc", lib.plain_desc(s)) for s in (xs, ys))
        strides, no_dilation, pads = _dims([stride, stride]), _dims([0, 0]), _dims([padding, padding])
        forward_fn, data_fn, weights_fn = (getattr(lib.lib, f"dnnl_{kind}_{part}_primitive_desc_create")
                                           for part in ("forward", "backward_data", "backward_weights"))
        fwd = own("primitive_desc", lib._make(forward_fn, lib.engine, _FORWARD_TRAINING, algorithm, any_x, any_w,
                                              None, any_y, strides, no_dilation, pads, pads, None,
                                              what=f"{kind} forward"))
        bwd_data = own("primitive_desc", lib._make(data_fn, lib.engine, algorithm, any_x, any_w, any_y, strides,
                                                   no_dilation, pads, pads, fwd, None, what=f"{kind} backward data"))
        bwd_weights = own("primitive_desc", lib._make(weights_fn, lib.engine, algorithm, any_x, any_w, None, any_y,
                                                      strides, no_dilation, pads, pads, fwd, None,
                                                      what=f"{kind} backward weights"))
        self.forward = own("primitive", lib.primitive(fwd))
        self.backward_data = own("primitive", lib.primitive(bwd_data))
        self.backward_weights = own("primitive", lib.primitive(bwd_weights))
        q = lib.query  # descriptors owned by their primitive descriptor
        self.f_x = _Layout(own, plain_x, q(fwd, _Q_SRC), "src", False)
        self.f_w = _Layout(own, plain_w, q(fwd, _Q_WEIGHTS), "weights", False)
        self.f_y = _Layout(own, plain_y, q(fwd, _Q_DST), "dst", True)
        self.d_dy = _Layout(own, plain_y, q(bwd_data, _Q_DIFF_DST), "dst", False)
        self.d_w = _Layout(own, plain_w, q(bwd_data, _Q_WEIGHTS), "weights", False)
        self.d_dx = _Layout(own, plain_x, q(bwd_data, _Q_DIFF_SRC), "src", True)
        self.w_x = _Layout(own, plain_x, q(bwd_weights, _Q_SRC), "src", False)
        self.w_dy = _Layout(own, plain_y, q(bwd_weights, _Q_DIFF_DST), "dst", False)
        self.w_dw = _Layout(own, plain_w, q(bwd_weights, _Q_DIFF_WEIGHTS), "weights", True)
        # Both backward passes usually want the output gradient in the same layout: reorder it once.
        self.same_dy_layout = bool(lib.lib.dnnl_memory_desc_equal(q(bwd_data, _Q_DIFF_DST),
                                                                  q(bwd_weights, _Q_DIFF_DST)))


def _cpu_empty(shape: list[int]) -> paddle.Tensor:
    """A float32 CPU tensor to write into, wherever Paddle's default device is."""
    return paddle.empty(shape, dtype="float32", device=paddle.CPUPlace())


# Shapes whose primitives stay built. A training step of wide_resnet50_2 meets 34 (RD4AD) or
# 46 (RD++) per batch size, and an epoch's last, smaller batch as many again: room for both
# and evaluation batches, so that no epoch rebuilds them.
MAX_SHAPES = 192


class OneDNNConvolutions:
    """The primitives of the convolution shapes met last (at most MAX_SHAPES, the oldest
    destroyed first), run one at a time: a lock, as the scratch buffers are shared."""

    def __deepcopy__(self, memo: dict) -> "OneDNNConvolutions":
        return self  # a process-wide resource: a copied model shares it (native handles cannot be copied)

    def __init__(self, lib: OneDNNLibrary, threads: int) -> None:
        self.lib, self.threads = lib, threads
        self._primitives: OrderedDict[tuple, _ConvPrimitives] = OrderedDict()
        self._scratch = _Scratch()
        self._lock = threading.Lock()

    def _for(self, x: paddle.Tensor, w: paddle.Tensor, stride: int, padding: int,
             transposed: bool) -> _ConvPrimitives:
        key = (tuple(x.shape), tuple(w.shape), stride, padding, transposed)
        if key in self._primitives:
            self._primitives.move_to_end(key)
        else:
            self._primitives[key] = _ConvPrimitives(self.lib, list(x.shape), list(w.shape), stride, padding,
                                                    transposed)
            while len(self._primitives) > max(1, MAX_SHAPES):
                self._primitives.popitem(last=False)[1].owned.close()
        return self._primitives[key]

    def forward(self, x: paddle.Tensor, w: paddle.Tensor, stride: int, padding: int,
                transposed: bool = False) -> paddle.Tensor:
        with self._lock:
            p = self._for(x, w, stride, padding, transposed)
            y = _cpu_empty(p.y_shape)
            self.lib.set_threads(self.threads)
            args = [(_ARG_SRC, p.f_x.bind(x, self._scratch)), (_ARG_WEIGHTS, p.f_w.bind(w, self._scratch)),
                    (_ARG_DST, p.f_y.bind(y, self._scratch))]
            self.lib.execute(p.forward, args, "forward")
            p.f_y.finish()
            self.lib.wait()
        return y

    def backward(self, x: paddle.Tensor, w: paddle.Tensor, dy: paddle.Tensor, stride: int, padding: int,
                 transposed: bool, need_dx: bool, need_dw: bool) -> tuple[paddle.Tensor | None, paddle.Tensor | None]:
        """The gradients asked for (None for the others)."""
        dx = dw = None
        with self._lock:
            p = self._for(x, w, stride, padding, transposed)
            self.lib.set_threads(self.threads)
            if need_dx:
                dx = _cpu_empty(x.shape)
                args = [(_ARG_DIFF_DST, p.d_dy.bind(dy, self._scratch)), (_ARG_WEIGHTS, p.d_w.bind(w, self._scratch)),
                        (_ARG_DIFF_SRC, p.d_dx.bind(dx, self._scratch))]
                self.lib.execute(p.backward_data, args, "backward data")
                p.d_dx.finish()
            if need_dw:
                dw = _cpu_empty(w.shape)
                dy_in_scratch = need_dx and p.same_dy_layout  # the "dst" scratch still holds it
                args = [(_ARG_SRC, p.w_x.bind(x, self._scratch)),
                        (_ARG_DIFF_DST, p.w_dy.bind(dy, self._scratch, reorder=not dy_in_scratch)),
                        (_ARG_DIFF_WEIGHTS, p.w_dw.bind(dw, self._scratch))]
                self.lib.execute(p.backward_weights, args, "backward weights")
                p.w_dw.finish()
            self.lib.wait()
        return dx, dw


@functools.lru_cache(maxsize=None)
def shared_convolutions(lib: OneDNNLibrary, threads: int) -> OneDNNConvolutions:
    """One primitive cache and one set of scratch buffers per process (and thread count),
    shared by every model: primitives are built once per shape, not once per model."""
    return OneDNNConvolutions(lib, threads)


def _paddle_gradients(x: paddle.Tensor, weight: paddle.Tensor, dy: paddle.Tensor, stride: int, padding: int,
                      transposed: bool, need_dx: bool, need_dw: bool) -> tuple[paddle.Tensor | None, ...]:
    """The gradients asked for, by Paddle's own kernels (a oneDNN call failed)."""
    with paddle.enable_grad():
        x, weight = x.detach(), weight.detach()
        x.stop_gradient, weight.stop_gradient = not need_dx, not need_dw
        y = (F.conv2d_transpose if transposed else F.conv2d)(x, weight, stride=stride, padding=padding)
        wanted = [t for t, need in ((x, need_dx), (weight, need_dw)) if need]
        grads = iter(paddle.grad([y], wanted, [dy]))
    return tuple(next(grads) if need else None for need in (need_dx, need_dw))


class _OneDNNConv2DFunction(PyLayer):
    """Forward and both backward passes. Gradients only for inputs that want one (Paddle
    refuses others); a saved input changed in place before backward is refused, as Paddle's
    own conv2d refuses it, rather than differentiated at the wrong point. A oneDNN call
    failing in the backward pass: that call's gradients by Paddle's kernels, and the layer
    leaves oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, layer, stride, padding, transposed):
        ctx.need_dx, ctx.need_dw = not x.stop_gradient, not weight.stop_gradient
        x, weight = x.contiguous(), weight.contiguous()
        ctx.layer, ctx.convolutions = layer, layer._onednn
        ctx.stride, ctx.padding, ctx.transposed = stride, padding, transposed
        ctx.versions = (x._inplace_version(), weight._inplace_version())
        ctx.save_for_backward(x, weight)
        return ctx.convolutions.forward(x, weight, stride, padding, transposed)

    @staticmethod
    def backward(ctx, dy):
        if paddle.is_grad_enabled():  # create_graph=True: this backward would need its own gradient
            raise RuntimeError("second-order gradients (create_graph=True) through model/onednn.py's "
                               "convolutions are not supported: use_conv_backend(net, \"paddle\")")
        x, weight = ctx.saved_tensor()
        for name, tensor, version in (("input", x, ctx.versions[0]), ("weight", weight, ctx.versions[1])):
            if tensor._inplace_version() != version:
                raise RuntimeError(f"a convolution's {name}, saved for its backward pass, was modified by an "
                                   f"inplace operation after the forward pass (model/onednn.py)")
        args = (x, weight, dy.contiguous(), ctx.stride, ctx.padding, ctx.transposed, ctx.need_dx, ctx.need_dw)
        try:
            return ctx.convolutions.backward(*args)
        except (OneDNNCallFailed, ctypes.ArgumentError) as e:
            ctx.layer._leave_onednn(e, x, weight)
            return _paddle_gradients(*args)


class _RunsOnOneDNN:
    """What both layer classes share: their convolutions (with the stride and padding
    read when the layer was switched), whether this call applies, and the way back to
    Paddle's kernel when a oneDNN call fails."""

    _onednn: OneDNNConvolutions | None = None
    _onednn_geometry: tuple[int, int] = (1, 0)  # (stride, padding)

    def _uses_onednn(self, x: paddle.Tensor) -> bool:
        # Never while to_static translates (SOT simulates this code with the dynamic mode on).
        if self._onednn is None or not paddle.in_dynamic_mode() or in_sot_simulation_mode():
            return False
        # Channels that do not fit the weight: Paddle's kernel, for Paddle's own error message.
        channels = self.weight.shape[0 if isinstance(self, nn.Conv2DTranspose) else 1]
        return (x.place.is_cpu_place() and x.dtype == paddle.float32 and self.weight.dtype == paddle.float32
                and len(x.shape) == 4 and x.shape[1] == channels)

    def _run_on_onednn(self, x: paddle.Tensor, transposed: bool) -> paddle.Tensor | None:
        """The output by oneDNN, or None when a oneDNN call failed (the layer has left it)."""
        try:
            return _OneDNNConv2DFunction.apply(x, self.weight, self, *self._onednn_geometry, transposed)
        except (OneDNNCallFailed, ctypes.ArgumentError) as e:
            self._leave_onednn(e, x, self.weight)
            return None

    def _leave_onednn(self, error: Exception, x: paddle.Tensor, weight: paddle.Tensor) -> None:
        """Paddle's kernel for this layer from now on, said once."""
        if self._onednn is not None:
            self._onednn = None
            warn(f"{str(error).splitlines()[0]} ({type(self).__name__[len('OneDNN'):]}, input {list(x.shape)}, "
                 f"weight {list(weight.shape)}): this layer runs Paddle's kernel from now on")


class OneDNNConv2D(_RunsOnOneDNN, nn.Conv2D):
    """nn.Conv2D that runs on oneDNN where it applies (see the module's docstring); the
    same parameters and state_dict, so checkpoints and exports do not change."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self._run_on_onednn(x, False) if self._uses_onednn(x) else None
        return nn.Conv2D.forward(self, x) if y is None else y


class OneDNNConv2DTranspose(_RunsOnOneDNN, nn.Conv2DTranspose):
    """nn.Conv2DTranspose (the student's 2x2 stride-2 upsampling) on oneDNN's deconvolution
    where it applies; as OneDNNConv2D otherwise."""

    def forward(self, x: paddle.Tensor, output_size=None) -> paddle.Tensor:
        y = self._run_on_onednn(x, True) if output_size is None and self._uses_onednn(x) else None
        return nn.Conv2DTranspose.forward(self, x, output_size) if y is None else y


_OURS = {OneDNNConv2D: nn.Conv2D, OneDNNConv2DTranspose: nn.Conv2DTranspose}


def _conv_settings(conv: nn.Layer) -> dict:
    """A convolution's settings, from Paddle's private attributes: the only place this
    module reads them (so `paddle`, which never calls it, survives their renaming)."""
    return {"kernel": list(conv._kernel_size), "stride": list(conv._stride), "padding": conv._padding,
            "groups": conv._groups, "dilation": list(conv._dilation), "data_format": conv._data_format,
            "padding_mode": conv._padding_mode}


def _onednn_class(layer: nn.Layer) -> tuple[type, tuple[int, int]] | None:
    """(our class, (stride, padding)) for a layer oneDNN runs here: a plain 1x1 or 3x3
    convolution or a plain transposed convolution
    without output padding (both: groups 1, dilation 1, no bias, NCHW, equal strides, an int
    padding of zeros); None for any other layer."""
    paddles = type(layer)  # Paddle's own class: _to_paddles_own ran first
    if paddles not in (nn.Conv2D, nn.Conv2DTranspose):
        return None
    c = _conv_settings(layer)
    plain = (c["groups"] == 1 and c["dilation"] == [1, 1] and layer.bias is None and c["data_format"] == "NCHW"
             and c["stride"][0] == c["stride"][1] and isinstance(c["padding"], int)
             and c["padding_mode"] == "zeros")
    if paddles is nn.Conv2D and plain and c["kernel"] in ([1, 1], [3, 3]):
        return OneDNNConv2D, (c["stride"][0], c["padding"])
    if paddles is nn.Conv2DTranspose and plain and layer.output_padding == 0:
        return OneDNNConv2DTranspose, (c["stride"][0], c["padding"])
    return None


def _to_paddles_own(layer: nn.Layer) -> None:
    """Every layer of ours back to Paddle's class (its type alone decides: no attribute of
    Paddle's is read)."""
    for sub in layer.sublayers(include_self=True):
        if type(sub) in _OURS:
            sub.__class__ = _OURS[type(sub)]
            for name in ("_onednn", "_onednn_geometry"):
                sub.__dict__.pop(name, None)


def use_conv_backend(layer: nn.Layer, backend: str, threads: int | None = None) -> str:
    """Run `layer`'s 1x1, 3x3 and transposed convolutions on `backend` ("auto", "onednn" or
    "paddle"); returns the backend in use ("onednn" or "paddle"). Auto takes oneDNN when a
    tested version loads and Paddle's device is the CPU (one line saying why not, where the
    wheel has a library it cannot use); "onednn" where it cannot run raises one line.
    `threads`: OpenMP threads for oneDNN (default: the dynamic graph's, OMP_NUM_THREADS)."""
    if backend not in CONV_BACKENDS:
        raise UserError(f"--conv_backend {backend!r}: choose from {', '.join(CONV_BACKENDS)}")
    convolutions = None
    device = paddle.device.get_device()
    if backend == "onednn" and not device.startswith("cpu"):
        raise OneDNNUnavailable(f"--conv_backend onednn: runs on the CPU only (Paddle's device is {device})")
    if backend != "paddle" and device.startswith("cpu"):
        lib = load_library(allow_untested=backend == "onednn")
        if isinstance(lib, str):
            if backend == "onednn":
                raise OneDNNUnavailable(f"--conv_backend onednn: {lib}")
            if os.path.isfile(wheel_library_path()):  # a library it cannot use, rather than none
                _warn_once(f"--conv_backend auto: Paddle's kernels ({lib})")
        else:
            if lib.version not in TESTED_VERSIONS:
                _warn_once(f"--conv_backend onednn: oneDNN {lib.version} at {lib.path} is not a version this "
                           f"module was tested with ({', '.join(TESTED_VERSIONS)}); running it as asked")
            convolutions = shared_convolutions(lib, threads or eager_threads())
    _to_paddles_own(layer)
    if convolutions is None:
        return "paddle"
    for sub in layer.sublayers(include_self=True):
        found = _onednn_class(sub)
        if found is not None:
            # Same object, same parameters: only the forward changes (state_dict names stay).
            sub.__class__, sub._onednn_geometry = found
            sub._onednn = convolutions
    return "onednn"
