"""Deployment inference with Paddle Inference (or ONNX Runtime) on an exported RD4AD model.

    python infer.py --model_dir output/inference/bottle --image path/to/img_or_folder
    python infer.py --model_dir output/inference/bottle --data_dir sample_data --cls bottle
    python infer.py ... --device gpu --precision fp16 [--use_tensorrt True]
    python infer.py ... --benchmark True        # AutoLog-style timing table + benchmark.json

Writes under --output_dir: one PNG per image (original | ground truth | heatmap | predicted
mask; panels without data left out), masks/NAME.png (binary defect mask at the calibrated
pixel threshold), scores.csv (score, normalised score in [0, 1] with 0.5 at the threshold,
verdict OK / DEFECT, the base name of its picture and mask), and a summary line.

Trust: deploy.json and the model files are checked before anything is loaded (every field
used; sizes and sha256 against the export's manifest; the graph's input size), every
mistake is one line `error: FILE: problem` (exit 2), and an image whose score or map is not
finite gets no verdict: its row says why and the run exits 1, as it does when any image
failed. Output names never collide (utils/names.py), --output_dir inside the --image folder
is never read back, and one run at a time writes an --output_dir (utils/lock.py).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="No ccache found")  # printed by paddle's import

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset import (IMAGE_EXTENSIONS, DataError, index_test, load_mask, load_rgb,  # noqa: E402
                     mvtec_source, normalize)
from model.inference import (Deployment, ModelError, PredictorSession, check_graph_size,  # noqa: E402
                             check_outputs, paddle_graph_input_shape, read_deployment)
from utils.benchmark import StageTimer, benchmark_report, format_report  # noqa: E402
from utils.checkpoint import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from utils.cli import OneLineArgumentParser, output_error, run_main  # noqa: E402
from utils.decision import MAX_THRESHOLD, Calibration  # noqa: E402
from utils.errors import PartialFailure, UserError, bounded_line, shorten  # noqa: E402
from utils.lock import OutputLock  # noqa: E402
from utils.names import check_class_name, is_within, output_names  # noqa: E402
from utils.visualize import binary_mask_image, side_by_side  # noqa: E402

CSV_FIELDS = ["image", "output", "score", "normalized_score", "verdict", "z_score", "error"]


class UsageError(UserError):
    """A setting this machine or model cannot honour."""


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {shorten(value)}")


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------- predictors


def _first_line(err: BaseException) -> str:
    """A runtime's message cut to its first line, bounded (Paddle's run to many lines of
    C++ context)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return bounded_line(first, 200)


def _load_error(path: str, engine: str, err: BaseException) -> ModelError:
    """Whatever a runtime raises while loading a model, as one line naming the file."""
    return ModelError(f"{path}: {engine} cannot load this model ({_first_line(err)}); "
                      f"export the model again")


class PaddlePredictor(PredictorSession):
    """Paddle Inference on CPU (oneDNN) or GPU (optionally TensorRT), on a checked export."""

    def __init__(self, model_dir: str, args: argparse.Namespace,
                 deployment: Deployment | None = None) -> None:
        import paddle.inference as pi

        check_backend(args)
        deployment = deployment or read_deployment(model_dir)
        self.model_path = deployment.model_file("model.json")
        params = deployment.model_file("model.pdiparams")
        check_graph_size(paddle_graph_input_shape(self.model_path), deployment, self.model_path)
        try:
            config = pi.Config(self.model_path, params)
            config.disable_glog_info()
            _configure_paddle(pi, config, args)
            super().__init__(config)
        except MemoryError:
            raise
        except Exception as err:  # the graph parsed above, so the weights are the likely culprit
            raise _load_error(params, f"Paddle Inference (with {os.path.basename(self.model_path)})",
                              err) from None
        check_graph_size(self.input.shape(), deployment, self.model_path)  # when Paddle says


def check_backend(args: argparse.Namespace) -> None:
    """UsageError for a backend, device and precision that cannot run together here."""
    if args.backend == "onnxruntime":
        if args.precision not in ("fp32", "int8"):
            raise UsageError(f"--backend onnxruntime runs fp32 or int8, not {args.precision}")
        return
    if args.device == "gpu":
        if args.precision not in ("fp32", "fp16"):
            raise UsageError(f"--precision {args.precision} is not available on GPU (fp32, fp16)")
        return
    if args.use_tensorrt:
        raise UsageError("--use_tensorrt needs --device gpu")
    if args.precision not in ("fp32", "bf16"):
        raise UsageError(f"--precision {args.precision} is not available on CPU "
                         f"(fp32, bf16 with oneDNN){'; int8: --backend onnxruntime with export_model.py --int8' if args.precision == 'int8' else ''}")
    if args.precision == "bf16" and not args.enable_mkldnn:
        raise UsageError("--precision bf16 needs --enable_mkldnn True")
    if args.precision == "bf16" and not cpu_has_bf16():
        raise UsageError("--precision bf16: this CPU has no bf16 instructions")


