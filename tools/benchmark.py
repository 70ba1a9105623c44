"""Every speed figure of the project in one process and one run, as a table and JSON.

    python tools/benchmark.py                       # wide_resnet50_2, 256 px (several minutes)
    python tools/benchmark.py --quick               # resnet18, 64 px, a smoke test (CI)
    python tools/benchmark.py --arch resnet18 --image_size 128 --repeats 3 --json out.json
    python tools/benchmark.py --reference ../RD4AD      # beside hq-deng/RD4AD (needs torch)
    python tools/benchmark.py --stages rdpp --reference_rdpp ../Revisiting-Reverse-Distillation

Measured, each with warm-up and the median of --repeats runs, random weights (timing does
not depend on them):
- inference ms/image at batch 1 and --batch: dynamic graph (what main.py evaluates with),
  Paddle Inference fp32 with oneDNN, ONNX Runtime, Paddle Inference bf16 (oneDNN, where the
  CPU has bf16), with the bf16 maps' agreement with fp32 on sample_data;
- training images/s at --train_batch with and without the teacher-feature cache, with the
  1x1, 3x3 and transposed convolutions on oneDNN (the default, model/onednn.py) and on Paddle's own kernels;
- evaluation of one class end to end (--eval_images test images, metrics included);
- AUPRO on 30 maps: exact mode against a 200-threshold loop like the reference's;
- peak RSS of each stage (reset between stages where Linux allows), threads and flags;
- with --reference DIR (a local checkout of hq-deng/RD4AD and PyTorch installed): the
  reference's own training step and batch-1 inference pipeline (tools/reference.py), with
  the same threads, batch, size and random inputs, and every path's ratio to it. Its
  training steps take turns with ours, round by round, and its inference is timed before
  and after ours, so that the machine's drifts (up to 1.5x within minutes on a shared
  machine) hit both alike. Each figure is the median of its runs, with their range.
- --stages rdpp (not in the default stages): an RD++ training iteration, and with
  --reference_rdpp DIR the reference RD++'s beside it (tools/benchmark_rdpp.py).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a script in tools/: the repository's packages by path
from utils import runtime  # noqa: E402

runtime.start()  # before Paddle loads: a quiet import, every CPU core

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from dataset import MVTecDataset, index_test, index_train, load_image  # noqa: E402
from deploy.deployment import read_deployment  # noqa: E402
from deploy.export import export  # noqa: E402
from deploy.predictor import PredictorOptions, StaticGraphRunner, build_predictor, cpu_has_bf16  # noqa: E402
from engine.checkpoint import load_checkpoint, load_trained, save_checkpoint  # noqa: E402
from core.results import compute_metrics  # noqa: E402
from engine.evaluate import predict  # noqa: E402
from core.metrics import aupro  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from model.arch import ARCH_NAMES as ARCHS  # noqa: E402
from model.onednn import OneDNNLibrary, load_library, use_conv_backend  # noqa: E402
from model.registry import MODELS, build_model  # noqa: E402
from utils.cli import OneLineArgumentParser, run_main  # noqa: E402
from utils.errors import UserError, shorten  # noqa: E402
from utils.io import atomic_write_json  # noqa: E402

from tools.reference import Reference, seconds_per_run  # noqa: E402


# ---------------------------------------------------------------- helpers

def reset_peak_rss() -> bool:
    """Linux resets VmHWM when 5 is written to clear_refs; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


RSS_RESETS = reset_peak_rss()  # else per-stage peaks cannot be told apart: report the run's


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def median_seconds(fn, repeats: int, warmup: int) -> float:
    return statistics.median(seconds_per_run(fn, repeats, warmup))


def spread(values: list[float], digits: int = 1) -> str:
    """'low-high' of a figure's runs: how much noise its median hides."""
    return f"{round(min(values), digits)}-{round(max(values), digits)}"


