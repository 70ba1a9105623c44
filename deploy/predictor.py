"""Predictors: one options object -> a runtime that maps a batch of normalised images
[N, 3, S, S] to (anomaly maps [N, S, S], scores [N]).

A backend is one subclass of `Predictor` and one entry in BACKENDS; `build_predictor`
makes any of them from a `PredictorOptions`, so infer.py, the benchmark and evaluation
build predictors the same way.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace

import numpy as np
import paddle

from model.rd4ad import RD4AD
from utils.errors import UserError, first_line, is_out_of_memory
from utils.runtime import restore_eager_threads

from .deployment import (MAX_RECHECK_BAND, Deployment, ModelError, check_graph_size, check_outputs,
                         paddle_graph_input_shape)
from .export import save_static
from .options import DEVICE_NAMES, PredictorOptions, UsageError  # noqa: F401  (also imported from here)

GPU_MEMORY_POOL_MB = 256  # Paddle Inference's initial GPU memory pool; it grows as needed
CUDA_PROVIDER = "CUDAExecutionProvider"


def check_auto_band(band: float) -> None:
    """--precision auto takes the export's judged band: a band of the user's would void the judgement."""
    if band:
        raise UsageError("--recheck_band goes with --precision int8; --precision auto takes the band the export "
                         "judged")


def check_recheck_band(band: float) -> None:
    if not (math.isfinite(band) and 0 <= band <= MAX_RECHECK_BAND):
        raise UsageError(f"--recheck_band {band}: must be a finite number in 0..{MAX_RECHECK_BAND:g}")


class Rechecked:
    """An int8 predictor whose borderline images are scored again in fp32: an image whose
    int8 score lies within `band` of `threshold` (or is not finite) gets the fp32 map and
    score, so a verdict can change only where the int8 error is larger than the band."""

    def __init__(self, fast, exact, threshold: float, band: float) -> None:
        self.fast, self.exact, self.threshold, self.band = fast, exact, threshold, band
        self.model_path, self.image_size = fast.model_path, fast.image_size
        self.provider = f"{fast.provider}, fp32 recheck"
        self.rechecked = 0

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images)
        maps, scores = self.fast(images)
        near = np.flatnonzero(~(np.abs(scores - self.threshold) >= self.band))  # NaN included
        if near.size:
            maps, scores = maps.copy(), scores.copy()
            maps[near], scores[near] = self.exact(images[near])
            self.rechecked += int(near.size)
        return maps, scores

    def close(self) -> None:
        self.fast.close()
        self.exact.close()


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _load_error(path: str, engine: str, err: BaseException) -> ModelError:
    """Whatever a runtime raises while loading a model, as one line naming the file."""
    return ModelError(f"{path}: {engine} cannot load this model ({first_line(err)}); export the model again")


class Predictor:
    """images -> (maps, scores) as numpy. Subclasses load a model and implement `run`;
    calling the predictor checks the outputs against what the export promises."""
    model_path: str = "model"
    image_size: int | None = None
    provider: str = ""  # where the runtime says it runs (e.g. "gpu:0", "CUDAExecutionProvider")
    score_bias: float = 0.0  # subtracted from maps and scores: int8's measured bias (Deployment.int8_score_bias)

    @classmethod
    def check_options(cls, options: "PredictorOptions") -> None:
        """UsageError for options this backend cannot honour (before anything is loaded)."""

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        array = images.numpy() if isinstance(images, paddle.Tensor) else images
        array = np.ascontiguousarray(array, dtype=np.float32)
        try:
            maps, scores = self.run(array)
        except (MemoryError, UserError):
            raise
        except Exception as err:  # the runtime failed on a well-formed batch: the model is at fault
            if is_out_of_memory(err):  # unless the device ran out of memory (CUDA's: an OSError)
                raise MemoryError(first_line(err)) from None
            raise ModelError(f"{self.model_path}: the model failed to run on a batch of {len(array)} "
                             f"images ({first_line(err)}); export the model again") from None
        check_outputs(maps, scores, len(array), self.image_size or array.shape[-1], self.model_path)
        if self.score_bias:  # one shift of maps and scores alike, so a score stays its map's maximum
            maps, scores = maps - np.float32(self.score_bias), scores - np.float32(self.score_bias)
        return maps, without_verdict_where_not_finite(array, maps, scores)

    def remove_bias(self, bias: float) -> None:
        """Subtract `bias` from every later map and score (int8's bias, measured at export)."""
        base = self.provider.split(", int8 bias ")[0]
        self.score_bias = bias
        self.provider = f"{base}, int8 bias {bias:+.4g} removed" if bias else base

    def close(self) -> None:
        """Release what the predictor holds beyond memory (temporary files)."""


def without_verdict_where_not_finite(images: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The scores, NaN for every image whose input or map is not finite: a network given
    -inf pixels (a deploy.json normalisation that overflows) can still answer a finite,
    confident score, and a score that is not finite is never a verdict (infer.py reports
    the image as failed, the service answers 500)."""
    count = len(scores)
    finite = (np.isfinite(images.reshape(count, -1)).all(axis=1)
              & np.isfinite(np.asarray(maps).reshape(count, -1)).all(axis=1))
    if finite.all():
        return scores
    scores = np.array(scores, dtype=np.float32, copy=True)
    scores[~finite] = np.nan
    return scores


class PaddleInferenceSession(Predictor):
    """A Paddle Inference predictor built from a paddle.inference.Config."""

    def _start(self, config) -> None:
        import paddle.inference as pi

        self.provider = paddle_provider(config)  # before the predictor takes over the config
        self.predictor = pi.create_predictor(config)
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.outputs = [self.predictor.get_output_handle(n) for n in self.predictor.get_output_names()]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.input.reshape(list(images.shape))
        self.input.copy_from_cpu(images)
        self.predictor.run()
        restore_eager_threads()  # the run left the process's math library on one thread
        maps, scores = (h.copy_to_cpu() for h in self.outputs)
        return maps, scores


class PaddlePredictor(PaddleInferenceSession):
    """Paddle Inference on CPU (oneDNN) or GPU (optionally TensorRT), on a checked export."""

    @classmethod
    def check_options(cls, options: PredictorOptions) -> None:
        if options.device == "gpu":
            check_paddle_gpu()
            if options.precision not in ("fp32", "fp16"):
                raise UsageError(f"--precision {options.precision} is not available on GPU (fp32, fp16)")
            if options.use_tensorrt:
                # Paddle 3's analysis of a PIR model.json adds no TensorRT passes: the flag
                # would change nothing while saying TensorRT (paddle.tensorrt.convert is the
                # PIR route; not built here, where no GPU can test it).
                raise UsageError("--use_tensorrt: Paddle 3.3.1 runs no TensorRT on the exported PIR model "
                                 "(model.json), so the flag is refused rather than ignored; run without it")
            return
        if options.use_tensorrt:
            raise UsageError("--use_tensorrt needs --device gpu")
        if options.precision not in ("fp32", "bf16"):
            hint = "; int8: --backend onnxruntime with export_model.py --int8" if options.precision == "int8" else ""
            raise UsageError(f"--precision {options.precision} is not available on CPU (fp32, bf16 with oneDNN){hint}")
        if options.precision == "bf16" and not options.enable_mkldnn:
            raise UsageError("--precision bf16 needs --enable_mkldnn True")
        if options.precision == "bf16" and not cpu_has_bf16():
            raise UsageError("--precision bf16: this CPU has no bf16 instructions")

    def __init__(self, deployment: Deployment, options: PredictorOptions) -> None:
        import paddle.inference as pi

        options.check()
        self.image_size = deployment.image_size
        self.model_path = deployment.model_file("model.json")
        params = deployment.model_file("model.pdiparams")
        check_graph_size(paddle_graph_input_shape(self.model_path), deployment, self.model_path)
        try:
            config = pi.Config(self.model_path, params)
            config.disable_glog_info()
            _configure_paddle(pi, config, options)
            if options.device == "gpu" and not config.use_gpu():  # else it runs on the CPU, saying so in its log
                raise UsageError("--device gpu: Paddle Inference did not enable the GPU")
            self._start(config)
        except (MemoryError, UsageError):
            raise
        except Exception as err:  # the graph parsed above, so the weights are the likely culprit
            raise _load_error(params, f"Paddle Inference (with {os.path.basename(self.model_path)})",
                              err) from None
        check_graph_size(self.input.shape(), deployment, self.model_path)  # when Paddle says


def check_paddle_gpu() -> None:
    """UsageError unless Paddle can run on a GPU here. On a CPU build Paddle Inference's
    Config.enable_use_gpu only logs "Please use PaddlePaddle with GPU version" and runs on
    the CPU."""
    if not paddle.device.is_compiled_with_cuda():
        raise UsageError("--device gpu: this Paddle build has no CUDA (pip install paddlepaddle-gpu)")
    if paddle.device.cuda.device_count() < 1:
        raise UsageError("--device gpu: Paddle sees no GPU (driver, CUDA_VISIBLE_DEVICES?)")


def paddle_provider(config) -> str:
    """Where a Paddle Inference config runs: "gpu:N" (TensorRT) or "cpu" (oneDNN)."""
    if config.use_gpu():
        return f"gpu:{config.gpu_device_id()}" + (" TensorRT" if config.tensorrt_engine_enabled() else "")
    return "cpu" + (" oneDNN" if config.mkldnn_enabled() else "")


def _configure_paddle(pi, config, options: PredictorOptions) -> None:
    """Device, precision and threads (the combination is checked by PredictorOptions.check).
    fp16 on GPU is Paddle Inference's mixed precision: its auto_mixed_precision pass runs
    every op in float16 but a few (sum, mean, exp, log, square, ...), which is why the
    anomaly map's cosine must not overflow float16 (model/anomaly_map.py)."""
    if options.device == "gpu":
        precision = {"fp32": pi.PrecisionType.Float32, "fp16": pi.PrecisionType.Half}[options.precision]
        config.enable_use_gpu(GPU_MEMORY_POOL_MB, 0, precision)
        return
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(options.cpu_threads)
    if options.enable_mkldnn:
        config.enable_mkldnn()
        if options.precision == "bf16":
            config.enable_mkldnn_bfloat16()
    else:  # Paddle 3's Config starts with oneDNN on: off has to be said
        config.disable_mkldnn()


class OnnxPredictor(Predictor):
    """ONNX Runtime on model.onnx (export_model.py --onnx) or model_int8.onnx, checked."""

    @classmethod
    def check_options(cls, options: PredictorOptions) -> None:
        if options.precision not in ("fp32", "int8"):
            raise UsageError(f"--backend onnxruntime runs fp32 or int8, not {options.precision}")
        if options.device == "gpu" and CUDA_PROVIDER not in _onnxruntime().get_available_providers():
            # the CPU package would accept the CUDA provider and run on the CPU, warning only
            raise UsageError(f"--device gpu: this onnxruntime has no {CUDA_PROVIDER} "
                             f"(pip install onnxruntime-gpu instead of onnxruntime)")

    def __init__(self, deployment: Deployment, options: PredictorOptions) -> None:
        ort = _onnxruntime()
        options.check()
        self.image_size = deployment.image_size
        self.model_path = onnx_model_file(deployment, options.precision)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.cpu_threads
        providers = ([CUDA_PROVIDER] if options.device == "gpu" else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(self.model_path, session_options, providers=providers)
        except MemoryError:
            raise
        except Exception as err:
            raise _load_error(self.model_path, "ONNX Runtime", err) from None
        self.provider = self.session.get_providers()[0]
        if options.device == "gpu" and self.provider != CUDA_PROVIDER:  # it could not start (CUDA, cuDNN libraries)
            raise UsageError(f"--device gpu: ONNX Runtime could not start its {CUDA_PROVIDER} "
                             f"(CUDA and cuDNN libraries?) and would run on {self.provider}")
        self.input_name = self.session.get_inputs()[0].name
        check_graph_size(self.session.get_inputs()[0].shape, deployment, self.model_path)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(None, {self.input_name: images})
        return maps, scores


def onnx_model_file(deployment: Deployment, precision: str) -> str:
    """The checked ONNX graph of `precision`: model_int8.onnx for int8, else model.onnx."""
    int8 = precision == "int8"
    hint = "export with: python export_model.py --onnx" + (" --int8 --calib_dir GOOD_IMAGES" if int8 else "")
    return deployment.model_file("model_int8.onnx" if int8 else "model.onnx", hint)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("--backend onnxruntime needs: pip install -r requirements-deploy.txt") from None
    return onnxruntime


class OpenVinoPredictor(Predictor):
    """OpenVINO (anomalib's deployment runtime) on the CPU: model.onnx in fp32, or in bf16
    by its inference-precision hint (CPUs with bf16 instructions), or model_int8.onnx (the
    QDQ graph of export_model.py --int8, which OpenVINO runs in int8)."""

    @classmethod
    def check_options(cls, options: PredictorOptions) -> None:
        if options.device != "cpu":
            # OpenVINO's GPU plugin drives Intel GPUs, not CUDA ones: never a silent CPU fallback
            raise UsageError("--backend openvino runs on the CPU here; for a CUDA GPU use --backend paddle "
                             "or onnxruntime")
        if options.precision not in ("fp32", "bf16", "int8"):
            raise UsageError(f"--backend openvino runs fp32, bf16 or int8, not {options.precision}")
        if options.precision == "bf16" and not cpu_has_bf16():
            # OpenVINO would quietly run float32 and the run would say bf16
            raise UsageError("--precision bf16: this CPU has no bf16 instructions")
        _openvino()

    def __init__(self, deployment: Deployment, options: PredictorOptions) -> None:
        ov = _openvino()
        options.check()
        self.image_size = deployment.image_size
        self.model_path = onnx_model_file(deployment, options.precision)
        config = {"INFERENCE_NUM_THREADS": options.cpu_threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if options.precision == "bf16" else "f32"}
        try:
            core = ov.Core()
            self.model = core.compile_model(core.read_model(self.model_path), "CPU", config)
        except MemoryError:
            raise
        except Exception as err:
            raise _load_error(self.model_path, "OpenVINO", err) from None
        self.outputs = [self.model.output(name) for name in ("anomaly_map", "score")]
        shape = self.model.input(0).get_partial_shape()
        check_graph_size([d.get_length() if d.is_static else None for d in shape], deployment, self.model_path)
        self.provider = f"CPU (OpenVINO {ov.get_version().split('-')[0]}, {config['INFERENCE_PRECISION_HINT']})"

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.model(images)
        return result[self.outputs[0]], result[self.outputs[1]]


def _openvino():
    try:
        import openvino
    except ImportError:
        raise UsageError("--backend openvino needs: pip install -r requirements-deploy.txt") from None
    return openvino


# A backend is one Predictor subclass and one entry here (infer.py's --backend choices).
BACKENDS: dict[str, type[Predictor]] = {"paddle": PaddlePredictor, "onnxruntime": OnnxPredictor,
                                        "openvino": OpenVinoPredictor}
BACKEND_NAMES = tuple(BACKENDS)


def warm_up(predictor: Predictor | Rechecked, images: np.ndarray) -> None:
    """Run `images` once through the predictor, and through its fp32 recheck (which only
    borderline images would reach), so that kernels are built before anything is timed or
    served."""
    predictor(images)
    if isinstance(predictor, Rechecked):
        predictor.exact(images)
        predictor.rechecked = 0


def build_predictor(deployment: Deployment, options: PredictorOptions) -> Predictor | Rechecked:
    """The predictor of `options.backend` on a checked export (int8: less the bias the export
    measured for this runtime); with a recheck band, its int8 predictor beside its fp32 one
    (Rechecked)."""
    options.check()
    predictor = BACKENDS[options.backend](deployment, options)
    if options.precision == "int8":
        predictor.remove_bias(deployment.int8_score_bias.get(options.backend, 0.0))
    if not options.recheck_band:
        return predictor
    threshold = options.recheck_threshold
    if threshold is None and deployment.calibration is not None:
        threshold = deployment.calibration.image_threshold
    if threshold is None:
        predictor.close()
        raise UsageError("--recheck_band needs a model exported with calibrated thresholds")
    exact = BACKENDS[options.backend](deployment, replace(options, precision="fp32", recheck_band=0.0))
    return Rechecked(predictor, exact, threshold, options.recheck_band)


class StaticGraphRunner(PaddleInferenceSession):
    """The current weights of a model in memory as a Paddle Inference predictor, on Paddle's
    current device: the GPU paddle.get_device() names (float32), else the CPU with oneDNN and
    `threads` threads, where evaluation runs about 5x faster than the dynamic graph on 2
    cores (tools/benchmark.py). Build it again after the weights change."""

    def __init__(self, net: RD4AD, threads: int) -> None:
        import paddle.inference as pi

        self.image_size = net.image_size
        self._dir = tempfile.TemporaryDirectory(prefix="rd4ad-static-")
        prefix = os.path.join(self._dir.name, "model")
        self.model_path = prefix + ".json"
        save_static(net, prefix)  # leaves the model in eval mode
        config = pi.Config(prefix + ".json", prefix + ".pdiparams")
        config.disable_glog_info()
        device = paddle.get_device()  # "cpu", "gpu:N" (or another accelerator: on the CPU then)
        if device.startswith("gpu"):
            config.enable_use_gpu(GPU_MEMORY_POOL_MB, int(device.partition(":")[2] or 0))
        else:
            config.disable_gpu()
            config.enable_mkldnn()
            config.set_cpu_math_library_num_threads(threads)
        self._start(config)

    def close(self) -> None:
        self._dir.cleanup()
