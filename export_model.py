"""Export a trained class to one static graph: image -> (anomaly map, score).

    python export_model.py --output_dir output --cls bottle          # -> output/inference/bottle/
    python export_model.py --checkpoint PATH/model.pdparams --save_dir DIR --onnx
    python export_model.py --output_dir output --cls bottle --onnx --int8 --calib_dir mvtec/bottle/train/good

Writes model.json + model.pdiparams (paddle.jit.save, Paddle 3 / PIR format), deploy.json
(arch, image size, mean/std, output order, thresholds, score statistics) and, with --onnx,
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
from model import TeacherWeightsError, build_rd4ad  # noqa: E402
from model.inference import InferenceModel, save_static  # noqa: E402
from utils.checkpoint import (CheckpointError, apply_checkpoint, atomic_write_json,  # noqa: E402
                              load_checkpoint)

DEPLOY_FORMAT = "rd4ad-paddle-inference/1"
OUTPUT_NAMES = ("anomaly_map", "score")  # in the graph's output order
MODEL_FILES = ("model.json", "model.pdiparams")


def build_inference_model(checkpoint: str, teacher_weights: str | None = None) -> tuple[InferenceModel, dict]:
    """Checkpoint -> eval-mode InferenceModel, and the checkpoint's contents."""
    state = load_checkpoint(checkpoint)
    if "teacher" in state:  # trained with a random teacher, which the checkpoint carries
        source = "none"
    else:
        source = teacher_weights or state.get("teacher_weights", "imagenet")
        if source.lower() == "none":
            raise CheckpointError(f"{checkpoint}: has no teacher and --teacher_weights is none")
    net = build_rd4ad(state["arch"], source)
    apply_checkpoint(net, state, checkpoint)
    return InferenceModel(net, state["image_size"]), state


def export_onnx(model_dir: str, onnx_path: str, opset: int = 13) -> None:
    try:
        import paddle2onnx
    except ImportError:
        raise CheckpointError("--onnx needs paddle2onnx: pip install -r requirements-deploy.txt") from None
    paddle2onnx.export(os.path.join(model_dir, "model.json"),
                       os.path.join(model_dir, "model.pdiparams"),
                       save_file=onnx_path, opset_version=opset, enable_onnx_checker=True)
    name_onnx_outputs(onnx_path, OUTPUT_NAMES)


def quantize_onnx_int8(onnx_path: str, int8_path: str, calibration: list) -> None:
    """ONNX Runtime static post-training quantisation (QDQ) of the convolutions, with
    activation ranges from `calibration` ([1, 3, S, S] float32 arrays of good images)."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise CheckpointError("--int8 needs onnxruntime: pip install -r requirements-deploy.txt") from None

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
    """Write the static graph (and ONNX) to save_dir; return the deploy metadata."""
    model, state = build_inference_model(checkpoint, teacher_weights)
    size = state["image_size"]
    os.makedirs(save_dir, exist_ok=True)
    # Build everything in a temporary folder beside save_dir, then move file by file: a
    # kill at any moment leaves each previous file whole.
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
        for name in files:
            os.replace(os.path.join(staging, name), os.path.join(save_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = {
        "format": DEPLOY_FORMAT,
        "arch": state["arch"],
        "image_size": size,
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
    }
    atomic_write_json(os.path.join(save_dir, "deploy.json"), meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="output", help="training output folder")
    p.add_argument("--cls", default="bottle", help="class whose OUTPUT_DIR/CLASS/model.pdparams to export")
    p.add_argument("--checkpoint", help="a checkpoint path (instead of --output_dir/--cls)")
    p.add_argument("--save_dir", help="default: OUTPUT_DIR/inference/CLASS")
    p.add_argument("--teacher_weights", help="override the teacher weights the checkpoint names")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (paddle2onnx)")
    p.add_argument("--opset", type=int, default=13)
    p.add_argument("--int8", action="store_true",
                   help="also write model_int8.onnx (ONNX Runtime post-training quantisation; needs --onnx)")
    p.add_argument("--calib_dir", help="with --int8: a folder of good images to calibrate on "
                                       "(e.g. the class's train/good)")
    p.add_argument("--calib_images", type=int, default=32, help="with --int8: at most this many")
    a = p.parse_args(argv)
    checkpoint = a.checkpoint or os.path.join(a.output_dir, a.cls, "model.pdparams")
    save_dir = a.save_dir or os.path.join(a.output_dir, "inference", a.cls)
    paddle.set_device("cpu")
    try:
        calibration = None
        if a.int8:
            if not a.onnx or not a.calib_dir:
                raise CheckpointError("--int8 needs --onnx and --calib_dir (a folder of good images)")
            calibration = calibration_images(a.calib_dir, load_checkpoint(checkpoint)["image_size"],
                                             a.calib_images)
        meta = export(checkpoint, save_dir, a.teacher_weights, a.onnx, a.opset, calibration)
    except (CheckpointError, TeacherWeightsError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {meta['arch']} ({meta['image_size']}px, class {meta['class']}) to {save_dir}: "
          + ", ".join(sorted(os.listdir(save_dir))))
    print(json.dumps({k: meta[k] for k in ("input", "outputs")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
