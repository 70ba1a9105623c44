"""`python infer.py`: an exported model over images, with one options object for the
predictor and the per-image writer `main.py --mode infer` uses too."""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from dataset import IMAGE_EXTENSIONS, DataError, guess_mask, index_test, load_mask, load_rgb, mvtec_source, normalize
from core.decision import MAX_THRESHOLD, Calibration
from core.paths import no_model_for_class
from report.per_image import ImageItem, ImageWriter, colour_range
from utils.cli import output_error, run_main
from utils.errors import PartialFailure, bounded_line
from utils.io import atomic_write_json
from utils.lock import OutputLock
from utils.names import check_class_name, is_within, output_names
from utils.timing import StageTimer, autolog_logger, benchmark_report, format_report

from .command_lines import DEFAULT_CLASS, DEFAULT_OUTPUT, parse_infer_args
from .deployment import Deployment, read_deployment
from .precision import auto_options
from .predictor import Predictor, PredictorOptions, UsageError, build_predictor, check_auto_band, warm_up




def predictor_options(args: argparse.Namespace) -> PredictorOptions:
    return PredictorOptions(backend=args.backend, device=args.device, precision=args.precision,
                            cpu_threads=args.cpu_threads, enable_mkldnn=args.enable_mkldnn,
                            use_tensorrt=args.use_tensorrt, batch_size=args.batch_size,
                            recheck_band=args.recheck_band, recheck_threshold=args.threshold)


MAX_CPU_THREADS = 1024
MAX_INFER_BATCH = 1024
MAX_WARMUP = 1000


