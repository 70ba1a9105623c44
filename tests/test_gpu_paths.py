"""GPU paths of evaluation and deployment, checked on the CPU: the anomaly map's cosine in
float16 (what Paddle Inference's --precision fp16 computes), a CPU build or CPU package
refused for --device gpu, the static-graph evaluator on Paddle's GPU, CUDA's out-of-memory
OSError backed off from, nvidia-smi asked about the GPU in use. (No GPU runs here: what
needs one is checked by reading Paddle's source; doc/gpu.md.)"""
import os
import subprocess
from types import SimpleNamespace

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import deploy.predictor as predictor_module
import infer
from conftest import ROOT
from deploy.deployment import ModelError
from deploy.infer_command import summary
from deploy.predictor import (CUDA_PROVIDER, OnnxPredictor, PaddlePredictor, Predictor, PredictorOptions,
                              StaticGraphRunner, UsageError)
from model.anomaly_map import NORM_FLOOR, SCALE_FLOOR, cosine_distance, cosine_similarity
from utils import timing
from utils.errors import first_line, is_out_of_memory

F16 = np.float16


# --- 1. the anomaly map's cosine in float16 -------------------------------------------------
# Paddle has no float16 kernels on the CPU, so the ops of model/anomaly_map.py are written
# out in numpy as Paddle Inference's fp16 pass runs them (its auto_mixed_precision_pass):
# every op in float16 except pd_op.sum, which it keeps in float32 (its default black list)
# and whose result the next op casts back to float16.

def pass_sum(x, axis):
    return x.astype(np.promote_types(x.dtype, np.float32)).sum(axis).astype(x.dtype)


def old_cosine(t, s, axis=1):
    """F.cosine_similarity's ops (paddle/nn/functional/common.py)."""
    with np.errstate(over="ignore", invalid="ignore"):
        w12, w1, w2 = pass_sum(t * s, axis), pass_sum(t * t, axis), pass_sum(s * s, axis)
        return w12 / np.sqrt(np.maximum(w1 * w2, t.dtype.type(1e-8) ** 2))


def new_cosine(t, s, axis=1):
    """model.anomaly_map.cosine_similarity's ops."""
    def scaled(x):
        x = x / np.maximum(np.abs(x).max(axis, keepdims=True), x.dtype.type(SCALE_FLOOR))
        return x, np.maximum(np.sqrt(pass_sum(x * x, axis)), x.dtype.type(NORM_FLOOR))
    (a, a_norm), (b, b_norm) = scaled(t), scaled(s)
    return pass_sum(a * b, axis) / (a_norm * b_norm)


def exact_cosine(t, s, axis=1):
    t, s = t.astype(np.float64), s.astype(np.float64)
    return (t * s).sum(axis) / (np.linalg.norm(t, axis=axis) * np.linalg.norm(s, axis=axis))


def student_like(teacher, rng):
    """Features near the teacher's: cosines about 0.96, as a trained model's."""
    return (teacher.astype(np.float64) * rng.uniform(0.5, 1.5, teacher.shape)).astype(teacher.dtype)


def test_numpy_ops_are_the_models():
    """In float64 (nothing rounds) the numpy ops above give Paddle's results."""
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(2, 32, 3, 3)), rng.normal(size=(2, 32, 3, 3))
    ours = cosine_similarity(paddle.to_tensor(t), paddle.to_tensor(s), axis=1).numpy()
    np.testing.assert_allclose(new_cosine(t, s), ours, rtol=1e-12)
    np.testing.assert_allclose(old_cosine(t, s), F.cosine_similarity(paddle.to_tensor(t), paddle.to_tensor(s),
                                                                     axis=1).numpy(), rtol=1e-12)


@pytest.mark.parametrize("value", [4.0, 300.0])
def test_float16_cosine_of_large_features_is_right(value):
    """256 channels near `value`: |t|^2 |s|^2 overflows float16 (65504) in the old formula,
    the cosine is 0 (the map reads 1: a false DEFECT) or, once t_i s_i overflows, NaN.
    The scaled formula stays within 2e-3 of float64."""
    rng = np.random.default_rng(1)
    teacher = (rng.uniform(0.0, 2.0 * value, (2, 256, 4, 4))).astype(F16)
    student = student_like(teacher, rng)
    exact = exact_cosine(teacher, student)
    assert exact.min() > 0.9
    old = old_cosine(teacher, student)
    assert (np.all(old == 0) if value < 256 else np.all(np.isnan(old)))
    new = new_cosine(teacher, student)
    assert new.dtype == F16 and np.isfinite(new).all()
    np.testing.assert_allclose(new.astype(np.float64), exact, atol=2e-3)