def reference_style_pro_loop(masks: np.ndarray, maps: np.ndarray, num_th: int = 200) -> float:
    """The reference's compute_pro, step by step as it runs (what exact mode replaces):
    per threshold, binarise every map, label every mask and read each region's overlap
    through regionprops, then FPR; keep FPR < 0.3, rescale, trapezoid."""
    from skimage import measure
    masks = masks.astype(int)
    inverse = 1 - masks
    lo, hi = maps.min(), maps.max()
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / num_th):
        binary = maps > th
        overlaps = []
        for b, m in zip(binary, masks):
            for region in measure.regionprops(measure.label(m)):
                overlaps.append(b[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    fprs, pros = fprs[keep] / fprs[keep].max(), pros[keep]
    return float(-np.trapezoid(pros, fprs))


# ---------------------------------------------------------------- stages

def bench_inference(args, net, model_dir, sample_images) -> tuple[list[dict], dict]:
    size = args.image_size
    rows, agreement, notes = [], {}, []
    model = net
    backends = [("dynamic graph", "dygraph", None)]
    backends.append(("Paddle Inference fp32 oneDNN", "paddle",
                     PredictorOptions(enable_mkldnn=True, cpu_threads=args.threads, precision="fp32")))
    try:
        import onnxruntime  # noqa: F401
        backends.append(("ONNX Runtime fp32", "onnxruntime",
                         PredictorOptions(backend="onnxruntime", cpu_threads=args.threads)))
        backends.append(("ONNX Runtime int8", "onnxruntime",
                         PredictorOptions(backend="onnxruntime", cpu_threads=args.threads, precision="int8")))
    except ImportError:
        notes.append({"path": "ONNX Runtime fp32", "note": "onnxruntime not installed"})
    if _has("openvino"):
        backends.append(("OpenVINO fp32", "openvino",
                         PredictorOptions(backend="openvino", cpu_threads=args.threads)))
        backends.append(("OpenVINO int8", "openvino",
                         PredictorOptions(backend="openvino", cpu_threads=args.threads, precision="int8")))
        if cpu_has_bf16():
            backends.append(("OpenVINO bf16", "openvino",
                             PredictorOptions(backend="openvino", cpu_threads=args.threads, precision="bf16")))
    else:
        notes.append({"path": "OpenVINO", "note": "openvino not installed"})
    if cpu_has_bf16():
        backends.append(("Paddle Inference bf16 oneDNN", "paddle",
                         PredictorOptions(enable_mkldnn=True, cpu_threads=args.threads, precision="bf16")))
    else:
        notes.append({"path": "Paddle Inference bf16 oneDNN", "note": "CPU has no bf16 instructions"})
    reference_ms = []
    if args.reference_code is not None:  # timed before and after ours: drifts hit both alike
        image = np.random.default_rng(1).normal(size=(1, 3, size, size)).astype(np.float32)
        reference_run = args.reference_code.inference(args.arch, image)
        reference_ms += [1000 * t for t in seconds_per_run(reference_run, (args.repeats + 1) // 2, args.warmup)]
    outputs = {}
    for name, kind, pargs in backends:
        reset_peak_rss()
        if kind == "dygraph":
            def run(x):
                with paddle.no_grad():
                    m, s = model(paddle.to_tensor(x))
                return m.numpy(), s.numpy()
        else:
            run = build_predictor(read_deployment(model_dir), pargs)
        row = {"path": name}
        for batch in sorted({1, args.batch}):
            x = np.random.default_rng(batch).normal(size=(batch, 3, size, size)).astype(np.float32)
            ms = [1000 * t / batch for t in seconds_per_run(lambda: run(x), args.repeats, args.warmup)]
            row[f"ms/img b{batch}"] = round(statistics.median(ms), 1)
            row[f"b{batch} range"] = spread(ms)
        row["peak RSS MB"] = peak_rss_mb() if RSS_RESETS else None
        if sample_images is not None:
            outputs[name] = np.concatenate([run(img[None])[0] for img in sample_images])
        rows.append(row)
        print(f"  {name}: {row}", flush=True)

    notes.append({"path": "Paddle Inference int8 oneDNN",
                  "note": "not measured: Paddle 3.3.1 PTQ gives no runnable int8 predictor (doc/performance.md)"})
    if args.reference_code is not None:
        reference_ms += [1000 * t for t in seconds_per_run(reference_run, args.repeats // 2 or 1, 1)]
        ms = reference_ms
        rows.append({"path": REFERENCE_INFERENCE, "ms/img b1": round(statistics.median(ms), 1),
                     "b1 range": spread(ms)})
        print(f"  {rows[-1]}", flush=True)
    base = next(r for r in rows if r["path"] == "dynamic graph")
    reference = next((r for r in rows if r["path"] == REFERENCE_INFERENCE), None)
    for row in rows:
        for key in [k for k in row if k.startswith("ms/img") and k in base]:
            row[key.replace("ms/img", "x vs dygraph")] = round(base[key] / row[key], 2)
        if reference is not None:
            row["b1 x vs reference"] = round(reference["ms/img b1"] / row["ms/img b1"], 2)
    rows += notes

    fp32 = outputs.get("Paddle Inference fp32 oneDNN")
    for name in ("Paddle Inference bf16 oneDNN", "ONNX Runtime int8", "ONNX Runtime fp32", "OpenVINO fp32",
                 "OpenVINO int8", "OpenVINO bf16"):
        other = outputs.get(name)
        if fp32 is None or other is None:
            continue
        pearson = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(fp32, other)]
        ref_scores = fp32.reshape(len(fp32), -1).max(1).astype(np.float64)
        scores = other.reshape(len(other), -1).max(1).astype(np.float64)
        # pairs of images ordered differently, and how far apart fp32 put them
        flipped = np.sign(ref_scores[:, None] - ref_scores[None]) != np.sign(scores[:, None] - scores[None])
        gaps = np.abs(ref_scores[:, None] - ref_scores[None])[np.triu(flipped, 1)]
        agreement[name] = {"images": len(fp32), "min_pearson_per_map": round(min(pearson), 5),
                           "scores_rank_the_same": not gaps.size,
                           "swapped_pairs": int(gaps.size),
                           "largest_fp32_gap_of_a_swapped_pair": float(gaps.max()) if gaps.size else 0.0,
                           "max_abs_score_difference": float(np.abs(ref_scores - scores).max())}
    return rows, agreement


REFERENCE_TRAINING = "reference (hq-deng/RD4AD, torch): teacher every step, its backward too"
REFERENCE_INFERENCE = "reference (hq-deng/RD4AD, torch): eager, its cal_anomaly_map + gaussian_filter"


def bench_training(args, net) -> list[dict]:
    """Images/s of one training step, ours with and without the teacher-feature cache and,
    with --reference, the reference's; the steps take turns, round by round."""
    size, batch = args.image_size, args.train_batch
    inputs = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    images = paddle.to_tensor(inputs)
    net.train()
    cached = net.teacher_features(images)  # what the cache hands over (float16 round trip below)
    cached = [paddle.to_tensor(f.numpy().astype(np.float16).astype(np.float32)) for f in cached]
    # the model's own optimizer groups and loss (model/base.py), as engine/train.py steps them
    optimizers = [build_optimizer(g.parameters, g.lr, *g.betas) for g in net.optimizer_groups(0.005)]

    def our_step(uses_cache: bool):
        def step():
            inputs = net.train_inputs(images)
            feats = cached if uses_cache else net.teacher_features(inputs["images"])
            net.loss_terms(inputs, feats)["loss"].backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.clear_grad()
        return step
    # Every backend this machine has for the convolutions (model/onednn.py), the default
    # first; each is switched on (outside the timing) before its steps.
    threads = runtime.eager_threads()
    backends = ["onednn", "paddle"] if isinstance(load_library(), OneDNNLibrary) else ["paddle"]
    steps, backend_of = {}, {}
    for backend in backends:
        for uses_cache, what in ((False, "teacher every step"), (True, "teacher-feature cache")):
            name = f"train, {what}, {backend} convolutions"
            steps[name], backend_of[name] = our_step(uses_cache), backend
    if args.reference_code is not None:
        steps[REFERENCE_TRAINING] = args.reference_code.training_step(args.arch, inputs)

    def run(name: str, step) -> list[float]:
        if name in backend_of:
            use_conv_backend(net, backend_of[name], threads)
        return seconds_per_run(step, 1, 0)
    for name, step in steps.items():  # warm-up
        run(name, step)
    seconds = {name: [] for name in steps}
    for _ in range(args.train_repeats):  # the steps take turns: drifts hit all alike
        for name, step in steps.items():
            seconds[name] += run(name, step)
    rows = []
    for name, times in seconds.items():
        rates = [batch / t for t in times]
        rows.append({"path": name, "images/s": round(statistics.median(rates), 3), "range": spread(rates, 3),
                     "batch": batch, "runs": len(times)})
    if args.reference_code is not None:
        reference = statistics.median(seconds[REFERENCE_TRAINING])
        for row in rows:
            row["x vs reference"] = round(reference / statistics.median(seconds[row["path"]]), 2)
    for row in rows:
        print(f"  {row}", flush=True)
    use_conv_backend(net, backends[0], threads)
    return rows


def bench_evaluation(args, net, work, backends: tuple[str, ...]) -> list[dict]:
    """One class end to end as main.py evaluates it: decode, resize, model, maps, metrics."""
    src = os.path.join(ROOT, "sample_data", "bottle")
    dst = os.path.join(work, "eval_data", "bottle")
    shutil.rmtree(dst, ignore_errors=True)
    files = sorted(glob.glob(os.path.join(src, "test", "*", "*.png")))
    for k in range(args.eval_images):  # copies of the sample test set, masks with them
        path = files[k % len(files)]
        defect = os.path.basename(os.path.dirname(path))
        name = f"{k:03d}.png"
        os.makedirs(os.path.join(dst, "test", defect), exist_ok=True)
        shutil.copy(path, os.path.join(dst, "test", defect, name))
        if defect != "good":
            os.makedirs(os.path.join(dst, "ground_truth", defect), exist_ok=True)
            mask = os.path.join(src, "ground_truth", defect, os.path.basename(path)[:-4] + "_mask.png")
            shutil.copy(mask, os.path.join(dst, "ground_truth", defect, f"{k:03d}_mask.png"))
    rows = []
    for backend in backends:
        reset_peak_rss()
        start = time.perf_counter()
        dataset = MVTecDataset(index_test(os.path.dirname(dst), "bottle"), args.image_size)
        loader = paddle.io.DataLoader(dataset, batch_size=8, shuffle=False)
        runner = StaticGraphRunner(net, args.threads) if backend == "static" else None
        pred = predict(net, loader, len(dataset), args.image_size, progress=False, runner=runner)
        metrics = compute_metrics(pred)
        seconds = time.perf_counter() - start
        rows.append({"path": f"evaluate one class, {backend} ({len(dataset)} test images, "
                             f"decoding, predictor build and metrics included)",
                     "seconds": round(seconds, 2), "peak RSS MB": peak_rss_mb(),
                     "metrics finite": bool(all(np.isfinite(v) for v in metrics.values()))})
        print(f"  {rows[-1]}", flush=True)
    return rows


def bench_aupro(args) -> dict:
    rng = np.random.default_rng(0)
    n, size = 30, 256
    masks = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(20, size - 20, 2).tolist() + [int(rng.integers(4, 20))]
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    from scipy.ndimage import gaussian_filter
    maps = np.stack([gaussian_filter(rng.random((size, size)) + masks[i] * rng.random((size, size)), 4)
                     for i in range(n)]).astype(np.float32)
    reset_peak_rss()
    exact_s = median_seconds(lambda: aupro(masks, maps, mode="set"), args.repeats, 1)
    start = time.perf_counter()
    loop_value = reference_style_pro_loop(masks, maps)  # slow: timed once
    loop_s = time.perf_counter() - start
    row = {"path": f"AUPRO, {n} maps of {size}x{size} (set)",
           "exact s": round(exact_s, 3), "200-threshold loop s": round(loop_s, 3),
           "speed-up": round(loop_s / exact_s, 1),
           "exact value": round(aupro(masks, maps, mode="set"), 4),
           "200-threshold value": round(aupro(masks, maps, mode="set", num_thresholds=200), 4),
           "loop value": round(loop_value, 4),
           "peak RSS MB": peak_rss_mb()}
    print(f"  {row}", flush=True)
    return row


# ---------------------------------------------------------------- report

def markdown_table(rows: list[dict]) -> str:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


STAGES = ("training", "evaluation", "inference", "aupro")
OPTIONAL_STAGES = ("rdpp",)  # run only when named in --stages


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rd4ad", choices=tuple(MODELS), help="the method (without --checkpoint)")
    p.add_argument("--arch", default="wide_resnet50_2", choices=ARCHS)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="the larger inference batch")
    p.add_argument("--train_batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train_repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eval_images", type=int, default=83)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="resnet18, 64 px, few repeats: a smoke test")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--checkpoint", help="a trained checkpoint (its arch and size) instead of random "
                                        "weights: the agreement of bf16 with fp32 needs trained weights")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of stages to run")
    p.add_argument("--reference", metavar="DIR", help="a local checkout of hq-deng/RD4AD (PyTorch installed): "
                                                      "time the reference beside ours (default: none)")
    p.add_argument("--reference_rdpp", metavar="DIR", help="with --stages rdpp: a local checkout of "
                   "tientrandinh/Revisiting-Reverse-Distillation (torch, geomloss installed) timed beside ours")
    a = p.parse_args(argv)
    if a.quick:
        a.arch, a.image_size, a.batch, a.train_batch = "resnet18", 64, 4, 4
        a.repeats, a.train_repeats, a.warmup, a.eval_images = 2, 1, 1, 12
    check_args(a)
    return a


def check_args(a: argparse.Namespace) -> None:
    """Settings that cannot work, and an unwritable --json, refused before minutes of work."""
    for name in ("batch", "train_batch", "repeats", "train_repeats", "eval_images", "threads"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name} {getattr(a, name)}: must be at least 1")
    if a.warmup < 0:
        raise UserError(f"--warmup {a.warmup}: must be 0 or more")
    if a.image_size < 64 or a.image_size % 32:
        raise UserError(f"--image_size {a.image_size}: must be a multiple of 32, at least 64")
    a.stage_set = {s.strip() for s in a.stages.split(",") if s.strip()}
    unknown = sorted(a.stage_set - set(STAGES) - set(OPTIONAL_STAGES))
    if unknown or not a.stage_set:
        raise UserError(f"--stages {shorten(a.stages)}: choose from {', '.join(STAGES + OPTIONAL_STAGES)}")
    if a.json:
        folder = os.path.dirname(os.path.abspath(a.json))
        if os.path.isdir(a.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"{a.json}: cannot write the --json file there (not a writable folder "
                            f"or a folder itself)")
    if a.checkpoint:
        load_checkpoint(a.checkpoint)  # read without running code, every part checked
    a.reference_code = None
    if a.reference:  # torch there, the checkout's files and functions: before any work
        a.reference_code = Reference(a.reference)
        a.reference_code.torch.set_num_threads(a.threads)  # the same threads as ours
    a.reference_rdpp_code = None
    if a.reference_rdpp:
        from tools.reference_rdpp import ReferenceRDPP
        a.reference_rdpp_code = ReferenceRDPP(a.reference_rdpp)
        a.reference_rdpp_code.torch.set_num_threads(a.threads)


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: benchmark(parse_args(argv)))


def benchmark(a: argparse.Namespace) -> int:
    stages = a.stage_set

    paddle.set_device("cpu")
    paddle.seed(0)
    info = {"arch": a.arch, "image_size": a.image_size, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "predictor threads": a.threads, "paddle": paddle.__version__,
            "FLAGS_use_mkldnn": os.environ.get("FLAGS_use_mkldnn", "unset"),
            "bf16 CPU": cpu_has_bf16(), "weights": a.checkpoint or "random",
            "reference": f"torch {a.reference_code.torch.__version__}, {a.reference}" if a.reference_code else None,
            "reference RD++": (f"torch {a.reference_rdpp_code.torch.__version__}, {a.reference_rdpp}"
                               if a.reference_rdpp_code else None)}
    print("benchmark:", json.dumps(info), flush=True)
    work = tempfile.mkdtemp(prefix="rd4ad-bench-")
    try:
        if a.checkpoint:
            net, state = load_trained(a.checkpoint)
            a.arch, a.image_size = state["arch"], state["image_size"]
            info.update(arch=a.arch, image_size=a.image_size)
            ckpt = a.checkpoint
        else:
            net = build_model(a.model, a.arch, a.image_size, teacher_weights="none")
            ckpt = os.path.join(work, "model.pdparams")
            save_checkpoint(ckpt, net, epoch=0, cls="bench", teacher_weights="none")
        net.eval()
        model_dir = os.path.join(work, "inference")
        if "inference" in stages:  # the only stage that reads an export
            onnx = _has("paddle2onnx") and _has("onnxruntime")
            # int8: ONNX Runtime's post-training quantisation, calibrated on the train-good images
            calibration = [load_image(s.image_path, a.image_size)[None]
                           for s in index_train(os.path.join(ROOT, "sample_data"), "bottle")]
            export(ckpt, model_dir, onnx=onnx, int8_calibration=calibration if onnx else None)
        samples = index_test(os.path.join(ROOT, "sample_data"), "bottle")
        sample_images = np.stack([load_image(s.image_path, a.image_size) for s in samples])

        # Eager work first: once a Paddle Inference predictor has run in a process, eager
        # training and inference there run ~1.7x slower on CPU (main.py trains without one).
        training_rows, evaluation_rows, inference_rows, agreement, aupro_row = [], [], [], {}, {}
        if "rdpp" in stages:
            from tools.benchmark_rdpp import bench_rdpp_training
            print("RD++ training", flush=True)
            training_rows += bench_rdpp_training(a, a.reference_rdpp_code)
        if "training" in stages:
            print("training", flush=True)
            weights = {k: v.numpy().copy() for k, v in net.state_dict().items()}
            training_rows = bench_training(a, net)
            net.set_state_dict(weights)  # the timing steps must not change what is measured next
        net.eval()
        if "evaluation" in stages:
            print("evaluation (dynamic graph)", flush=True)
            evaluation_rows = bench_evaluation(a, net, work, ("dygraph",))
        if "inference" in stages:
            print("inference", flush=True)
            inference_rows, agreement = bench_inference(a, net, model_dir, sample_images)
        if "evaluation" in stages:
            print("evaluation (predictor)", flush=True)
            evaluation_rows += bench_evaluation(a, net, work, ("static",))
        if "aupro" in stages:
            print("aupro", flush=True)
            aupro_row = bench_aupro(a)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {"info": info, "inference": inference_rows, "agreement_with_fp32": agreement,
              "training": training_rows, "evaluation": evaluation_rows, "aupro": aupro_row}
    print("\n## Inference (ms per image; ratio: dynamic graph time / this path's)\n")
    print(markdown_table(inference_rows))
    print("\n## Agreement with Paddle Inference fp32 on sample_data\n")
    print(json.dumps(agreement, indent=1))
    print("\n## Training\n")
    print(markdown_table(training_rows))
    print("\n## Evaluation and AUPRO\n")
    print(markdown_table(evaluation_rows))
    print()
    print(markdown_table([aupro_row] if aupro_row else []))
    if a.json:
        atomic_write_json(a.json, report)
    return 0


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
