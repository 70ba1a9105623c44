"""model/onednn.py: 3x3 convolutions on Paddle's own oneDNN library, through its C API.

Equal to Paddle's kernels up to float32 rounding, forward and both gradients; only where
it applies; never in a static graph; a clear line where the library cannot be used; a
failing oneDNN call is Paddle's kernel for that layer, never an error. Where Paddle's wheel
carries the library, the tests that need it fail (not skip) when it cannot be used.
"""
import ast
import inspect
import os
import shutil
import re
import subprocess
import sys
import threading

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from model import onednn
from model.loss import cosine_distillation_loss
from model.onednn import OneDNNConv2D, OneDNNConv2DTranspose, OneDNNUnavailable, load_library, use_conv_backend
from model.rd4ad import build_rd4ad
from utils.errors import UserError

LIBRARY = load_library()
# Skipped only where the wheel has no library (another platform's build): where it has one
# that cannot be used (another version, a broken file), these tests fail and say why.
needs_onednn = pytest.mark.skipif(not os.path.isfile(onednn.wheel_library_path()),
                                  reason=f"this Paddle build carries no oneDNN: {LIBRARY}")


@needs_onednn
def test_the_wheels_library_is_a_tested_version_and_loads():
    assert not isinstance(LIBRARY, str), LIBRARY
    assert LIBRARY.version in onednn.TESTED_VERSIONS


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def on_onednn_and_plain(make_layer):
    """Two layers with the same weights: the first on oneDNN, the second on Paddle's kernel."""
    ours, plain = make_layer(), make_layer()
    ours.set_state_dict(plain.state_dict())
    assert use_conv_backend(ours, "onednn", 2) == "onednn"
    return ours, plain


def conv_and_grads(conv: nn.Layer, x: paddle.Tensor):
    x = x.detach()
    x.stop_gradient = False
    y = conv(x)
    # a fixed, non-uniform upstream gradient: every output element matters
    dy = paddle.to_tensor(np.random.default_rng(1).normal(size=y.shape).astype(np.float32))
    (y * dy).sum().backward()
    grads = x.grad.numpy().copy(), conv.weight.grad.numpy().copy()
    conv.clear_gradients()
    return y.numpy(), *grads


