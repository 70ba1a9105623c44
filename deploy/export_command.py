"""`python export_model.py`: a trained class's checkpoint -> OUTPUT_DIR/inference/CLASS."""
from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Sequence

import numpy as np
import paddle

from dataset import DataError, index_test_dir, load_image
from engine.checkpoint import load_checkpoint
from engine.config import load_config_file
from core.paths import RunPaths
from utils.cli import run_main
from utils.io import atomic_write_json
from utils.names import check_class_name

from .command_lines import parse_export_args
from .deployment import MAX_DEPLOY_BYTES, check_deployment, read_deployment, read_json_file

from .precision import Judgement, judge_precisions
from .export import MAX_CALIB_IMAGES, MAX_OPSET, MIN_OPSET, ExportError, calibration_images, export, stage_line




def class_of_run(output_dir: str) -> str:
    """The one class the run in `output_dir` trained: its config.yaml names one, or the
    folder holds one class checkpoint."""
    paths = RunPaths(output_dir)
    saved = paths.config_yaml("train")
    cls = load_config_file(saved).get("cls", "") if os.path.isfile(saved) else ""
    names = [c.strip() for c in cls.split(",") if c.strip() and c.strip() != "all"]
    if len(names) == 1:
        return check_class_name(names[0])
    trained = sorted(n for n in os.listdir(output_dir) if os.path.isfile(paths.checkpoint(n))) \
        if os.path.isdir(output_dir) else []
    if len(trained) == 1:
        return check_class_name(trained[0], "class")
    raise ExportError("--cls: which class? " + (f"{output_dir} holds checkpoints of: {', '.join(trained)}"
                                               if trained else f"{output_dir} holds no trained class"))


def check_args(a: argparse.Namespace) -> None:
    """Every setting, before anything is read or written."""
    if not MIN_OPSET <= a.opset <= MAX_OPSET:
        raise ExportError(f"--opset {a.opset}: must lie in {MIN_OPSET}..{MAX_OPSET} (what paddle2onnx exports)")
    if not 1 <= a.calib_images <= MAX_CALIB_IMAGES:
        raise ExportError(f"--calib_images {a.calib_images}: must lie in 1..{MAX_CALIB_IMAGES}")
    if not 2 <= a.check_images <= MAX_CALIB_IMAGES:
        raise ExportError(f"--check_images {a.check_images}: must lie in 2..{MAX_CALIB_IMAGES}")
    if a.check_dir is not None and not os.path.isdir(a.check_dir):
        raise ExportError(f"{a.check_dir}: --check_dir is not a folder")
    if a.int8 and (not a.onnx or not a.calib_dir):
        raise ExportError("--int8 needs --onnx and --calib_dir (a folder of good images)")
    for wanted, module in ((a.onnx, "paddle2onnx"), (a.int8, "onnxruntime")):
        if wanted and importlib.util.find_spec(module) is None:
            raise ExportError(f"--{'int8' if module == 'onnxruntime' else 'onnx'} needs {module}: "
                              f"pip install -r requirements-deploy.txt")
    if a.checkpoint is None:
        a.cls = check_class_name(a.cls) if a.cls is not None else class_of_run(a.output_dir)
        a.checkpoint = RunPaths(a.output_dir).checkpoint(a.cls)
    elif a.cls is not None:
        check_class_name(a.cls)
    if a.save_dir is None:
        # the checkpoint's class names the folder: load_checkpoint checked it is one name
        a.save_dir = RunPaths(a.output_dir).export_dir(a.cls or load_checkpoint(a.checkpoint)["class"])
    if os.path.exists(a.save_dir) and not os.path.isdir(a.save_dir):
        raise ExportError(f"{a.save_dir}: --save_dir is a file, not a folder")