def _configure_paddle(pi, config, args: argparse.Namespace) -> None:
    """Device, precision and threads (the combination is checked by check_backend)."""
    if args.device == "gpu":
        precision = {"fp32": pi.PrecisionType.Float32, "fp16": pi.PrecisionType.Half}[args.precision]
        config.enable_use_gpu(256, 0, precision)
        if args.use_tensorrt:
            config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=args.batch_size,
                                          min_subgraph_size=3, precision_mode=precision,
                                          use_static=False, use_calib_mode=False)
        return
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(args.cpu_threads)
    if args.enable_mkldnn:
        config.enable_mkldnn()
        if args.precision == "bf16":
            config.enable_mkldnn_bfloat16()


class OnnxPredictor:
    """ONNX Runtime on model.onnx (export_model.py --onnx), on a checked export."""

    def __init__(self, model_dir: str, args: argparse.Namespace,
                 deployment: Deployment | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("--backend onnxruntime needs: pip install -r requirements-deploy.txt") from None
        check_backend(args)
        int8 = args.precision == "int8"
        deployment = deployment or read_deployment(model_dir)
        hint = ("export with: python export_model.py --onnx"
                + (" --int8 --calib_dir GOOD_IMAGES" if int8 else ""))
        self.model_path = deployment.model_file("model_int8.onnx" if int8 else "model.onnx", hint)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.cpu_threads
        providers = (["CUDAExecutionProvider"] if args.device == "gpu" else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(self.model_path, options, providers=providers)
        except MemoryError:
            raise
        except Exception as err:
            raise _load_error(self.model_path, "ONNX Runtime", err) from None
        self.input_name = self.session.get_inputs()[0].name
        check_graph_size(self.session.get_inputs()[0].shape, deployment, self.model_path)

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


def _own_folders(args: argparse.Namespace) -> set[str]:
    """Real paths of the folders this run writes into: never read as input."""
    out = os.path.realpath(args.output_dir)
    return {out, os.path.join(out, "masks")}


def _image_files(folder: str, skip: set[str]) -> list[str]:
    """Image files under `folder`, sorted; hidden files and this run's output folders
    (compared by real path) are left out, so a run never scores its own pictures."""
    found = []
    for d, dirs, names in os.walk(folder):
        dirs[:] = sorted(n for n in dirs if os.path.realpath(os.path.join(d, n)) not in skip)
        found += [os.path.join(d, n) for n in names
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def collect_inputs(args: argparse.Namespace) -> list[dict]:
    """[{path, name (output base name), mask (path or None), good (True when known good)}]."""
    if args.image:
        if os.path.isfile(args.image):
            root, paths = os.path.dirname(args.image), [args.image]
        else:
            root, paths = args.image, _image_files(args.image, _own_folders(args))
        items = [{"path": p, "mask": _guess_mask(p),
                  "good": os.path.basename(os.path.dirname(os.path.abspath(p))) == "good"}
                 for p in paths]
        if not items:
            raise DataError(f"{args.image}: no images found")
    else:
        root = mvtec_source(args.data_dir, args.cls).test_dir
        items = [{"path": s.image_path, "mask": s.mask_path, "good": s.label == 0}
                 for s in index_test(args.data_dir, args.cls)]
    # names from the paths relative to the root: distinct even for x.png beside x.jpg
    for item, name in zip(items, output_names([os.path.relpath(i["path"], root) for i in items])):
        item["name"] = name
    return items


# ---------------------------------------------------------------- settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
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


def check_args(args: argparse.Namespace) -> None:
    """Every setting and input path, before any model is loaded or anything written."""
    for flag, value, low in (("--batch_size", args.batch_size, 1), ("--cpu_threads", args.cpu_threads, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be at least {low}")
    check_backend(args)
    if args.threshold is not None and not (math.isfinite(args.threshold) and abs(args.threshold) <= MAX_THRESHOLD):
        raise UsageError(f"--threshold {args.threshold}: must be a finite number within +-{MAX_THRESHOLD:g} "
                         f"(scores lie in [0, 6])")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"{args.output_dir}: --output_dir is a file, not a folder")
    if args.image:
        if not os.path.exists(args.image):
            raise DataError(f"{args.image}: no such file or folder")
        if os.path.isdir(args.image) and os.path.realpath(args.image) in _own_folders(args):
            raise UsageError(f"{args.output_dir}: --output_dir is the --image folder (or its masks/): "
                             f"the next run would score its own pictures; choose another --output_dir")
    elif args.data_dir and args.cls is not None:
        check_class_name(args.cls)
        test_dir = mvtec_source(args.data_dir, args.cls).test_dir
        if is_within(args.output_dir, test_dir):
            raise UsageError(f"{args.output_dir}: --output_dir is inside the test folder {test_dir} (or is it): "
                             f"the next run would read its pictures as test images")
    else:
        raise UsageError("give --image FILE_OR_FOLDER, or --data_dir DIR with --cls CLASS")


def _calibration(args: argparse.Namespace, deployment: Deployment) -> Calibration | None:
    calibration = deployment.calibration
    if args.threshold is None:
        return calibration
    if calibration is None:
        raise UsageError("--threshold needs a model exported with calibrated thresholds")
    return calibration.with_threshold(args.threshold)


def build_predictor(args: argparse.Namespace, deployment: Deployment):
    kind = OnnxPredictor if args.backend == "onnxruntime" else PaddlePredictor
    return kind(args.model_dir, args, deployment)


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    """Check everything, then score every image into --output_dir (locked). Raises
    PartialFailure after writing everything when any image failed."""
    check_args(args)
    deployment = read_deployment(args.model_dir)
    calibration = _calibration(args, deployment)
    items = collect_inputs(args)
    predictor = build_predictor(args, deployment)
    try:  # the folder is created only now that every check has passed
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as err:
        raise output_error(args.output_dir, err) from None
    with OutputLock(args.output_dir):
        rows, timer = score_all(args, deployment, calibration, predictor, items)
        path = os.path.join(args.output_dir, "scores.csv")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
        print(summary(args, rows, timer, calibration))
        report = _benchmark(args, deployment, timer) if args.benchmark else None
    failed = sum(bool(r["error"]) for r in rows)
    if failed == len(rows):
        raise PartialFailure(f"no image could be processed ({failed} failed); see {path}")
    if failed:
        raise PartialFailure(f"{failed} of {len(rows)} images failed; see {path}")
    return {"rows": rows, "benchmark": report}


def _row(item: dict, error: str = "") -> dict:
    return {"image": item["path"], "output": "", "score": "", "normalized_score": "", "verdict": "",
            "z_score": "", "error": error}


def score_all(args: argparse.Namespace, deployment: Deployment, calibration: Calibration | None,
              predictor, items: list[dict]) -> tuple[list[dict], StageTimer]:
    """One scores.csv row per item, in input order; pictures and masks as asked."""
    size = deployment.image_size
    timer = StageTimer()
    if args.benchmark and args.warmup:
        warm = np.zeros((args.batch_size, 3, size, size), dtype=np.float32)
        for _ in range(args.warmup):
            _predict(predictor, warm, size)
    rows: list[dict] = []
    for start in tqdm(range(0, len(items), args.batch_size), desc="infer", leave=False, disable=None):
        chunk = items[start:start + args.batch_size]
        with timer.stage("preprocess"):
            pictures, errors = _load_chunk(chunk, size)
        results = {}
        if pictures:
            batch = np.stack([normalize(rgb, deployment.mean, deployment.std) for rgb in pictures.values()])
            with timer.stage("inference"):
                maps, scores = _predict(predictor, batch, size)
            timer.images += len(pictures)
            results = dict(zip(pictures, zip(maps, scores)))
        with timer.stage("postprocess"):
            for k, item in enumerate(chunk):
                rows.append(_finish(args, deployment, calibration, item, pictures[k], *results[k])
                            if k in results else _row(item, errors[k]))
    return rows, timer


def _load_chunk(chunk: list[dict], size: int) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """({index: [S, S, 3] uint8}, {index: why it could not be read}): one unreadable file
    is reported in its own row and the others go on."""
    pictures, errors = {}, {}
    for k, item in enumerate(chunk):
        try:
            pictures[k] = load_rgb(item["path"], size)
        except DataError as err:
            errors[k] = str(err)
    return pictures, errors


def _predict(predictor, batch: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The predictor's (maps, scores), checked against what deploy.json promises."""
    try:
        maps, scores = predictor(batch)
    except MemoryError:
        raise
    except Exception as err:  # the runtime failed on a well-formed batch: the model is at fault
        raise ModelError(f"{getattr(predictor, 'model_path', 'model')}: the model failed to run on a "
                         f"batch of {len(batch)} images ({_first_line(err)}); export the model again") from None
    check_outputs(maps, scores, len(batch), size, getattr(predictor, "model_path", "model"))
    return maps, scores


def _finish(args: argparse.Namespace, deployment: Deployment, calibration: Calibration | None,
            item: dict, rgb: np.ndarray, amap: np.ndarray, score: float) -> dict:
    """The row of one scored image, and its mask and picture. A score or map that is not
    finite is never a verdict: the row says why and nothing claiming one is written."""
    score = float(score)
    bad = int(np.size(amap) - np.isfinite(amap).sum())
    if not math.isfinite(score) or bad:
        return _row(item, f"the model's output is not finite (score {score}, {bad} map values NaN "
                          f"or inf): no verdict; the model or its files are broken")
    stats = deployment.score_stats
    row = _row(item)
    row["score"] = f"{score:.6f}"
    if stats.get("std") and "mean" in stats:
        row["z_score"] = f"{(score - stats['mean']) / stats['std']:.3f}"
    predicted = None
    if calibration is not None:
        row["normalized_score"] = f"{float(calibration.normalize_scores(score)):.4f}"
        row["verdict"] = calibration.verdict(score)
        predicted = calibration.masks(amap)
        atomic_write(os.path.join(args.output_dir, "masks", item["name"] + ".png"),
                     lambda tmp: binary_mask_image(predicted).save(tmp, format="PNG"))
        row["output"] = item["name"]
    if args.save_images:
        _save_picture(args, deployment, item, rgb, amap, score, predicted, row["verdict"], calibration)
        row["output"] = item["name"]
    return row


def _save_picture(args: argparse.Namespace, deployment: Deployment, item: dict, rgb: np.ndarray,
                  amap: np.ndarray, score: float, predicted: np.ndarray | None, verdict: str,
                  calibration: Calibration | None) -> None:
    # One colour scale for every image: from the lowest value seen on good images (blue)
    # to as far again above the threshold (red). Without statistics: per image.
    stats, size = deployment.score_stats, deployment.image_size
    if calibration is not None:
        vmin, vmax = calibration.heatmap_range()
    elif stats.get("map_min") is not None and stats.get("max") is not None:
        vmin, vmax = stats["map_min"], 2 * stats["max"] - stats["map_min"]
    else:
        vmin, vmax = float(amap.min()), float(amap.max())
    mask = None
    if item["mask"]:
        try:
            mask = load_mask(item["mask"], size)[0]
        except DataError as err:  # the ground truth is only drawn: the score stands
            print(f"warning: {bounded_line(str(err), 300)}: picture drawn without it", file=sys.stderr)
    elif item["good"] and args.data_dir and not args.image:
        mask = np.zeros((size, size), dtype=np.float32)  # a good test image: empty ground truth
    picture = side_by_side(rgb, mask, amap, vmin, vmax,
                           f"{os.path.basename(item['path'])}  score {score:.4f} {verdict}", predicted)
    atomic_write(os.path.join(args.output_dir, item["name"] + ".png"),
                 lambda tmp: picture.save(tmp, format="PNG"))


def summary(args: argparse.Namespace, rows: list[dict], timer: StageTimer,
            calibration: Calibration | None) -> str:
    ok = [float(r["score"]) for r in rows if not r["error"]]
    failed = len(rows) - len(ok)
    if not ok:
        return f"no image could be processed ({failed} failed); see scores.csv"
    defects = sum(r["verdict"] == "DEFECT" for r in rows)
    verdicts = f"{defects} DEFECT / {len(ok) - defects} OK, " if calibration is not None else ""
    return (f"{len(ok)} images ({failed} failed) with {args.backend} on {args.device} "
            f"({args.precision}): {verdicts}scores {min(ok):.4f}..{max(ok):.4f}, "
            f"{timer.per_image_ms()['inference']:.1f} ms/image inference; results in {args.output_dir}")


def _benchmark(args: argparse.Namespace, deployment: Deployment, timer: StageTimer) -> dict:
    report = benchmark_report({
        "model_name": f"rd4ad_{deployment.arch}_{deployment.cls}", "backend": args.backend,
        "device": args.device, "precision": args.precision, "batch_size": args.batch_size,
        "cpu_threads": args.cpu_threads, "enable_mkldnn": args.enable_mkldnn,
        "use_tensorrt": args.use_tensorrt, "image_size": deployment.image_size}, timer, args.device)
    print(format_report(report))
    atomic_write_json(os.path.join(args.output_dir, "benchmark.json"), report)
    return report


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every image scored; 1 some image failed (scores.csv says why); 2 a
    mistake in the settings or the model folder (one line); 130 interrupted."""
    try:
        args = parse_args(argv)
    except SystemExit as done:  # argparse: --help (0) or a one-line mistake (2)
        return int(done.code or 0)
    def body() -> None:
        run(args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