@needs_onednn
@pytest.mark.parametrize("n, c, o, size, stride, kernel", [
    (2, 16, 32, 12, 1, 3),
    (2, 16, 32, 12, 2, 3),
    (1, 3, 8, 9, 1, 3),      # few channels, odd size: oneDNN's plain-layout path
    (3, 20, 12, 7, 2, 3),    # channels no multiple of 16, odd size, stride 2
    (2, 32, 16, 12, 1, 1),   # 1x1: the bottleneck blocks' and the teacher's
    (2, 24, 40, 7, 2, 1),    # 1x1 stride 2 (a downsample), odd size and channels
])
def test_forward_and_both_gradients_equal_paddles_kernels(n, c, o, size, stride, kernel):
    paddle.seed(0)
    ours, reference = on_onednn_and_plain(
        lambda: nn.Conv2D(c, o, kernel, stride=stride, padding=kernel // 2, bias_attr=False))
    assert type(ours) is OneDNNConv2D
    x = paddle.randn([n, c, size, size])
    for got, want, what in zip(conv_and_grads(ours, x), conv_and_grads(reference, x), ("output", "dx", "dw")):
        assert got.shape == want.shape, what
        assert relative(got, want) < 1e-5, f"{what}: {relative(got, want):.1e}"


@needs_onednn
@pytest.mark.parametrize("n, c, o, size, kernel, stride, padding", [
    (2, 16, 8, 6, 2, 2, 0),    # the student's upsampling
    (1, 5, 7, 5, 2, 2, 0),     # odd channel counts and size
    (2, 8, 4, 5, 3, 2, 1),     # overlapping windows, padding
])
def test_transposed_convolution_and_both_gradients_equal_paddles(n, c, o, size, kernel, stride, padding):
    paddle.seed(0)
    ours, reference = on_onednn_and_plain(
        lambda: nn.Conv2DTranspose(c, o, kernel, stride=stride, padding=padding, bias_attr=False))
    assert type(ours) is OneDNNConv2DTranspose
    x = paddle.randn([n, c, size, size])
    for got, want, what in zip(conv_and_grads(ours, x), conv_and_grads(reference, x), ("output", "dx", "dw")):
        assert got.shape == want.shape, what
        assert relative(got, want) < 1e-5, f"{what}: {relative(got, want):.1e}"
    # an explicit output size is Paddle's business
    y = ours(x, output_size=[(size - 1) * stride - 2 * padding + kernel + 1] * 2) if stride > 1 else None
    if y is not None:
        np.testing.assert_array_equal(y.numpy(), reference(x, output_size=list(y.shape[2:])).numpy())


@needs_onednn
def test_model_gradients_are_as_close_to_float64_as_paddles_float32_kernels():
    """The whole model (resnet18, 64 px): features within float32 noise of Paddle's
    kernels, and every parameter's gradient at least as close to a float64 run as Paddle's
    own float32 gradient is (a float32 kernel cannot do better than rounding). In eval mode:
    in train mode, batch statistics over the bottleneck's 2x2 maps of 2 images make the
    gradients chaotic (a relative 1e-6 change of the input moves Paddle's own float32
    gradients by up to 1e-2, measured on an AVX2 machine), so a check there compares
    rounding luck, not kernels. The convolutions' forward and backward are the same in both
    modes."""
    paddle.seed(0)
    nets = {b: build_rd4ad("resnet18", "none", 64, conv_backend=b) for b in ("paddle", "onednn")}
    nets["onednn"].set_state_dict(nets["paddle"].state_dict())
    exact = build_rd4ad("resnet18", "none", 64, conv_backend="paddle")
    exact.set_state_dict(nets["paddle"].state_dict())
    exact.to(dtype="float64")
    x = paddle.randn([2, 3, 64, 64])

    def run(net, images):
        net.eval()
        teacher, student = net.features(images)
        cosine_distillation_loss(teacher, student).backward()
        grads = {k: p.grad.numpy().astype(np.float64) for k, p in net.named_parameters() if p.grad is not None}
        net.clear_gradients()
        return [f.numpy() for f in teacher + student], grads

    feats_p, grads_p = run(nets["paddle"], x)
    feats_o, grads_o = run(nets["onednn"], x)
    _, grads_64 = run(exact, x.astype("float64"))
    assert nets["onednn"].conv_backend == "onednn"
    assert sum(type(s) is OneDNNConv2D for s in nets["onednn"].sublayers()) >= 10
    for got, want in zip(feats_o, feats_p):
        assert relative(got, want) < 1e-4
    assert grads_o.keys() == grads_p.keys() == grads_64.keys() and len(grads_o) > 50

    def error(grads):
        return max(np.linalg.norm(grads[k] - grads_64[k]) / np.linalg.norm(grads_64[k]) for k in grads_64)
    assert error(grads_o) <= 2 * error(grads_p) + 1e-6, (error(grads_o), error(grads_p))


@needs_onednn
def test_only_plain_1x1_and_3x3_convolutions_change_and_parameters_keep_their_names():
    layer = nn.Sequential(
        nn.Conv2D(4, 4, 3, padding=1, bias_attr=False),              # taken
        nn.Conv2D(4, 4, 1, bias_attr=False),                         # taken (1x1)
        nn.Conv2D(4, 4, 7, padding=3, bias_attr=False),              # 7x7: the teacher's stem stays
        nn.Conv2D(4, 4, 3, padding=1),                               # a bias
        nn.Conv2D(4, 4, 3, padding=1, groups=2, bias_attr=False),    # groups
        nn.Conv2D(4, 4, 3, padding=2, dilation=2, bias_attr=False),  # dilation
        nn.Conv2D(4, 4, 3, padding="SAME", bias_attr=False),         # padding by name
        nn.Conv2D(4, 4, 3, padding=1, padding_mode="reflect", bias_attr=False),
        nn.Conv2DTranspose(4, 4, 2, stride=2, bias_attr=False),     # taken
        nn.Conv2DTranspose(4, 4, 2, stride=2),                      # a bias
        nn.Conv2DTranspose(4, 4, 3, stride=2, output_padding=1, bias_attr=False),
    )
    names = list(layer.state_dict())
    use_conv_backend(layer, "onednn", 2)
    taken = [type(s) in (OneDNNConv2D, OneDNNConv2DTranspose) for s in layer.children()]
    assert taken == [True, True] + [False] * 6 + [True, False, False]
    assert list(layer.state_dict()) == names
    use_conv_backend(layer, "paddle", 2)
    assert all(type(s) in (nn.Conv2D, nn.Conv2DTranspose) for s in layer.children())


@needs_onednn
def test_where_it_does_not_apply_paddles_kernel_runs_unchanged():
    """float64, a non-contiguous input and a static graph all run Paddle's own conv2d."""
    paddle.seed(0)
    conv, plain = on_onednn_and_plain(lambda: nn.Conv2D(6, 6, 3, padding=1, bias_attr=False))
    x = paddle.randn([2, 6, 8, 8])
    # float64: Paddle's kernel, bit for bit
    conv64 = nn.Conv2D(6, 6, 3, padding=1, bias_attr=False)
    conv64.weight.set_value(conv.weight)
    conv64.to(dtype="float64")
    use_conv_backend(conv64, "onednn", 2)
    np.testing.assert_array_equal(conv64(x.astype("float64")).numpy(),
                                  F.conv2d(x.astype("float64"), conv64.weight, padding=1).numpy())
    # a transposed (strided) view goes through oneDNN as a contiguous copy: same values
    view = x.transpose([0, 1, 3, 2])
    assert relative(conv(view).numpy(), plain(view).numpy()) < 1e-5
    # a static graph: the program holds Paddle's conv2d, not a PyLayer
    static = paddle.jit.to_static(conv, input_spec=[paddle.static.InputSpec([None, 6, 8, 8], "float32")],
                                  full_graph=True)
    out = static(x)
    assert relative(out.numpy(), plain(x).numpy()) < 1e-5
    program = str(static.forward.concrete_program.main_program)
    assert "conv2d" in program and "py_layer" not in program.lower()


def test_auto_falls_back_to_paddle_and_onednn_refuses_in_one_line(monkeypatch, tmp_path, capsys):
    """Where Paddle carries no usable oneDNN (another build, or a broken library file)."""
    broken = tmp_path / "libdnnl.so.3"
    broken.write_bytes(b"not a shared library")
    reason = load_library(str(broken))
    assert isinstance(reason, str) and str(broken) in reason and "\n" not in reason
    assert "not found" in load_library(str(tmp_path / "missing.so"))
    monkeypatch.setattr(onednn, "wheel_library_path", lambda: str(broken))
    onednn._warn_once.cache_clear()
    layer = nn.Conv2D(4, 4, 3, padding=1, bias_attr=False)
    assert use_conv_backend(layer, "auto", 2) == "paddle" and type(layer) is nn.Conv2D
    assert capsys.readouterr().out == f"warning: --conv_backend auto: Paddle's kernels ({reason})\n"
    with pytest.raises(OneDNNUnavailable) as e:
        use_conv_backend(layer, "onednn", 2)
    assert str(e.value).startswith("--conv_backend onednn: ") and str(broken) in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="choose from auto, onednn, paddle"):
        use_conv_backend(layer, "fastest", 2)


def test_a_missing_library_is_paddles_kernels_for_auto_and_one_line_for_onednn(monkeypatch, tmp_path, capsys):
    """Another platform's wheel: no libdnnl at all. Auto is Paddle's kernels, quietly (the
    training log names the backend); onednn refuses in one line."""
    monkeypatch.setattr(onednn, "wheel_library_path", lambda: str(tmp_path / "libdnnl.so.3"))
    layer = nn.Sequential(nn.Conv2D(4, 4, 3, padding=1, bias_attr=False))
    assert use_conv_backend(layer, "auto", 2) == "paddle" and type(layer[0]) is nn.Conv2D
    with pytest.raises(OneDNNUnavailable, match="^--conv_backend onednn: .*libdnnl.so.3: not found"):
        use_conv_backend(layer, "onednn", 2)
    assert capsys.readouterr().out == ""


FAKE_DNNL = """
typedef struct { int major, minor, patch; const char *hash; unsigned cpu_runtime, gpu_runtime; } version_t;
static const version_t v = {MAJOR, MINOR, 0, "fake", 1, 0};
const version_t *dnnl_version(void) { return &v; }
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build a fake library")
@pytest.mark.parametrize("major, minor, why", [
    (3, 99, "oneDNN 3.99.0, not a version this module was tested with"),
    (4, 0, "oneDNN 4.0.0, this module speaks the 3.x C API"),
])
def test_a_library_of_another_version_is_never_called_by_auto(monkeypatch, tmp_path, capsys, major, minor, why):
    """A library whose dnnl_version reports another version (it has no other function, so
    any call past the version would fail): auto runs Paddle's kernels and says why in one
    line; onednn refuses in one line (4.x), or tries a 3.x and refuses when it lacks a
    function."""
    source = tmp_path / "fake.c"
    source.write_text(FAKE_DNNL.replace("MAJOR", str(major)).replace("MINOR", str(minor)))
    fake = tmp_path / "libdnnl.so.3"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(fake), str(source)], check=True, timeout=60)
    monkeypatch.setattr(onednn, "wheel_library_path", lambda: str(fake))
    onednn._warn_once.cache_clear()
    layer = nn.Conv2D(4, 4, 3, padding=1, bias_attr=False)
    for _ in range(2):  # said once per process
        assert use_conv_backend(layer, "auto", 2) == "paddle" and type(layer) is nn.Conv2D
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("warning: --conv_backend auto: Paddle's kernels (")
    assert why in out and str(fake) in out
    with pytest.raises(OneDNNUnavailable) as e:
        use_conv_backend(layer, "onednn", 2)
    assert "\n" not in str(e.value) and str(fake) in str(e.value)
    if major != 3:
        assert why in str(e.value)


@needs_onednn
def test_an_untested_version_is_paddles_for_auto_and_runs_as_asked_for_onednn(monkeypatch, tmp_path, capsys):
    """The real library under another name, reporting a version the tests never ran."""
    alias = tmp_path / "libdnnl.so.3"
    alias.symlink_to(onednn.wheel_library_path())
    monkeypatch.setattr(onednn, "wheel_library_path", lambda: str(alias))
    monkeypatch.setattr(onednn, "library_version", lambda path: "3.98.1")
    onednn._warn_once.cache_clear()
    paddle.seed(0)
    conv, plain = nn.Conv2D(4, 6, 3, padding=1, bias_attr=False), nn.Conv2D(4, 6, 3, padding=1, bias_attr=False)
    conv.set_state_dict(plain.state_dict())
    assert use_conv_backend(conv, "auto", 2) == "paddle" and type(conv) is nn.Conv2D
    assert "not a version this module was tested with (" in capsys.readouterr().out
    assert use_conv_backend(conv, "onednn", 2) == "onednn" and type(conv) is OneDNNConv2D
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "oneDNN 3.98.1" in out and "running it as asked" in out
    x = paddle.randn([2, 4, 7, 7])
    assert relative(conv(x).numpy(), plain(x).numpy()) < 1e-5


def failing(status: int):
    def call(*args):
        return status
    return call


@needs_onednn
@pytest.mark.parametrize("function, status, what, size", [
    ("dnnl_convolution_forward_primitive_desc_create", 3, "convolution forward: unimplemented", 11),
    ("dnnl_primitive_create", 1, "primitive: out of memory", 12),
    ("dnnl_primitive_execute", 5, "runtime error", 13),
])  # a size of its own each: no primitives of an earlier case in the shared cache
def test_a_failing_onednn_call_in_forward_is_paddles_kernel_for_that_layer(monkeypatch, capsys, function, status,
                                                                           what, size):
    """A oneDNN function returning an error status: the layer warns once and runs Paddle's
    kernel (same output, same gradients) from then on; the other layers stay on oneDNN."""
    paddle.seed(0)
    make = lambda: nn.Sequential(nn.Conv2D(5, 7, 3, padding=1, bias_attr=False), nn.ReLU(),  # noqa: E731
                                 nn.Conv2D(7, 3, 3, padding=1, bias_attr=False))
    net, plain = on_onednn_and_plain(make)
    x = paddle.randn([1, 5, size, size])
    capsys.readouterr()
    monkeypatch.setattr(LIBRARY.lib, function, failing(status))
    got = conv_and_grads(net[0], x)
    monkeypatch.undo()
    want = conv_and_grads(plain[0], x)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)  # Paddle's own kernel: bit for bit
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: oneDNN ") and what in lines[0], lines
    assert "this layer runs Paddle's kernel from now on" in lines[0] and f"input [1, 5, {size}, {size}]" in lines[0]
    assert net[0]._onednn is None
    conv_and_grads(net[0], x)  # later calls: Paddle's kernel, nothing more said
    assert capsys.readouterr().out == ""
    h = paddle.randn([1, 7, size, size])  # the other layer failed nowhere: still on oneDNN, still right
    assert net[2]._onednn is not None and relative(net[2](h).numpy(), plain[2](h).numpy()) < 1e-5
    assert net[2]._onednn is not None and capsys.readouterr().out == ""


@needs_onednn
@pytest.mark.parametrize("transposed", [False, True])
def test_a_failing_onednn_call_in_backward_gives_paddles_gradients(monkeypatch, capsys, transposed):
    """The forward pass ran on oneDNN; its backward call fails: the gradients are Paddle's
    (no error from inside Paddle's autograd), one warning, and the layer leaves oneDNN."""
    paddle.seed(0)
    kind = (lambda: nn.Conv2DTranspose(6, 4, 2, stride=2, bias_attr=False)) if transposed else \
        (lambda: nn.Conv2D(6, 4, 3, stride=2, padding=1, bias_attr=False))
    conv, plain = on_onednn_and_plain(kind)
    x = paddle.randn([2, 6, 9, 9])
    x.stop_gradient = False
    y = conv(x)
    monkeypatch.setattr(LIBRARY.lib, "dnnl_primitive_execute", failing(5))
    dy = paddle.randn(y.shape)
    (y * dy).sum().backward()
    monkeypatch.undo()
    got = x.grad.numpy().copy(), conv.weight.grad.numpy()
    x.clear_gradient()
    (plain(x) * dy).sum().backward()
    assert relative(got[0], x.grad.numpy()) < 1e-6 and relative(got[1], plain.weight.grad.numpy()) < 1e-6
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "runtime error" in out[0] and "Paddle's kernel from now on" in out[0]
    assert conv._onednn is None


PADDLES_PRIVATE = sorted({name for layer in (nn.Conv2D(1, 1, 3), nn.Conv2DTranspose(1, 1, 2))
                          for name in vars(layer) if name.startswith("_") and not name.startswith("__")})


def test_backend_paddle_reads_no_private_attribute_of_paddles_layers(monkeypatch):
    """The escape hatch survives a Paddle release that renames its layers' private
    attributes: only _conv_settings reads them (checked in the source), and backend paddle
    never calls it (made to raise here), also when switching a model back from oneDNN."""
    tree = ast.parse(inspect.getsource(onednn))
    readers = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
               for sub in ast.walk(node) if isinstance(sub, ast.Attribute) and sub.attr in PADDLES_PRIVATE}
    assert "_kernel_size" in PADDLES_PRIVATE and readers == {"_conv_settings"}, readers

    def renamed(layer):
        raise AttributeError("Paddle renamed its private attributes")
    monkeypatch.setattr(onednn, "_conv_settings", renamed)
    net = build_rd4ad("resnet18", "none", 64, conv_backend="paddle")
    assert net.conv_backend == "paddle"
    convs = [s for s in net.sublayers() if isinstance(s, (nn.Conv2D, nn.Conv2DTranspose))]
    assert len(convs) > 20 and all(type(s) in (nn.Conv2D, nn.Conv2DTranspose) for s in convs)
    monkeypatch.undo()
    if not isinstance(LIBRARY, str):  # back from oneDNN without reading them either
        with monkeypatch.context() as m:
            m.setattr(onednn, "_conv_settings", renamed)
            with pytest.raises(AttributeError, match="renamed"):  # the trap is armed: onednn meets it
                use_conv_backend(net, "onednn", 2)
        assert use_conv_backend(net, "onednn", 2) == "onednn"
        monkeypatch.setattr(onednn, "_conv_settings", renamed)
        assert use_conv_backend(net, "paddle") == "paddle"
        assert all(type(s) in (nn.Conv2D, nn.Conv2DTranspose) and "_onednn" not in vars(s) for s in convs)
    net.eval()
    with paddle.no_grad():
        assert net(paddle.randn([1, 3, 64, 64]))[0].shape[0] == 1


THREADS_SCRIPT = """
import sys
from utils import runtime
runtime.start()
import paddle, paddle.nn as nn
from paddle.base import core
from model.onednn import use_conv_backend
core.set_num_threads(int(sys.argv[2]))  # something else set OpenMP's count before this
conv = nn.Conv2D(4, 4, 3, padding=1, bias_attr=False)
use_conv_backend(conv, "onednn", int(sys.argv[1]))
conv(paddle.randn([1, 4, 6, 6]))
"""


@needs_onednn
@pytest.mark.parametrize("threads, other, gnu_first", [(1, 2, False), (2, 1, False), (1, 2, True)])
def test_onednn_runs_on_the_thread_count_it_was_given(threads, other, gnu_first):
    """Read from oneDNN itself (its verbose log names the threads it runs on): each run
    sets the count back, whatever OpenMP's count was before (a predictor changes it), and
    also when GNU OpenMP was loaded before Paddle's (as importing torch first does)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "PYTHONPATH": root}
    if gnu_first:
        env["LD_PRELOAD"] = "libgomp.so.1"
    proc = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(threads), str(other)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.findall(r"nthr:(\d+)", proc.stdout) == [str(threads)], proc.stdout[-2000:]


@needs_onednn
def test_convolutions_from_several_threads_give_each_its_own_result():
    """The scratch buffers are shared: the lock keeps concurrent calls apart."""
    paddle.seed(0)
    conv, plain = on_onednn_and_plain(lambda: nn.Conv2D(8, 8, 3, padding=1, bias_attr=False))
    inputs = [paddle.randn([2, 8, 10, 10]) for _ in range(4)]
    wanted = [plain(x).numpy() for x in inputs]
    results = [None] * 4

    def work(i):
        for _ in range(5):
            results[i] = conv(inputs[i]).numpy()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, wanted):
        assert relative(got, want) < 1e-5


@needs_onednn
def test_gradients_only_for_what_asks_for_one():
    """A frozen convolution's input gradient (a saliency map through the teacher), and the
    gradient of the one trainable layer behind a frozen one: equal to Paddle's kernels.
    (paddle.grad of a strict subset of the leaves that need one is the PyLayer's limit,
    doc/usage.md: --conv_backend.)"""
    paddle.seed(0)
    frozen, plain = on_onednn_and_plain(lambda: nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1, bias_attr=False), nn.ReLU(),
        nn.Conv2D(8, 4, 3, stride=2, padding=1, bias_attr=False)))
    for net in (frozen, plain):
        for p in net.parameters():
            p.stop_gradient = True
    x = paddle.randn([2, 3, 8, 8])

    def saliency(net):
        image = x.detach()
        image.stop_gradient = False
        return paddle.grad(net(image).square().sum(), [image])[0].numpy()
    assert relative(saliency(frozen), saliency(plain)) < 1e-5

    def last_layer(net):
        net[2].weight.stop_gradient = False
        net(x).square().sum().backward()
        grad = net[2].weight.grad.numpy()
        net.clear_gradients()
        return grad
    assert relative(last_layer(frozen), last_layer(plain)) < 1e-5


@needs_onednn
def test_an_input_changed_in_place_before_backward_is_refused():
    conv = nn.Conv2D(4, 4, 3, padding=1, bias_attr=False)
    use_conv_backend(conv, "onednn", 2)
    h = paddle.randn([1, 4, 6, 6])
    h.stop_gradient = False
    h = h * 1.0
    y = conv(h)
    h.scale_(2.0)
    # Paddle hands the backward pass's error on inside its own (an OSError, "External")
    with pytest.raises((RuntimeError, OSError), match="input, saved for its backward pass, was modified by an "
                                                      "inplace operation"):
        y.sum().backward()


@needs_onednn
def test_to_static_by_default_translation_holds_paddles_kernels():
    """paddle.jit.to_static without full_graph (SOT translation) too: saved, loaded, equal."""
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(4, 4, 3, padding=1, bias_attr=False), nn.ReLU(),
                        nn.Conv2DTranspose(4, 2, 2, stride=2, bias_attr=False))
    use_conv_backend(net, "onednn", 2)
    x = paddle.randn([2, 4, 8, 8])
    want = net(x).numpy()
    static = paddle.jit.to_static(net)
    assert relative(static(x).numpy(), want) < 1e-5


@needs_onednn
def test_primitive_cache_is_bounded_and_destroys_what_it_drops(monkeypatch):
    monkeypatch.setattr(onednn, "MAX_SHAPES", 4)
    convolutions = onednn.OneDNNConvolutions(LIBRARY, 2)
    w = paddle.randn([2, 2, 3, 3])
    dropped = []
    for size in range(3, 10):
        convolutions.forward(paddle.randn([1, 2, size, size]), w, 1, 1)
        for p in list(convolutions._primitives.values()):
            if p not in dropped:
                dropped.append(p)
    assert len(convolutions._primitives) == 4
    gone = [p for p in dropped if p not in convolutions._primitives.values()]
    assert len(gone) == 3 and all(not p.owned.handles for p in gone)  # every handle destroyed


@needs_onednn
def test_mismatched_channels_get_paddles_own_error():
    conv = nn.Conv2D(4, 4, 3, padding=1, bias_attr=False)
    use_conv_backend(conv, "onednn", 2)
    with pytest.raises(ValueError, match="(?i)channel"):
        conv(paddle.randn([1, 3, 6, 6]))


def test_onednn_is_for_the_cpu_device_only(monkeypatch):
    monkeypatch.setattr(paddle.device, "get_device", lambda: "gpu:0")
    layer = nn.Conv2D(4, 4, 3, padding=1, bias_attr=False)
    assert use_conv_backend(layer, "auto", 2) == "paddle" and type(layer) is nn.Conv2D
    with pytest.raises(OneDNNUnavailable, match="runs on the CPU only"):
        use_conv_backend(layer, "onednn", 2)


@needs_onednn
def test_second_order_gradients_are_refused_not_dropped():
    """create_graph=True would need the backward pass's own gradient, which the PyLayer has
    not: a clear error rather than a silently missing term."""
    conv = nn.Conv2D(3, 3, 3, padding=1, bias_attr=False)
    use_conv_backend(conv, "onednn")
    x = paddle.randn([1, 3, 5, 5])
    x.stop_gradient = False
    y = paddle.tanh(conv(x)).sum()
    with pytest.raises((RuntimeError, OSError), match="second-order gradients"):
        paddle.grad(y, [x], create_graph=True)


@needs_onednn
def test_a_model_can_be_deep_copied_and_the_copy_computes_the_same():
    import copy

    paddle.seed(0)
    net = build_rd4ad("resnet18", "none", 64)
    twin = copy.deepcopy(net)
    assert twin.conv_backend == "onednn" and type(twin.student.layer1[0].conv2) is OneDNNConv2D
    x = paddle.randn([1, 3, 64, 64])
    net.eval()
    twin.eval()
    with paddle.no_grad():
        np.testing.assert_array_equal(net(x)[0].numpy(), twin(x)[0].numpy())


@needs_onednn
def test_ctrl_c_inside_a_convolutions_backward_is_still_an_interrupt(monkeypatch, capsys):
    """Paddle wraps a KeyboardInterrupt raised in a PyLayer's backward in an OSError; the
    commands still end as interrupted (exit 130, one line), not as an output error."""
    from utils.cli import EXIT_INTERRUPTED, run_main

    conv = nn.Conv2D(3, 3, 3, padding=1, bias_attr=False)
    use_conv_backend(conv, "onednn")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(onednn.OneDNNConvolutions, "backward", interrupted)
    x = paddle.randn([1, 3, 5, 5])
    assert run_main(lambda: conv(x).sum().backward(), interrupted="interrupted; resume") == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted; resume"