def run(a: argparse.Namespace) -> dict:
    check_args(a)
    paddle.set_device("cpu")
    calibration = None
    if a.int8:
        calibration = calibration_images(a.calib_dir, load_checkpoint(a.checkpoint)["image_size"], a.calib_images)
    meta = export(a.checkpoint, a.save_dir, a.teacher_weights, a.onnx, a.opset, calibration)
    files = ", ".join(sorted(meta["files"]) + ["deploy.json"])
    print(f"exported {meta.get('model', 'rd4ad')} {meta['arch']} ({meta['image_size']} px, class {meta['class']}) to {a.save_dir}: {files}; "
          f"input 'image' [N, 3, {meta['image_size']}, {meta['image_size']}], outputs {', '.join(meta['outputs'])}")
    if a.check_dir is not None:
        images = check_images(a.check_dir, meta["image_size"], a.check_images)
    elif calibration:
        images = np.concatenate(calibration[:a.check_images])
    else:
        return meta
    if calibration and a.check_dir is None:
        print("note: judged on the calibration images, which also set the int8 bias and recheck band: give "
              "--check_dir (e.g. the class's test folder) for an independent judgement")
    stage_line(f"judging every runtime and precision against Paddle fp32 on {len(images)} images ...")
    judgement = judge_precisions(read_deployment(a.save_dir), images, os.cpu_count() or 1,
                                 np.concatenate(calibration) if calibration else None)
    meta = record_judgement(a.save_dir, judgement)
    for note in judgement.notes:
        print(f"note: {note}")
    print(precision_table(judgement))
    return meta


def check_images(folder: str, image_size: int, limit: int) -> np.ndarray:
    """Up to `limit` images of `folder` (loose and in subfolders, as a test folder holds
    them), evenly spread over the sorted list so that every defect type is represented."""
    samples = index_test_dir(folder, None)
    if len(samples) < 2:
        raise DataError(f"{folder}: --check_dir needs at least 2 images")
    picked = [samples[int(i)] for i in np.unique(np.linspace(0, len(samples) - 1, min(limit, len(samples))))]
    return np.stack([load_image(s.image_path, image_size) for s in picked])


def record_judgement(save_dir: str, judgement: Judgement) -> dict:
    """deploy.json with the judgement added (the paths' checks, and each runtime's int8 score
    bias beside the int8 calibration), checked as infer.py checks it, written atomically."""
    path = os.path.join(save_dir, "deploy.json")
    meta = {**read_json_file(path, MAX_DEPLOY_BYTES, "a deploy.json"),
            "precision_checks": [c.as_dict() for c in judgement.checks]}
    if judgement.int8_score_bias and isinstance(meta.get("onnx_int8"), dict):
        meta["onnx_int8"] = {**meta["onnx_int8"], "score_bias": judgement.int8_score_bias}
    check_deployment(meta, path)
    atomic_write_json(path, meta)
    return meta


def precision_table(judgement: Judgement) -> str:
    checks = judgement.checks
    lines = ["| path | ms/img | min Pearson | swapped pairs | verdict changes | keeps verdicts |",
             "|---|---:|---:|---:|---:|---|"]
    for k, c in enumerate(checks):
        changes = "n/a (no threshold)" if c.verdict_changes is None else c.verdict_changes
        rechecked = f" ({c.rechecked} of {c.images} rechecked)" if c.recheck_band else ""
        lines.append(f"| {c.name}{rechecked} | {c.ms_per_image:g} | {c.min_pearson:.5f} | {c.swapped_pairs} | "
                     f"{changes} | {'baseline' if k == 0 else 'yes' if c.keeps_verdicts else 'no'} |")
    bias = "".join(f"; {backend} int8 scores less {bias:.4g} (their mean bias on the calibration images)"
                   for backend, bias in judgement.int8_score_bias.items())
    return f"judged on {checks[0].images} images against Paddle Inference fp32{bias}:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 exported, 2 a mistake (one line), 130 interrupted."""
    return run_main(lambda: run(parse_export_args(argv)))
