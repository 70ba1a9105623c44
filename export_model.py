"""Export a trained class to one static graph: image -> (anomaly map, score).

    python export_model.py --output_dir output --cls bottle          # -> output/inference/bottle/
    python export_model.py --checkpoint PATH/model.pdparams --save_dir DIR --onnx
    python export_model.py --output_dir output --cls bottle --onnx --int8 --calib_dir mvtec/bottle/train/good

Writes model.json + model.pdiparams (paddle.jit.save, Paddle 3 / PIR format), deploy.json
(arch, image size, mean/std, output order, thresholds, score statistics, and the size and
sha256 of every file written, which infer.py checks before loading) and, with --onnx,
model.onnx; with --int8 also model_int8.onnx, post-training quantised by ONNX Runtime
(int8 convolutions, per-channel weights, activations calibrated on good images; the
anomaly-map head stays float32). Paddle's own int8 path does not run with Paddle 3.3.1
(README, Performance).
The graph holds teacher (layer1..3), bottleneck, student and the anomaly-map head
(per-scale 1 - cosine, bilinear upsampling, sum, Gaussian smoothing, max).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore", message="No ccache found")  # printed by paddle's import

import paddle  # noqa: E402

from dataset import IMAGENET_MEAN, IMAGENET_STD, DataError, index_train_dir, load_image  # noqa: E402
from model.inference import (DEPLOY_FORMAT, OUTPUT_NAMES, ModelError,  # noqa: E402
                             check_deployment, file_manifest, save_static)
from utils.checkpoint import (atomic_write_json,  # noqa: E402
                              load_checkpoint)
from utils.cli import OneLineArgumentParser, output_error, run_main  # noqa: E402
from utils.errors import UserError, bounded_line  # noqa: E402
from utils.names import check_class_name  # noqa: E402
from model.rd4ad import RD4AD  # noqa: E402
from model.trained import load_trained  # noqa: E402

MODEL_FILES = ("model.json", "model.pdiparams")
# paddle2onnx 2.1 exports opsets 7..21 (below 13 it upgrades to 13); at 22 and above it
# aborts the whole process (SIGABRT), which no error handling can turn into one line.
MIN_OPSET, MAX_OPSET = 7, 21
MAX_CALIB_IMAGES = 10000


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
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                              quantize_static)
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


def export(checkpoint: str, save_dir: str, teacher_weights: str | None = None,
           onnx: bool = False, opset: int = 13, int8_calibration: list | None = None) -> dict:
    """Write the static graph (and ONNX) to save_dir; return the deploy metadata. save_dir
    is created only once the checkpoint has been read and checked, and removed again when
    this call created it and the export failed."""
    model, state = load_trained(checkpoint, teacher_weights=teacher_weights)
    created = _make_folder(save_dir)
    try:
        files = _write_model_files(model, save_dir, onnx, opset, int8_calibration)
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
                       int8_calibration: list | None) -> dict[str, dict]:
    """Build everything in a temporary folder inside save_dir, then move file by file: a
    kill at any moment leaves each previous file whole (and the old deploy.json's
    manifest then names the files that changed). Returns the manifest of what was moved."""
    staging = tempfile.mkdtemp(prefix=".export-", dir=save_dir)
    try:
        save_static(model, os.path.join(staging, "model"))
        files = list(MODEL_FILES)
        if onnx:
            export_onnx(staging, os.path.join(staging, "model.onnx"), opset)
            files.append("model.onnx")
            if int8_calibration:
                quantize_onnx_int8(os.path.join(staging, "model.onnx"), os.path.join(staging, "model_int8.onnx"),
                                   int8_calibration)
                files.append("model_int8.onnx")
        manifest = file_manifest(staging, files)
        for name in files:
            os.replace(os.path.join(staging, name), os.path.join(save_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def deploy_meta(state: dict, onnx: bool, int8_calibration: list | None, files: dict) -> dict:
    """deploy.json: what infer.py needs besides the graph, and the manifest of the files."""
    return {
        "format": DEPLOY_FORMAT,
        "arch": state["arch"],
        "image_size": state["image_size"],
        "class": state.get("class"),
        "epoch": state.get("epoch"),
        "teacher_weights": state.get("teacher_weights"),
        "mean": [round(float(v), 6) for v in IMAGENET_MEAN],
        "std": [round(float(v), 6) for v in IMAGENET_STD],
        "input": "image",
        "outputs": list(OUTPUT_NAMES),
        "score_stats": state.get("score_stats"),
        # thresholds calibrated on validation-good images: verdicts and masks at deployment
        "calibration": state.get("calibration"),
        "onnx": onnx,
        "onnx_int8": {"calibration_images": len(int8_calibration)} if onnx and int8_calibration else None,
        # size and sha256 of every file written: infer.py names one that is missing,
        # truncated or replaced before loading it
        "files": files,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="output", help="training output folder")
    p.add_argument("--cls", default="bottle", help="class whose OUTPUT_DIR/CLASS/model.pdparams to export")
    p.add_argument("--checkpoint", help="a checkpoint path (instead of --output_dir/--cls)")
    p.add_argument("--save_dir", help="default: OUTPUT_DIR/inference/CLASS")
    p.add_argument("--teacher_weights", help="override the teacher weights the checkpoint names")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (paddle2onnx)")
    p.add_argument("--opset", type=int, default=13, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET}")
    p.add_argument("--int8", action="store_true",
                   help="also write model_int8.onnx (ONNX Runtime post-training quantisation; needs --onnx)")
    p.add_argument("--calib_dir", help="with --int8: a folder of good images to calibrate on "
                                       "(e.g. the class's train/good)")
    p.add_argument("--calib_images", type=int, default=32, help="with --int8: at most this many")
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    """Every setting, before anything is read or written."""
    check_class_name(a.cls)
    if not MIN_OPSET <= a.opset <= MAX_OPSET:
        raise ExportError(f"--opset {a.opset}: must lie in {MIN_OPSET}..{MAX_OPSET} (what paddle2onnx exports)")
    if not 1 <= a.calib_images <= MAX_CALIB_IMAGES:
        raise ExportError(f"--calib_images {a.calib_images}: must lie in 1..{MAX_CALIB_IMAGES}")
    if a.int8 and (not a.onnx or not a.calib_dir):
        raise ExportError("--int8 needs --onnx and --calib_dir (a folder of good images)")
    save_dir = a.save_dir or os.path.join(a.output_dir, "inference", a.cls)
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ExportError(f"{save_dir}: --save_dir is a file, not a folder")


def _run(a: argparse.Namespace) -> int:
    check_args(a)
    checkpoint = a.checkpoint or os.path.join(a.output_dir, a.cls, "model.pdparams")
    save_dir = a.save_dir or os.path.join(a.output_dir, "inference", a.cls)
    paddle.set_device("cpu")
    calibration = None
    if a.int8:
        calibration = calibration_images(a.calib_dir, load_checkpoint(checkpoint)["image_size"],
                                         a.calib_images)
    meta = export(checkpoint, save_dir, a.teacher_weights, a.onnx, a.opset, calibration)
    print(f"exported {meta['arch']} ({meta['image_size']}px, class {meta['class']}) to {save_dir}: "
          + ", ".join(sorted(n for n in os.listdir(save_dir) if not n.startswith("."))))
    print(json.dumps({k: meta[k] for k in ("input", "outputs")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 exported, 2 a mistake (one line), 130 interrupted."""
    try:
        a = parse_args(argv)
    except SystemExit as done:  # argparse: --help (0) or a one-line mistake (2)
        return int(done.code or 0)
    return run_main(lambda: _run(a))


if __name__ == "__main__":
    sys.exit(main())
