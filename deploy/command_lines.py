"""The command lines of export_model.py, infer.py and serve.py, readable without Paddle:
--help and a mistake in a flag answer before any heavy import (the work's modules load
after, in deploy/*_command.py)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from engine.paths import RunPaths, default_infer_dir
from utils.cli import OneLineArgumentParser, parse_bool
from utils.names import check_class_name

from .options import BACKEND_NAMES, DEVICE_NAMES, MAX_OPSET, MIN_OPSET, PredictorOptions, add_precision_flags
from .service_options import ServiceOptions

EXPORT_DESCRIPTION = "Export a trained RD4AD class to one static graph: image -> (anomaly map, score)."
INFER_DESCRIPTION = "Score images with an exported RD4AD model (Paddle Inference, ONNX Runtime or OpenVINO)."
SERVE_DESCRIPTION = "Serve an exported RD4AD model over HTTP: POST an image, get its verdict, score and mask."
DEFAULT_OUTPUT = "output"   # the training output folder whose inference/CLASS is the default model
DEFAULT_CLASS = "bottle"    # the quick start's class
MAX_WORKERS = 64
EXPORT_EXAMPLES = """examples:
  python export_model.py --output_dir output --cls bottle      # -> output/inference/bottle
  python export_model.py --cls bottle --onnx                   # also model.onnx, for ONNX Runtime and OpenVINO"""
INFER_EXAMPLES = """examples:
  python infer.py --cls bottle --image photo.png               # the model exported to output/inference/bottle
  python infer.py --model_dir output/inference/bottle --image folder/ --backend onnxruntime"""
SERVE_EXAMPLES = """examples:
  python serve.py --cls bottle                                 # http://127.0.0.1:8866/ serves output/inference/bottle
  python serve.py --model_dir output/inference/bottle --workers 2 --host 0.0.0.0 --port 8866"""


def parse_export_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog="export_model.py", description=EXPORT_DESCRIPTION, epilog=EXPORT_EXAMPLES)
    add = p.add_argument
    add("--output_dir", default="output", metavar="DIR", help="the training run's folder (default: output)")
    add("--cls", help="class to export (default: the training run's, when it trained one)")
    add("--checkpoint", metavar="PATH", help="a checkpoint (default: OUTPUT_DIR/CLS/model.pdparams)")
    add("--save_dir", metavar="DIR", help="where the export goes (default: OUTPUT_DIR/inference/CLS)")
    add("--teacher_weights", metavar="PATH", help="the teacher's weights (default: the checkpoint's)")
    add("--onnx", action="store_true", help="also write model.onnx with paddle2onnx (default: off)")
    add("--opset", type=int, default=13, metavar="N", help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default: 13)")
    add("--int8", action="store_true", help="also write model_int8.onnx, quantised by ONNX Runtime; "
                                            "needs --onnx and --calib_dir (default: off)")
    add("--calib_dir", metavar="DIR", help="good images to calibrate int8 on, e.g. train/good (default: none)")
    add("--calib_images", type=int, default=32, metavar="N", help="calibrate on at most N images (default: 32)")
    add("--check_dir", metavar="DIR", help="images (e.g. the class's test folder) on which every runtime and "
                                          "precision that runs here (int8 also rechecked in fp32) is judged "
                                          "against Paddle fp32, for --precision auto (default: the --calib_dir "
                                          "images when --int8)")
    add("--check_images", type=int, default=64, metavar="N", help="judge on at most N images (default: 64)")
    return p.parse_args(argv)


