"""Deployment inference with Paddle Inference (or ONNX Runtime) on an exported RD4AD model.

    python infer.py --model_dir output/inference/bottle --image path/to/img_or_folder
    python infer.py --model_dir output/inference/bottle --data_dir sample_data --cls bottle
    python infer.py ... --device gpu --precision fp16 [--use_tensorrt True]
    python infer.py ... --benchmark True        # AutoLog-style timing table + benchmark.json

Writes under --output_dir: one PNG per image (original | ground truth | heatmap | predicted
mask; panels without data left out), masks/NAME.png (binary defect mask at the calibrated
pixel threshold), scores.csv (score, normalised score in [0, 1] with 0.5 at the threshold,
verdict OK / DEFECT), and a summary line.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="No ccache found")  # printed by paddle's import

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset import (IMAGE_EXTENSIONS, DataError, denormalize, index_test, load_image,  # noqa: E402
                     load_mask)
from model.inference import PredictorSession  # noqa: E402
from utils.benchmark import StageTimer, benchmark_report, format_report  # noqa: E402
from utils.checkpoint import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from utils.decision import Calibration  # noqa: E402
from utils.visualize import binary_mask_image, side_by_side  # noqa: E402


class UsageError(ValueError):
    """A setting this machine or model cannot honour."""


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------- predictors


class PaddlePredictor(PredictorSession):
    """Paddle Inference on CPU (oneDNN) or GPU (optionally TensorRT)."""

    def __init__(self, model_dir: str, args: argparse.Namespace) -> None:
        import paddle.inference as pi

        config = pi.Config(os.path.join(model_dir, "model.json"),
                           os.path.join(model_dir, "model.pdiparams"))
        config.disable_glog_info()
        if args.device == "gpu":
            precision = {"fp32": pi.PrecisionType.Float32, "fp16": pi.PrecisionType.Half}
            if args.precision not in precision:
                raise UsageError(f"--precision {args.precision} is not available on GPU (fp32, fp16)")
            config.enable_use_gpu(256, 0, precision[args.precision])
            if args.use_tensorrt:
                config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=args.batch_size,
                                              min_subgraph_size=3, precision_mode=precision[args.precision],
                                              use_static=False, use_calib_mode=False)
        else:
            if args.use_tensorrt:
                raise UsageError("--use_tensorrt needs --device gpu")
            if args.precision not in ("fp32", "bf16"):
                raise UsageError(f"--precision {args.precision} is not available on CPU "
                                 f"(fp32, bf16 with oneDNN){'; int8: --backend onnxruntime with export_model.py --int8' if args.precision == 'int8' else ''}")
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(args.cpu_threads)
            if args.enable_mkldnn:
                config.enable_mkldnn()
                if args.precision == "bf16":
                    if not cpu_has_bf16():
                        raise UsageError("--precision bf16: this CPU has no bf16 instructions")
                    config.enable_mkldnn_bfloat16()
            elif args.precision == "bf16":
                raise UsageError("--precision bf16 needs --enable_mkldnn True")
        super().__init__(config)


class OnnxPredictor:
    """ONNX Runtime on model.onnx (export_model.py --onnx)."""

    def __init__(self, model_dir: str, args: argparse.Namespace) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("--backend onnxruntime needs: pip install -r requirements-deploy.txt") from None
        if args.precision not in ("fp32", "int8"):
            raise UsageError(f"--backend onnxruntime runs fp32 or int8, not {args.precision}")
        int8 = args.precision == "int8"
        path = os.path.join(model_dir, "model_int8.onnx" if int8 else "model.onnx")
        if not os.path.isfile(path):
            raise UsageError(f"{path}: not found (export with: python export_model.py --onnx"
                             + (" --int8 --calib_dir GOOD_IMAGES)" if int8 else ")"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.cpu_threads
        providers = (["CUDAExecutionProvider"] if args.device == "gpu" else []) + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(None, {self.input_name: images.astype(np.float32)})
        return maps, scores


# ---------------------------------------------------------------- inputs


def _guess_mask(image_path: str) -> str | None:
    """MVTec layout: .../test/<defect>/<name>.png -> .../ground_truth/<defect>/<name>_mask.png."""
    defect_dir, name = os.path.split(os.path.abspath(image_path))
    test_dir, defect = os.path.split(defect_dir)
    if os.path.basename(test_dir) != "test" or defect == "good":
        return None
    stem = os.path.splitext(name)[0]
    mask = os.path.join(os.path.dirname(test_dir), "ground_truth", defect, f"{stem}_mask.png")
    return mask if os.path.isfile(mask) else None


def collect_inputs(args: argparse.Namespace) -> list[dict]:
    """[{path, name, mask (path or None), good (True when known good)}]."""
    if args.image:
        if os.path.isfile(args.image):
            root, paths = os.path.dirname(args.image), [args.image]
        elif os.path.isdir(args.image):
            root = args.image
            paths = sorted(os.path.join(d, n) for d, _, names in os.walk(args.image) for n in names
                           if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
        else:
            raise DataError(f"{args.image}: no such file or folder")
        items = []
        for p in paths:
            rel = os.path.relpath(p, root)
            good = os.path.basename(os.path.dirname(os.path.abspath(p))) == "good"
            items.append({"path": p, "name": os.path.splitext(rel.replace(os.sep, "_"))[0],
                          "mask": _guess_mask(p), "good": good})
    elif args.data_dir and args.cls:
        items = [{"path": s.image_path, "name": s.name, "mask": s.mask_path, "good": s.label == 0}
                 for s in index_test(args.data_dir, args.cls)]
    else:
        raise DataError("give --image FILE_OR_FOLDER, or --data_dir DIR with --cls CLASS")
    if not items:
        raise DataError(f"{args.image}: no images found")
    return items


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", default=os.path.join("output", "inference", "bottle"))
    p.add_argument("--image", help="an image file, or a folder searched recursively")
    p.add_argument("--data_dir", help="MVTec-layout root (with --cls): all its test images")
    p.add_argument("--cls")
    p.add_argument("--output_dir", default=os.path.join("output", "infer"))
    p.add_argument("--backend", default="paddle", choices=["paddle", "onnxruntime"])
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--enable_mkldnn", type=str2bool, nargs="?", const=True, default=True,
                   help="oneDNN on CPU (default True)")
    p.add_argument("--cpu_threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--use_tensorrt", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"])
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--benchmark", type=str2bool, nargs="?", const=True, default=False,
                   help="print AutoLog-style timings and save benchmark.json")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before a benchmark")
    p.add_argument("--threshold", type=float, default=None,
                   help="raw-score threshold for verdicts and masks (default: the calibrated one "
                        "in deploy.json)")
    p.add_argument("--save_images", type=str2bool, nargs="?", const=True, default=True)
    return p.parse_args(argv)


def load_deploy_meta(model_dir: str) -> dict:
    path = os.path.join(model_dir, "deploy.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found: export a model first (python export_model.py)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if not str(meta.get("format", "")).startswith("rd4ad-paddle-inference/"):
        raise DataError(f"{path}: not an RD4AD-Paddle export")
    return meta


def run(args: argparse.Namespace) -> dict:
    if args.batch_size < 1:
        raise UsageError("--batch_size must be at least 1")
    meta = load_deploy_meta(args.model_dir)
    size = meta["image_size"]
    stats = meta.get("score_stats") or {}
    calibration = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
    if args.threshold is not None:
        if calibration is None:
            raise UsageError("--threshold needs a model exported with calibrated thresholds")
        calibration.image_threshold = calibration.pixel_threshold = args.threshold
    predictor = (OnnxPredictor if args.backend == "onnxruntime" else PaddlePredictor)(args.model_dir, args)
    items = collect_inputs(args)
    timer = StageTimer()

    if args.benchmark and args.warmup:
        warm = np.zeros((args.batch_size, 3, size, size), dtype=np.float32)
        for _ in range(args.warmup):
            predictor(warm)

    rows = []
    for start in tqdm(range(0, len(items), args.batch_size), desc="infer", leave=False):
        chunk = items[start:start + args.batch_size]
        with timer.stage("preprocess"):
            loaded, images = [], []
            for item in chunk:
                try:
                    images.append(load_image(item["path"], size))
                    loaded.append(item)
                except DataError as err:  # one bad file: say why in its row, go on
                    rows.append({"image": item["path"], "score": "", "normalized_score": "",
                                 "verdict": "", "z_score": "", "error": str(err)})
            if not images:
                continue
            batch = np.stack(images)
        with timer.stage("inference"):
            maps, scores = predictor(batch)
        timer.images += len(loaded)
        with timer.stage("postprocess"):
            for item, image, amap, score in zip(loaded, images, maps, scores):
                z = (score - stats["mean"]) / stats["std"] if stats.get("std") else None
                row = {"image": item["path"], "score": f"{score:.6f}", "normalized_score": "",
                       "verdict": "", "z_score": "" if z is None else f"{z:.3f}", "error": ""}
                predicted = None
                if calibration is not None:
                    row["normalized_score"] = f"{float(calibration.normalize_scores(score)):.4f}"
                    row["verdict"] = calibration.verdict(score)
                    predicted = calibration.masks(amap)
                    atomic_write(os.path.join(args.output_dir, "masks", item["name"] + ".png"),
                                 lambda tmp, m=predicted: binary_mask_image(m).save(tmp, format="PNG"))
                rows.append(row)
                if args.save_images:
                    _save_picture(args, item, image, amap, float(score), stats, size, predicted,
                                  row["verdict"], calibration)

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "score", "normalized_score", "verdict",
                                             "z_score", "error"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(os.path.join(args.output_dir, "scores.csv"), buf.getvalue())

    ok = [float(r["score"]) for r in rows if r["score"] != ""]
    failed = len(rows) - len(ok)
    ms = timer.per_image_ms()
    defects = sum(r["verdict"] == "DEFECT" for r in rows)
    verdicts = f"{defects} DEFECT / {len(ok) - defects} OK, " if calibration is not None else ""
    summary = (f"{len(ok)} images ({failed} failed) with {args.backend} on {args.device} "
               f"({args.precision}): {verdicts}scores {min(ok):.4f}..{max(ok):.4f}, "
               f"{ms['inference']:.1f} ms/image inference; results in {args.output_dir}"
               if ok else f"no image could be processed ({failed} failed); see scores.csv")
    print(summary)
    report = None
    if args.benchmark:
        report = benchmark_report({
            "model_name": f"rd4ad_{meta['arch']}_{meta.get('class')}", "backend": args.backend,
            "device": args.device, "precision": args.precision, "batch_size": args.batch_size,
            "cpu_threads": args.cpu_threads, "enable_mkldnn": args.enable_mkldnn,
            "use_tensorrt": args.use_tensorrt, "image_size": size}, timer, args.device)
        print(format_report(report))
        atomic_write_json(os.path.join(args.output_dir, "benchmark.json"), report)
    return {"rows": rows, "benchmark": report}


def _save_picture(args, item, image, amap, score, stats, size, predicted, verdict, calibration) -> None:
    # One colour scale for every image: from the lowest value seen on good images (blue)
    # to as far again above the threshold (red). Without statistics: per image.
    if calibration is not None:
        vmin, vmax = calibration.heatmap_range()
    elif stats.get("map_min") is not None and stats.get("max") is not None:
        vmin, vmax = stats["map_min"], 2 * stats["max"] - stats["map_min"]
    else:
        vmin, vmax = float(amap.min()), float(amap.max())
    mask = None
    if item["mask"]:
        mask = load_mask(item["mask"], size)[0]
    elif item["good"] and args.data_dir:
        mask = np.zeros((size, size), dtype=np.float32)  # a good test image: empty ground truth
    picture = side_by_side(denormalize(image), mask, amap, vmin, vmax,
                           f"{os.path.basename(item['path'])}  score {score:.4f} {verdict}", predicted)
    atomic_write(os.path.join(args.output_dir, item["name"] + ".png"),
                 lambda tmp: picture.save(tmp, format="PNG"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
