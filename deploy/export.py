"""The export: a trained model as one static graph, image -> (anomaly map, score), with
ONNX and int8 ONNX beside it and deploy.json describing them.

The graph holds teacher (layer1..3), bottleneck, student and the anomaly-map head
(per-scale 1 - cosine, bilinear upsampling, sum, Gaussian smoothing, max). Every file is
built in a staging folder and moved in one by one; deploy.json, written last, carries the
size and sha256 of each (deploy/deployment.py), checked before any predictor loads them.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable

import paddle

from dataset import DataError, index_train_dir, load_image
from engine.checkpoint import load_trained
from model.rd4ad import RD4AD
from utils.cli import output_error
from utils.errors import UserError, bounded_line
from utils.io import atomic_write_json
from utils.runtime import quiet_output

from .deployment import OUTPUT_NAMES, ModelError, check_deployment, deploy_meta, file_manifest
from .options import MAX_CALIB_IMAGES, MAX_OPSET, MIN_OPSET  # noqa: F401

MODEL_FILES = ("model.json", "model.pdiparams")
ALL_MODEL_FILES = MODEL_FILES + ("model.onnx", "model_int8.onnx")
# paddle2onnx 2.1 exports opsets 7..21 (below 13 it upgrades to 13); at 22 and above it
# aborts the whole process (SIGABRT), which no error handling can turn into one line.


def save_static(net: RD4AD, path_prefix: str) -> None:
    """paddle.jit.save the whole pipeline, the model in eval mode (image -> (anomaly map,
    score)): input `image` [N, 3, S, S] float32, ImageNet-normalised, any N."""
    if not net.image_size:
        raise ValueError("build the model with its image_size to export it")
    from paddle.jit.dy2static.program_translator import StaticFunction

    net.eval()
    if not isinstance(net.forward, StaticFunction):
        # to_static converts net.forward in place; converting it again at every save (each
        # evaluation with a predictor) kept another program alive: about 8 MB per save
        size = net.image_size
        spec = [paddle.static.InputSpec([None, 3, size, size], "float32", name="image")]
        paddle.jit.to_static(net, input_spec=spec, full_graph=True)
    paddle.jit.save(net, path_prefix)  # the current weights, whenever it is saved



class ExportError(UserError):
    """A setting or a conversion step that cannot produce a working export."""


def export_onnx(model_dir: str, onnx_path: str, opset: int = 13) -> None:
    try:
        import paddle2onnx
    except ImportError:
        raise ExportError("--onnx needs paddle2onnx: pip install -r requirements-deploy.txt") from None
    try:
        paddle2onnx.export(os.path.join(model_dir, "model.json"),
                           os.path.join(model_dir, "model.pdiparams"),
                           save_file=onnx_path, opset_version=opset, enable_onnx_checker=True)
        name_onnx_outputs(onnx_path, OUTPUT_NAMES)
    except (MemoryError, UserError):
        raise
    except Exception as err:  # the converter's own failure: one line, not its traceback
        raise ExportError(f"model.onnx: paddle2onnx could not convert the graph at opset {opset} "
                          f"({type(err).__name__}: {bounded_line(str(err), 200)})") from None


def quantize_onnx_int8(onnx_path: str, int8_path: str, calibration: list) -> None:
    """ONNX Runtime static post-training quantisation (QDQ) of the convolutions, with
    activation ranges from `calibration` ([1, 3, S, S] float32 arrays of good images)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ExportError("--int8 needs onnxruntime: pip install -r requirements-deploy.txt") from None

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(calibration)

        def get_next(self):
            image = next(self.remaining, None)
            return None if image is None else {"image": image}

    prepared = int8_path + ".pre.onnx"
    try:
        quant_pre_process(onnx_path, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, int8_path, Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "ConvTranspose"])
    except MemoryError:
        raise
    except Exception as err:  # ONNX Runtime's quantiser failed: one line, not its traceback
        raise ExportError(f"model_int8.onnx: ONNX Runtime could not quantise the model "
                          f"({type(err).__name__}: {bounded_line(str(err), 200)})") from None
    finally:
        if os.path.exists(prepared):
            os.remove(prepared)