def parse_infer_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = PredictorOptions()
    p = OneLineArgumentParser(prog="infer.py", description=INFER_DESCRIPTION, epilog=INFER_EXAMPLES)
    add = p.add_argument
    add("--model_dir", default="", metavar="DIR",
        help=f"exported model (default: {DEFAULT_OUTPUT}/inference/CLS, CLS = --cls or {DEFAULT_CLASS})")
    add("--image", metavar="PATH", help="an image file, or a folder searched recursively (default: none)")
    add("--data_dir", metavar="DIR", help="MVTec-layout root: with --cls, all its test images (default: none)")
    add("--cls", help="class of --data_dir, and of the default --model_dir (default: none)")
    add("--output_dir", default="", metavar="DIR", help="pictures, masks/, scores.csv (default: MODEL_DIR/infer)")
    add("--backend", default=None, choices=BACKEND_NAMES, metavar="NAME",
        help=f"runtime: one of {', '.join(BACKEND_NAMES)} (default: {d.backend}; with --precision auto, "
             f"the one chosen)")
    add("--device", default=d.device, choices=DEVICE_NAMES, metavar="NAME",
        help=f"one of {', '.join(DEVICE_NAMES)} (default: {d.device})")
    add("--use_gpu", type=parse_bool, default=None, metavar="BOOL",
        help="TIPC's spelling of --device: True is gpu, False cpu (default: none)")
    add("--enable_mkldnn", type=parse_bool, nargs="?", const=True, default=d.enable_mkldnn, metavar="BOOL",
        help=f"oneDNN on CPU (default: {d.enable_mkldnn})")
    add("--cpu_threads", type=int, default=d.cpu_threads, metavar="N",
        help=f"CPU threads of the runtime (default: {d.cpu_threads}, every core)")
    add("--use_tensorrt", type=parse_bool, nargs="?", const=True, default=d.use_tensorrt, metavar="BOOL",
        help=f"TensorRT on GPU (default: {d.use_tensorrt})")
    add_precision_flags(add, d.precision, "export_model.py --check_dir")
    add("--batch_size", type=int, default=d.batch_size, metavar="N", help=f"images per run (default: {d.batch_size})")
    add("--benchmark", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
        help="print AutoLog-style timings and save benchmark.json (default: False)")
    add("--warmup", type=int, default=2, metavar="N", help="untimed runs before a benchmark (default: 2)")
    add("--threshold", type=float, default=None, metavar="X",
        help="raw-score threshold for verdicts and masks (default: the calibrated one in deploy.json)")
    add("--save_images", type=parse_bool, nargs="?", const=True, default=True, metavar="BOOL",
        help="write a picture per image (default: True)")
    args = p.parse_args(argv)
    args.backend_given = args.backend is not None
    args.backend = args.backend or d.backend
    args.auto_choice = None
    if args.use_gpu is not None:
        args.device = "gpu" if args.use_gpu else "cpu"
    args.model_given = bool(args.model_dir)
    args.model_dir = args.model_dir or RunPaths(DEFAULT_OUTPUT).export_dir(check_class_name(args.cls or DEFAULT_CLASS))
    args.output_dir = args.output_dir or default_infer_dir(args.model_dir)
    return args


def parse_serve_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog="serve.py", description=SERVE_DESCRIPTION, epilog=SERVE_EXAMPLES)
    add = p.add_argument
    s, o = ServiceOptions(), PredictorOptions()
    add("--model_dir", default="", metavar="DIR", help="exported model (default: output/inference/CLS)")
    add("--cls", default="bottle", help="class of the default --model_dir (default: bottle)")
    add("--backend", default=None, choices=BACKEND_NAMES, metavar="NAME",
        help=f"runtime: one of {', '.join(BACKEND_NAMES)} (default: {o.backend}; with --precision auto, the one "
             f"chosen)")
    add_precision_flags(add, o.precision, "as infer.py takes it")
    add("--enable_mkldnn", type=parse_bool, default=True, metavar="BOOL", help="oneDNN on CPU (default: True)")
    add("--workers", type=int, default=s.workers, metavar="N",
        help=f"predictors: processes for paddle, threads for the others; at most {MAX_WORKERS} "
             f"(default: {s.workers})")
    add("--cpu_threads", type=int, default=None, metavar="N",
        help="threads per predictor (default: the cores divided among the workers)")
    add("--queue", type=int, default=s.queue_size, metavar="N",
        help=f"requests that may wait for a worker; beyond them 503. /predict/batch takes at most "
             f"min({s.max_files}, QUEUE) images (default: {s.queue_size})")
    add("--timeout", type=float, default=s.timeout_s, metavar="S", help=f"answer within S seconds or 504 "
                                                                       f"(default: {s.timeout_s:g})")
    add("--max_upload_mb", type=float, default=s.max_upload_mb, metavar="MB",
        help=f"larger uploads get 413 (default: {s.max_upload_mb:g})")
    add("--max_pixels", type=int, default=s.max_pixels, metavar="N",
        help=f"images that decode to more pixels get 422 (default: {s.max_pixels})")
    add("--max_batch", type=int, default=s.max_batch, metavar="N",
        help=f"queued images one predictor run may take (default: {s.max_batch})")
    add("--max_wait_ms", type=float, default=s.max_wait_ms, metavar="MS",
        help=f"how long a worker waits to fill its batch (default: {s.max_wait_ms:g})")
    add("--upload_timeout", type=float, default=s.upload_timeout_s, metavar="S",
        help=f"a request's headers, and then its body, must arrive within S seconds: slower ones are "
             f"closed, or get 408 (default: {s.upload_timeout_s:g})")
    add("--max_open_uploads", type=int, default=s.max_open_uploads, metavar="N",
        help="requests with a body held at once (each up to --max_upload_mb); beyond them 503 "
             "(default: 0, twice QUEUE + WORKERS x MAX_BATCH)")
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    add("--port", type=int, default=8866, help="port; 0 picks a free one, named in the 'serving' line (default: 8866)")
    a = p.parse_args(argv)
    a.backend_given = a.backend is not None
    a.backend = a.backend or o.backend
    a.model_given = bool(a.model_dir)
    if not a.model_dir:
        a.model_dir = RunPaths("output").export_dir(check_class_name(a.cls))
    return a