def check_args(args: argparse.Namespace) -> None:
    """Every setting and input path, before any model is loaded or anything written."""
    for flag, value, low in (("--batch_size", args.batch_size, 1), ("--cpu_threads", args.cpu_threads, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be at least {low}")
    # as serve.py: Paddle and OpenMP take a C int and spawn the threads; a batch is allocated
    # at once, and each warm-up run takes a batch's time
    for flag, value, most in (("--cpu_threads", args.cpu_threads, MAX_CPU_THREADS),
                              ("--batch_size", args.batch_size, MAX_INFER_BATCH), ("--warmup", args.warmup, MAX_WARMUP)):
        if value > most:
            raise UsageError(f"{flag} {value}: must be at most {most}")
    if args.precision == "auto":
        if args.device != "cpu":
            raise UsageError("--precision auto chooses among CPU paths; on GPU give --precision fp32 or fp16")
        check_auto_band(args.recheck_band)
    else:
        predictor_options(args).check()
    if args.threshold is not None and not (math.isfinite(args.threshold) and abs(args.threshold) <= MAX_THRESHOLD):
        raise UsageError(f"--threshold {args.threshold}: must be a finite number within +-{MAX_THRESHOLD:g} "
                         f"(scores lie in [0, 6])")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"{args.output_dir}: --output_dir is a file, not a folder")
    if args.cls is not None:
        check_class_name(args.cls)
    if args.image and args.data_dir:
        raise UsageError("give --image or --data_dir, not both")
    if args.image:
        if not os.path.exists(args.image):
            raise DataError(f"{args.image}: no such file or folder")
        if os.path.isdir(args.image) and os.path.realpath(args.image) in _own_folders(args):
            raise UsageError(f"{args.output_dir}: --output_dir is the --image folder (or its masks/): "
                             f"the next run would score its own pictures; choose another --output_dir")
    elif args.data_dir and args.cls is not None:
        test_dir = mvtec_source(args.data_dir, args.cls).test_dir
        if is_within(args.output_dir, test_dir):
            raise UsageError(f"{args.output_dir}: --output_dir is inside the test folder {test_dir} (or is "
                             f"that folder): the next run would read its pictures as test images")
    else:
        raise UsageError("give --image FILE_OR_FOLDER, or --data_dir DIR with --cls CLASS")


def _own_folders(args: argparse.Namespace) -> set[str]:
    """Real paths of the folders this run writes into: never read as input."""
    out = os.path.realpath(args.output_dir)
    return {out, os.path.join(out, "masks")}


def _image_files(folder: str, skip: set[str]) -> list[str]:
    """Entries named like images under `folder`, sorted; hidden files and this run's output
    folders (compared by real path) are left out, so a run never scores its own pictures.
    A FIFO, socket, device, link loop or folder named like an image is listed too: reading
    it gives its row the reason, without blocking (a folder is still searched)."""
    found = []
    for d, dirs, names in os.walk(folder):
        dirs[:] = sorted(n for n in dirs if os.path.realpath(os.path.join(d, n)) not in skip)
        found += [os.path.join(d, n) for n in names + dirs
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _item_of_file(path: str, name: str) -> ImageItem:
    """What the folder layout says of an image: MVTec's test/<defect>/ or good/ labels it."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    mask = guess_mask(path)
    label = 0 if folder == "good" else (1 if mask is not None else None)
    return ImageItem(path, name, folder if label is not None else "", label, mask)


def collect_inputs(args: argparse.Namespace) -> list[ImageItem]:
    if args.image:
        if not os.path.isdir(args.image):  # a file, or a FIFO or device: its row says which
            root, paths = os.path.dirname(args.image), [args.image]
        else:
            root, paths = args.image, _image_files(args.image, _own_folders(args))
        if not paths:
            raise DataError(f"{args.image}: no images found")
        # names from the paths relative to the root: distinct even for x.png beside x.jpg
        names = output_names([os.path.relpath(p, root) for p in paths])
        return [_item_of_file(p, n) for p, n in zip(paths, names)]
    root = mvtec_source(args.data_dir, args.cls).test_dir
    samples = index_test(args.data_dir, args.cls)
    names = output_names([os.path.relpath(s.image_path, root) for s in samples])
    return [ImageItem(s.image_path, n, s.defect, None if s.label < 0 else int(s.label), s.mask_path)
            for s, n in zip(samples, names)]


def choose_precision(args: argparse.Namespace, deployment: Deployment) -> None:
    """--precision auto: set args.backend, args.precision and args.recheck_band to the
    fastest path the export judged to keep every verdict (deploy/precision.py) and that
    runs on this machine."""
    chosen, args.auto_choice = auto_options(deployment, predictor_options(args), args.backend_given)
    args.backend, args.precision, args.recheck_band = chosen.backend, chosen.precision, chosen.recheck_band
    print(args.auto_choice)


def calibration_of(args: argparse.Namespace, deployment: Deployment) -> Calibration | None:
    calibration = deployment.calibration
    if args.threshold is None:
        return calibration
    if calibration is None:
        raise UsageError("--threshold needs a model exported with calibrated thresholds")
    return calibration.with_threshold(args.threshold)


def run(args: argparse.Namespace) -> dict:
    """Check everything, then score every image into --output_dir (locked). Raises
    PartialFailure after writing everything when any image failed."""
    check_args(args)
    missing = None if args.model_given else no_model_for_class(DEFAULT_OUTPUT, args.cls or DEFAULT_CLASS)
    if missing:
        raise UsageError(missing)
    deployment = read_deployment(args.model_dir)
    if args.precision == "auto":
        choose_precision(args, deployment)
    calibration = calibration_of(args, deployment)
    items = collect_inputs(args)
    predictor = build_predictor(deployment, predictor_options(args))
    try:  # the folder is created only now that every check has passed
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as err:
        raise output_error(args.output_dir, err) from None
    with OutputLock(args.output_dir):
        writer = ImageWriter(args.output_dir, calibration, deployment.score_stats, pictures=args.save_images)
        writer.clear_previous()
        stale = os.path.join(args.output_dir, "benchmark.json")
        if not args.benchmark and os.path.isfile(stale):  # an earlier run's figures, not this one's
            os.remove(stale)
        info = _run_info(args, deployment, predictor.provider)
        timer = StageTimer(autolog_logger(info) if args.benchmark else None)
        score_all(args, deployment, writer, predictor, items, timer)
        path = writer.finish()
        print(summary(args, writer, timer, predictor.provider, getattr(predictor, "rechecked", None),
                      f"{deployment.model} {deployment.arch} {deployment.image_size} px from {args.model_dir}"))
        report = _benchmark(args, info, timer) if args.benchmark else None
    if writer.failed == len(writer.rows):
        raise PartialFailure(f"no image could be processed ({writer.failed} failed); see {path}")
    if writer.failed:
        raise PartialFailure(f"{writer.failed} of {len(writer.rows)} images failed; see {path}")
    return {"rows": writer.rows, "benchmark": report}


def score_all(args: argparse.Namespace, deployment: Deployment, writer: ImageWriter, predictor: Predictor,
              items: list[ImageItem], timer: StageTimer) -> None:
    """One scores.csv row per item, in input order; pictures and masks as asked."""
    size = deployment.image_size
    if args.benchmark and args.warmup:
        warm = np.zeros((args.batch_size, 3, size, size), dtype=np.float32)
        for _ in range(args.warmup):
            warm_up(predictor, warm)
    for start in tqdm(range(0, len(items), args.batch_size), desc="infer", leave=False, disable=None):
        chunk = items[start:start + args.batch_size]
        with timer.batch():
            _score_chunk(deployment, writer, predictor, chunk, timer, args.save_images)


def _score_chunk(deployment: Deployment, writer: ImageWriter, predictor: Predictor, chunk: list[ImageItem],
                 timer: StageTimer, save_images: bool) -> None:
    size = deployment.image_size
    with timer.stage("preprocess"):
        pictures, errors = _load_chunk(chunk, size)
    results = {}
    with timer.stage("inference"):  # entered even when nothing loaded: AutoLog counts every stage
        if pictures:
            batch = np.stack([normalize(rgb, deployment.mean, deployment.std) for rgb in pictures.values()])
            maps, scores = predictor(batch)
            timer.images += len(pictures)
            results = dict(zip(pictures, zip(maps, scores)))
    with timer.stage("postprocess"):
        for k, item in enumerate(chunk):
            if k not in results:
                writer.add_failed(item, errors[k])
                continue
            amap, score = results[k]
            vmin, vmax = colour_range(writer.calibration, writer.score_stats, amap)
            writer.add(item, pictures[k], amap, score, vmin, vmax,
                       _ground_truth(item, size) if save_images else None)


def _load_chunk(chunk: list[ImageItem], size: int) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """({index: [S, S, 3] uint8}, {index: why it could not be read}): one unreadable file
    is reported in its own row and the others go on."""
    pictures, errors = {}, {}
    for k, item in enumerate(chunk):
        try:
            pictures[k] = load_rgb(item.path, size)
        except DataError as err:
            errors[k] = str(err)
    return pictures, errors


def _ground_truth(item: ImageItem, size: int) -> np.ndarray | None:
    """The image's mask for its picture, when it has one (only drawn: a damaged mask costs
    the picture its ground truth, not the image its score)."""
    if not item.mask_path:
        return None
    try:
        return load_mask(item.mask_path, size)[0]
    except DataError as err:
        tqdm.write(f"warning: {bounded_line(str(err), 300)}: picture drawn without it")
        return None


def summary(args: argparse.Namespace, writer: ImageWriter, timer: StageTimer, provider: str = "",
            rechecked: int | None = None, model: str = "") -> str:
    ok = [float(r["score"]) for r in writer.rows if not r["error"]]
    failed = len(writer.rows) - len(ok)
    if not ok:
        return f"no image could be processed ({failed} failed); see scores.csv"
    verdicts = (f"{writer.defects} DEFECT / {len(ok) - writer.defects} OK, "
                if writer.calibration is not None else "")
    runs_on = f"{args.device} ({args.precision}" + (f", {provider})" if provider else ")")
    if rechecked is not None:
        runs_on += f"; {rechecked} rechecked in fp32 within {args.recheck_band:.4g} of the threshold"
    return (f"{len(ok)} of {len(writer.rows)} images scored ({failed} failed) with {args.backend} on {runs_on}: "
            f"{verdicts}scores {min(ok):.4f}..{max(ok):.4f}, "
            f"{timer.per_image_ms()['inference']:.1f} ms/image inference; results in {args.output_dir}"
            + (f"; model: {model}" if model else ""))


def _run_info(args: argparse.Namespace, deployment: Deployment, provider: str) -> dict:
    return {"model_name": f"rd4ad_{deployment.arch}_{deployment.cls}", "backend": args.backend,
            "device": args.device, "provider": provider, "precision": args.precision, "batch_size": args.batch_size,
            "cpu_threads": args.cpu_threads, "enable_mkldnn": args.enable_mkldnn,
            "use_tensorrt": args.use_tensorrt, "image_size": deployment.image_size}


def _benchmark(args: argparse.Namespace, info: dict, timer: StageTimer) -> dict:
    """AutoLog's report (by auto_log when installed), and the same figures in benchmark.json."""
    report = benchmark_report(info, timer, args.device)
    if timer.autolog is not None:
        sys.stdout.flush()
        timer.autolog.report()
    else:
        print(format_report(report))
    atomic_write_json(os.path.join(args.output_dir, "benchmark.json"), report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 every image scored; 1 some image failed (scores.csv says why); 2 a
    mistake in the settings or the model folder (one line); 130 interrupted."""
    return run_main(lambda: run(parse_infer_args(argv)))