def calibration_images(folder: str, image_size: int, limit: int) -> list:
    """Up to `limit` good images of `folder` (sorted by name), preprocessed as for training."""
    images = []
    for sample in index_train_dir(folder):
        try:
            images.append(load_image(sample.image_path, image_size)[None])
        except DataError as err:
            print(f"warning: {err}: skipped", file=sys.stderr)
        if len(images) == limit:
            break
    if not images:
        raise DataError(f"{folder}: no readable calibration images")
    return images


def name_onnx_outputs(onnx_path: str, names: tuple[str, ...]) -> None:
    """Give the ONNX graph's outputs their meaning (paddle2onnx calls them fetch_name_K)
    and call the batch dimension N."""
    import onnx

    graph_model = onnx.load(onnx_path)
    graph = graph_model.graph
    renames = {out.name: new for out, new in zip(graph.output, names)}
    for node in graph.node:
        node.output[:] = [renames.get(n, n) for n in node.output]
        node.input[:] = [renames.get(n, n) for n in node.input]
    for value in list(graph.output) + list(graph.input):
        value.name = renames.get(value.name, value.name)
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "N"
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, onnx_path)


def stage_line(text: str) -> None:
    """A stage of a long step, on stderr as it starts (what a silent minute was doing)."""
    print(text, file=sys.stderr, flush=True)


def export(checkpoint: str, save_dir: str, teacher_weights: str | None = None,
           onnx: bool = False, opset: int = 13, int8_calibration: list | None = None,
           progress: Callable[[str], None] = stage_line) -> dict:
    """Write the static graph (and ONNX) to save_dir; return the deploy metadata. save_dir
    is created only once the checkpoint has been read and checked, and removed again when
    this call created it and the export failed. `progress` hears each stage as it starts."""
    # Paddle's own kernels: the static graph never runs model/onednn.py's, and the dygraph
    # runs here only trace it.
    model, state = load_trained(checkpoint, teacher_weights=teacher_weights, conv_backend="paddle")
    created = _make_folder(save_dir)
    try:
        files = _write_model_files(model, save_dir, onnx, opset, int8_calibration, progress)
        meta = deploy_meta(state, onnx, int8_calibration, files)
        # the same check infer.py runs: an export never writes a deploy.json it refuses
        path = os.path.join(save_dir, "deploy.json")
        try:
            check_deployment(meta, path)
        except ModelError as err:
            raise ExportError(f"{checkpoint}: cannot be exported ({err})") from None
        atomic_write_json(path, meta)
    except BaseException:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return meta


def _make_folder(folder: str) -> str | None:
    """Create `folder` (and missing parents); return the topmost folder created, if any."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ExportError(f"{folder}: --save_dir is a file, not a folder")
    top, parent = None, os.path.abspath(folder)
    while not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:  # a parent is a file, permission denied
        raise output_error(folder, err) from None
    return top


def _write_model_files(model: RD4AD, save_dir: str, onnx: bool, opset: int,
                       int8_calibration: list | None, progress: Callable[[str], None]) -> dict[str, dict]:
    """Build everything in a temporary folder inside save_dir, then move file by file: a
    kill at any moment leaves each previous file whole (and the old deploy.json's
    manifest then names the files that changed). Returns the manifest of what was moved.
    Each converter runs quiet (its own logging; our errors still say what failed), its
    stage announced before it."""
    staging = tempfile.mkdtemp(prefix=".export-", dir=save_dir)
    try:
        with quiet_output():  # seconds: a plain export stays one line
            save_static(model, os.path.join(staging, "model"))
        files = list(MODEL_FILES)
        if onnx:
            progress("converting to ONNX (paddle2onnx; the first conversion of a process takes longest) ...")
            with quiet_output():
                export_onnx(staging, os.path.join(staging, "model.onnx"), opset)
            files.append("model.onnx")
            if int8_calibration:
                progress(f"quantising to int8 (ONNX Runtime, calibrated on {len(int8_calibration)} good images) ...")
                with quiet_output():
                    quantize_onnx_int8(os.path.join(staging, "model.onnx"), os.path.join(staging, "model_int8.onnx"),
                                       int8_calibration)
                files.append("model_int8.onnx")
        manifest = file_manifest(staging, files)
        for name in files:
            os.replace(os.path.join(staging, name), os.path.join(save_dir, name))
        for name in set(ALL_MODEL_FILES) - set(files):  # an earlier export's, which this one replaces
            stale = os.path.join(save_dir, name)
            if os.path.isfile(stale) and not os.path.islink(stale):
                os.remove(stale)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