def test_float16_cosine_of_wide_small_and_zero_features():
    rng = np.random.default_rng(2)
    wide = rng.uniform(0.0, 600.0, (1, 1024, 2, 2)).astype(F16)  # wide_resnet50_2's third scale
    near = student_like(wide, rng)
    np.testing.assert_allclose(new_cosine(wide, near).astype(np.float64), exact_cosine(wide, near), atol=2e-3)
    small = rng.uniform(0.0, 1e-3, (1, 64, 2, 2)).astype(F16)
    np.testing.assert_allclose(new_cosine(small, small).astype(np.float64), 1.0, atol=2e-3)
    zero = np.zeros((1, 64, 2, 2), F16)
    assert np.all(new_cosine(zero, zero) == 0) and np.all(new_cosine(zero, small) == 0)  # as torch's: 0, no NaN


def test_float32_anomaly_map_keeps_its_meaning():
    """Scale-free, 1 - cos of the reference's formula, 1 for a zero vector (float32)."""
    rng = np.random.default_rng(3)
    t = rng.uniform(0.0, 3.0, (2, 64, 4, 4)).astype(np.float32)
    s = student_like(t, rng)
    ours = cosine_distance(paddle.to_tensor(t), paddle.to_tensor(s)).numpy()
    np.testing.assert_allclose(ours, 1 - exact_cosine(t, s), atol=1e-6)
    big = cosine_distance(paddle.to_tensor(t * 1e4), paddle.to_tensor(s * 1e-3)).numpy()
    np.testing.assert_allclose(big, ours, atol=1e-6)
    zero = paddle.zeros([1, 64, 2, 2])
    np.testing.assert_array_equal(cosine_distance(zero, zero).numpy(), 1.0)


# --- 2. ONNX Runtime on GPU -------------------------------------------------------------------

class FakeSession:
    providers = [CUDA_PROVIDER, "CPUExecutionProvider"]

    def __init__(self, path, options, providers):
        self.asked = providers

    def get_providers(self):
        return list(self.providers)

    def get_inputs(self):
        return [SimpleNamespace(name="image", shape=["N", 3, 64, 64])]


def fake_deployment(folder="/nowhere"):
    return SimpleNamespace(image_size=64, path=os.path.join(folder, "deploy.json"),
                           model_file=lambda name, hint="": os.path.join(folder, name))


