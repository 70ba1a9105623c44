"""model/onednn.py: 3x3 convolutions on Paddle's own oneDNN library, through its C API.

Equal to Paddle's kernels up to float32 rounding, forward and both gradients; only where
it applies; never in a static graph; a clear line where the library cannot be used.
"""
import os
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
needs_onednn = pytest.mark.skipif(isinstance(LIBRARY, str), reason=f"no oneDNN here: {LIBRARY}")


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
@pytest.mark.parametrize("n, c, o, size, stride", [
    (2, 16, 32, 12, 1),
    (2, 16, 32, 12, 2),
    (1, 3, 8, 9, 1),      # few channels, odd size: oneDNN's plain-layout path
    (3, 20, 12, 7, 2),    # channels no multiple of 16, odd size, stride 2
])
def test_forward_and_both_gradients_equal_paddles_kernels(n, c, o, size, stride):
    paddle.seed(0)
    ours, reference = on_onednn_and_plain(lambda: nn.Conv2D(c, o, 3, stride=stride, padding=1, bias_attr=False))
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
    """The whole model (resnet18, 64 px, train mode): features within float32 noise of
    Paddle's kernels, and every parameter's gradient at least as close to a float64 run as
    Paddle's own float32 gradient is (a float32 kernel cannot do better than rounding)."""
    paddle.seed(0)
    nets = {b: build_rd4ad("resnet18", "none", 64, conv_backend=b) for b in ("paddle", "onednn")}
    nets["onednn"].set_state_dict(nets["paddle"].state_dict())
    exact = build_rd4ad("resnet18", "none", 64, conv_backend="paddle")
    exact.set_state_dict(nets["paddle"].state_dict())
    exact.to(dtype="float64")
    x = paddle.randn([2, 3, 64, 64])

    def run(net, images):
        net.train()
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
def test_only_plain_3x3_convolutions_change_and_parameters_keep_their_names():
    layer = nn.Sequential(
        nn.Conv2D(4, 4, 3, padding=1, bias_attr=False),              # taken
        nn.Conv2D(4, 4, 1, bias_attr=False),                         # 1x1: Paddle's GEMM is as fast
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
    assert taken == [True] + [False] * 6 + [True, False, False]
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


def test_auto_falls_back_to_paddle_and_onednn_refuses_in_one_line(monkeypatch, tmp_path):
    """Where Paddle carries no usable oneDNN (another build, or a broken library file)."""
    broken = tmp_path / "libdnnl.so.3"
    broken.write_bytes(b"not a shared library")
    reason = load_library(str(broken))
    assert isinstance(reason, str) and str(broken) in reason and "\n" not in reason
    assert "not found" in load_library(str(tmp_path / "missing.so"))
    monkeypatch.setattr(onednn, "load_library", lambda: reason)
    layer = nn.Conv2D(4, 4, 3, padding=1, bias_attr=False)
    assert use_conv_backend(layer, "auto", 2) == "paddle" and type(layer) is nn.Conv2D
    with pytest.raises(OneDNNUnavailable) as e:
        use_conv_backend(layer, "onednn", 2)
    assert str(e.value).startswith("--conv_backend onednn: ") and str(broken) in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="choose from auto, onednn, paddle"):
        use_conv_backend(layer, "fastest", 2)


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