def test_onnxruntime_gpu_refused_without_its_cuda_provider(tmp_path, capsys):
    import onnxruntime
    assert CUDA_PROVIDER not in onnxruntime.get_available_providers()  # the CPU package, as here
    with pytest.raises(UsageError, match="this onnxruntime has no CUDAExecutionProvider"):
        PredictorOptions(backend="onnxruntime", device="gpu").check()
    assert infer.main(["--backend", "onnxruntime", "--device", "gpu", "--image", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install onnxruntime-gpu" in err


def test_onnxruntime_gpu_records_the_provider_it_got(monkeypatch):
    import onnxruntime
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_PROVIDER, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    options = PredictorOptions(backend="onnxruntime", device="gpu")
    options.check()
    got = OnnxPredictor(fake_deployment(), options)
    assert got.session.asked == [CUDA_PROVIDER, "CPUExecutionProvider"] and got.provider == CUDA_PROVIDER
    # the CUDA provider listed but failing to start (no cuDNN): ONNX Runtime would use the CPU
    monkeypatch.setattr(FakeSession, "providers", ["CPUExecutionProvider"])
    with pytest.raises(UsageError, match="could not start its CUDAExecutionProvider"):
        OnnxPredictor(fake_deployment(), options)


def test_summary_names_the_provider():
    args = SimpleNamespace(backend="onnxruntime", device="gpu", precision="fp32", output_dir="out")
    writer = SimpleNamespace(rows=[{"score": "1.5", "error": ""}], calibration=None, defects=0)
    timer = timing.StageTimer()
    timer.images = 1
    line = summary(args, writer, timer, CUDA_PROVIDER)
    assert f"with onnxruntime on gpu (fp32, {CUDA_PROVIDER})" in line


# --- 3. Paddle Inference on GPU needs a CUDA build --------------------------------------------

def test_paddle_gpu_refused_on_a_cpu_build(tmp_path, capsys):
    assert not paddle.device.is_compiled_with_cuda()  # the CPU build, as here
    message = "--device gpu: this Paddle build has no CUDA (pip install paddlepaddle-gpu)"
    with pytest.raises(UsageError) as err:
        PredictorOptions(device="gpu", precision="fp16").check()
    assert str(err.value) == message
    assert infer.main(["--device", "gpu", "--image", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_paddle_gpu_check_passes_with_cuda(monkeypatch):
    monkeypatch.setattr(paddle.device, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 1)
    for precision in ("fp32", "fp16"):
        PredictorOptions(device="gpu", precision=precision).check()
    with pytest.raises(UsageError, match="--use_tensorrt: Paddle 3.3.1 runs no TensorRT on the exported PIR"):
        PredictorOptions(device="gpu", use_tensorrt=True).check()  # refused, not silently ignored
    with pytest.raises(UsageError, match="not available on GPU"):
        PredictorOptions(device="gpu", precision="bf16").check()
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 0)
    with pytest.raises(UsageError, match="Paddle sees no GPU"):
        PredictorOptions(device="gpu").check()


def test_paddle_predictor_refuses_a_config_left_on_the_cpu(monkeypatch, tmp_path):
    """Past the checks (a CUDA build is pretended), Paddle Inference's own word counts: on
    this CPU build enable_use_gpu leaves the config on the CPU, so the predictor refuses."""
    monkeypatch.setattr(paddle.device, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(predictor_module, "paddle_graph_input_shape", lambda path: None)
    for name in ("model.json", "model.pdiparams"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(UsageError, match="Paddle Inference did not enable the GPU"):
        PaddlePredictor(fake_deployment(str(tmp_path)), PredictorOptions(device="gpu", precision="fp16"))


# --- 4. the static-graph evaluator follows Paddle's device ------------------------------------

class RecordingConfig:
    calls: list = []

    def __init__(self, *paths):
        RecordingConfig.calls = []

    def __getattr__(self, name):
        return lambda *args: RecordingConfig.calls.append((name, *args))


@pytest.mark.parametrize("device,expected", [
    ("gpu:1", [("disable_glog_info",), ("enable_use_gpu", 256, 1)]),
    ("gpu", [("disable_glog_info",), ("enable_use_gpu", 256, 0)]),
    ("cpu", [("disable_glog_info",), ("disable_gpu",), ("enable_mkldnn",), ("set_cpu_math_library_num_threads", 3)]),
])
def test_static_graph_runner_runs_on_paddles_device(monkeypatch, device, expected):
    import paddle.inference
    monkeypatch.setattr(paddle, "get_device", lambda: device)
    monkeypatch.setattr(paddle.inference, "Config", RecordingConfig)
    monkeypatch.setattr(predictor_module, "save_static", lambda net, prefix: None)
    started = []
    monkeypatch.setattr(StaticGraphRunner, "_start", lambda self, config: started.append(config))
    runner = StaticGraphRunner(SimpleNamespace(image_size=64), threads=3)
    try:
        assert RecordingConfig.calls == expected and len(started) == 1
    finally:
        runner.close()


# --- 5. out of memory as CUDA reports it: an OSError -----------------------------------------

CUDA_OOM = ("\n\nOut of memory error on GPU 0. Cannot allocate 1.5GB memory on GPU 0, 14.2GB memory has "
            "been allocated and available memory is only 0.3GB.\n\n[Hint: 'cudaErrorMemoryAllocation'. ...]\n")
# Paddle's GPU allocator (BadAlloc: a MemoryError): its message summary after a rule
ALLOCATOR_OOM = ("\n\n----------------------\nError Message Summary:\n----------------------\n"
                 "ResourceExhaustedError: \n\nOut of memory error on GPU 0. Cannot allocate 256.000000MB memory "
                 "on GPU 0, 15.7GB memory has been allocated and available memory is only 3.7MB.\n\n"
                 "Please check whether there is any other process using GPU 0.\n")


def test_out_of_memory_errors_are_told_apart():
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(OSError(CUDA_OOM))
    assert is_out_of_memory(OSError("(External) CUDA error(2), out of memory.\n  [Hint: ...]"))
    assert is_out_of_memory(OSError("(External) CUDNN error(4), CUDNN_STATUS_ALLOC_FAILED."))
    assert is_out_of_memory(MemoryError(ALLOCATOR_OOM)) and is_out_of_memory(RuntimeError("CUDA out of memory"))
    assert not is_out_of_memory(OSError("(External) CUDA error(700), an illegal memory access"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_the_reason_is_the_line_that_says_it():
    assert first_line(OSError(CUDA_OOM)).startswith("Out of memory error on GPU 0. Cannot allocate 1.5GB")
    assert first_line(MemoryError(ALLOCATOR_OOM)).startswith("Out of memory error on GPU 0. Cannot allocate 256")
    assert first_line(RuntimeError("(PreconditionNotMet) \n\n  The weights do not fit.\n")) == "The weights do not fit."
    assert first_line(OSError("\n\n")) == "OSError"


def test_a_predictor_passes_out_of_memory_on():
    """Predictor calls (the static evaluator's among them) raise MemoryError for CUDA's
    OSError, so the back-off sees it; any other runtime error still blames the model."""
    class Failing(Predictor):
        def __init__(self, err):
            self.err = err

        def run(self, images):
            raise self.err

    with pytest.raises(MemoryError, match=r"^Out of memory error on GPU 0\. Cannot allocate"):
        Failing(OSError(CUDA_OOM))(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ModelError, match="an illegal memory access"):
        Failing(OSError("(External) CUDA error(700), an illegal memory access"))(np.zeros((1, 3, 8, 8), np.float32))


def test_evaluation_backs_off_from_cuda_out_of_memory_oserror(monkeypatch, capsys):
    from dataset import index_test
    from engine.config import Config
    from engine.evaluate import predict_samples
    from model import build_rd4ad

    cfg = Config(mode="eval", arch="resnet18", image_size=64, batch_size=8, eval_backend="dygraph")
    samples = index_test(os.path.join(ROOT, "sample_data"), "bottle")
    paddle.seed(0)
    net = build_rd4ad("resnet18", "none")
    expected = predict_samples(net, samples, cfg, "eval", progress=False)

    real_forward = type(net).forward
    batches = []

    def forward_out_of_memory_once(self, images):
        batches.append(images.shape[0])
        if len(batches) == 1:
            raise OSError(CUDA_OOM)
        return real_forward(self, images)

    monkeypatch.setattr(type(net), "forward", forward_out_of_memory_once)
    got = predict_samples(net, samples, cfg, "eval", progress=False)
    out = capsys.readouterr().out
    assert "eval: out of memory (Out of memory error on GPU 0. Cannot allocate" in out
    assert "evaluating again with batch size 4" in out
    assert batches[0] == 8 and max(batches[1:]) == 4
    np.testing.assert_allclose(got.maps, expected.maps, atol=1e-5)

    def forward_failing(self, images):
        raise OSError("(External) CUDA error(700), an illegal memory access was encountered")

    monkeypatch.setattr(type(net), "forward", forward_failing)
    with pytest.raises(OSError, match="illegal memory access"):  # not memory: no retry
        predict_samples(net, samples, cfg, "eval", progress=False)


# --- 6. nvidia-smi asked about the GPU in use -------------------------------------------------

def test_gpu_memory_is_read_from_the_gpu_in_use(monkeypatch):
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="1234\n", stderr="")

    monkeypatch.setattr(timing.subprocess, "run", run)
    monkeypatch.setattr(paddle, "get_device", lambda: "gpu:2")
    assert timing.gpu_memory_mb() == 1234.0 and commands[-1][0] == "nvidia-smi" and "--id=2" in commands[-1]
    assert timing.gpu_memory_mb(3) == 1234.0 and "--id=3" in commands[-1]
    monkeypatch.setattr(paddle, "get_device", lambda: "cpu")
    timing.gpu_memory_mb()
    assert "--id=0" in commands[-1]
    monkeypatch.setattr(timing.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 6, "", "x"))
    assert timing.gpu_memory_mb() is None  # no such GPU
