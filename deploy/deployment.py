"""deploy.json: the exported folder's description (format, arch, size, preprocessing,
thresholds, score statistics, a manifest of every file), written by the export and checked
by every predictor before any file is loaded."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataset import IMAGENET_MEAN, IMAGENET_STD
from core.decision import Calibration, CalibrationError
from core.results import check_score_stats
from model.arch import ARCH_NAMES
from utils.errors import UserError, bounded_line, shorten
from utils.files import NotARegularFile, check_regular, open_regular
from utils.names import check_class_name
from utils.io import is_whole_number
from utils.numbers import fits_float32, image_size_fits, is_finite_number, MAX_EPOCHS


# ---------------------------------------------------------------- the exported folder
# What export_model.py writes and infer.py reads. deploy.json carries a manifest of every
# file of the export (size and sha256), so a file that is missing, truncated or replaced
# since the export is named before anything loads it: Paddle Inference, given a folder
# without model.pdiparams, runs random weights and scores every image nan.

DEPLOY_FORMAT_PREFIX = "rd4ad-paddle-inference/"
# /2 added onnx_int8.score_bias: a reader of /1 would run /2's int8 without removing its bias
# (and with another judgement of it), so it must refuse /2 rather than misread it. Released /1
# exports have no bias; a /1 file that has one (written during that change) gets it applied,
# as its judgement was made with it.
DEPLOY_FORMAT = DEPLOY_FORMAT_PREFIX + "2"
READ_FORMATS = (DEPLOY_FORMAT_PREFIX + "1", DEPLOY_FORMAT)
MAX_SCORE_BIAS = 1.0  # int8's measured bias is thousandths of a score: a larger one is no rounding noise
OUTPUT_NAMES = ("anomaly_map", "score")  # in the graph's output order
MAX_DEPLOY_BYTES = 1 << 20      # a deploy.json is about 1 kB: never read a huge file whole
MAX_GRAPH_JSON_BYTES = 256 << 20  # model.json of wide_resnet50_2 is well under 1 MB
_HEX = frozenset("0123456789abcdef")


class ModelError(UserError):
    """An exported model folder that is missing, damaged, or disagrees with its deploy.json."""


@dataclass(frozen=True)
class Deployment:
    """deploy.json, checked: every field that inference uses."""
    path: str                         # the deploy.json that was read
    arch: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    calibration: Calibration | None   # None: exported before thresholds were calibrated
    score_stats: dict[str, float]     # {} when the checkpoint had none
    cls: str | None
    files: dict[str, dict] | None     # None: an older export without the manifest
    precision_checks: tuple[dict, ...] = ()  # deploy/precision.py's judgement, when the export made one
    int8_score_bias: dict[str, float] = field(default_factory=dict)  # per runtime: mean int8 - fp32 score
    model: str = "rd4ad"              # the method exported (exports before model/registry.py: RD4AD)

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path)

    def model_file(self, name: str, hint: str = "export the model again") -> str:
        """The path of `name` in the export, after checking it is the file that was
        exported (manifest: size and sha256; older exports: exists and is not empty)."""
        path = os.path.join(self.folder, name)
        record = None
        if self.files is not None:
            record = self.files.get(name)
            if record is None:
                raise ModelError(f"{path}: not part of this export (deploy.json lists "
                                 f"{', '.join(sorted(self.files)) or 'no files'}); {hint}")
        if not os.path.lexists(path):
            raise ModelError(f"{path}: not found; {hint}")
        try:
            check_regular(path)  # a FIFO would block the runtime's loader
        except (NotARegularFile, OSError) as err:
            raise ModelError(f"{path}: {getattr(err, 'reason', None) or err.strerror}; {hint}") from None
        size = os.path.getsize(path)
        if size == 0:
            raise ModelError(f"{path}: empty file; {hint}")
        if record is not None:
            if size < record["bytes"]:
                raise ModelError(f"{path}: truncated ({size} of {record['bytes']} bytes); {hint}")
            if size != record["bytes"] or file_record(path)["sha256"] != record["sha256"]:
                raise ModelError(f"{path}: changed since the export (size or sha256 differs from "
                                 f"deploy.json); {hint}")
        return path


def file_record(path: str) -> dict:
    """{"bytes": size, "sha256": hex} of a file, read in chunks (weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def file_manifest(folder: str, names: list[str]) -> dict[str, dict]:
    return {name: file_record(os.path.join(folder, name)) for name in names}


def read_json_file(path: str, limit: int, what: str) -> Any:
    """Parse a JSON file of at most `limit` bytes; ModelError naming it otherwise."""
    if not os.path.lexists(path):
        raise ModelError(f"{path}: not found: export a model first (python export_model.py)")
    try:
        with open_regular(path) as f:  # a FIFO or device: refused, never blocks
            raw = f.read(limit + 1)
    except NotARegularFile as err:
        raise ModelError(f"{path}: cannot read {what} ({err.reason})") from None
    except OSError as err:
        raise ModelError(f"{path}: cannot read {what} ({err.strerror})") from None
    if not raw:
        raise ModelError(f"{path}: empty file; export the model again")
    if len(raw) > limit:
        raise ModelError(f"{path}: {os.path.getsize(path)} bytes, too large to be {what}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad JSON, not UTF-8, nested too deep
        raise ModelError(f"{path}: not {what} (not valid JSON: {bounded_line(str(err), 120)}); "
                         f"export the model again") from None


def read_deployment(folder: str) -> Deployment:
    path = os.path.join(folder, "deploy.json")
    return check_deployment(read_json_file(path, MAX_DEPLOY_BYTES, "a deploy.json"), path)


def check_deployment(meta: Any, path: str) -> Deployment:
    """Every field of deploy.json that inference uses, with its type and range; a
    ModelError naming `path` and the field otherwise. export_model.py runs it on what it
    is about to write, so an export never writes a deploy.json that inference refuses."""
    def bad(key: str, need: str) -> ModelError:
        got = shorten(meta[key]) if key in meta else "missing"
        return ModelError(f"{path}: {key!r} must be {need} (got {got}); export the model again")

    if not isinstance(meta, dict):
        raise ModelError(f"{path}: not an RD4AD-Paddle export (a JSON object is expected, got "
                         f"{shorten(meta)})")
    if len(json.dumps(meta, default=str)) > MAX_DEPLOY_BYTES:  # what read_json_file would refuse
        raise ModelError(f"{path}: deploy.json would be larger than {MAX_DEPLOY_BYTES >> 20} MB")
    fmt = meta.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(DEPLOY_FORMAT_PREFIX):
        raise ModelError(f"{path}: not an RD4AD-Paddle export (format {shorten(fmt)})")
    if fmt not in READ_FORMATS:
        raise ModelError(f"{path}: export format {shorten(fmt)} is not one this version reads "
                         f"({', '.join(READ_FORMATS)})")
    if meta.get("arch") not in ARCH_NAMES:
        raise bad("arch", "one of " + ", ".join(ARCH_NAMES))
    size = meta.get("image_size")
    if not is_whole_number(size) or size < 64 or size % 32 or not image_size_fits(size):
        raise bad("image_size", "a whole number, a multiple of 32, at least 64, whose 3 x size x size fits int32")
    mean, std = meta.get("mean"), meta.get("std")
    if not _numbers(mean, 3) or not all(map(fits_float32, mean)):
        raise bad("mean", "a list of 3 numbers within float32's range")
    if not _numbers(std, 3) or min(std) <= 0 or not all(map(fits_float32, std)):  # 1e-300 is 0 in float32
        raise bad("std", "a list of 3 positive numbers within float32's range")
    if not normalisation_is_finite(mean, std):
        raise bad("mean", "with 'std', numbers that normalise every pixel to a finite float32 "
                          "((0 - mean) / std and (1 - mean) / std)")
    if meta.get("outputs") != list(OUTPUT_NAMES):
        raise bad("outputs", str(list(OUTPUT_NAMES)))
    calibration = None
    if meta.get("calibration") is not None:
        try:
            calibration = Calibration.from_dict(meta["calibration"])
        except CalibrationError as err:
            raise ModelError(f"{path}: calibration {err}; export the model again") from None
    stats = meta.get("score_stats")
    problem = check_score_stats(stats) if stats is not None else None
    if problem:
        raise ModelError(f"{path}: 'score_stats' must be null or the good images' score statistics ({problem}); "
                         f"export the model again")
    epoch = meta.get("epoch")
    if epoch is not None and not (is_whole_number(epoch) and 0 <= epoch <= MAX_EPOCHS):
        raise bad("epoch", f"null or a whole number from 0 to {MAX_EPOCHS}")
    if meta.get("class") is not None and not isinstance(meta["class"], str):
        raise bad("class", "null or a string")
    if meta.get("class") is not None:  # a name read from a file is never a path (utils/names.py)
        try:
            check_class_name(meta["class"], "'class'")
        except UserError as err:
            raise ModelError(f"{path}: {err}; export the model again") from None
    model = meta.get("model", "rd4ad")
    if not (isinstance(model, str) and 0 < len(model) <= 64 and model.isidentifier()):
        raise bad("model", "the name of the exported method")
    if meta.get("model_args") is not None and not (isinstance(meta["model_args"], dict) and len(meta["model_args"]) <= 32
                                                   and all(isinstance(k, str) for k in meta["model_args"])):
        raise bad("model_args", "null or a mapping of option names")
    return Deployment(path, meta["arch"], int(size), tuple(map(float, mean)), tuple(map(float, std)),
                      calibration, dict(stats or {}), meta.get("class"),
                      _check_manifest(meta.get("files"), path), _check_precision_checks(meta, path),
                      _check_int8_score_bias(meta, path), model)


PRECISION_CHECK_KEYS = ("backend", "precision", "images", "ms_per_image", "min_pearson", "swapped_pairs",
                        "verdict_changes", "recheck_band", "rechecked")
OLD_PRECISION_CHECK_KEYS = PRECISION_CHECK_KEYS[:7]  # exports before the rechecked int8 paths
MAX_RECHECK_BAND = 100.0  # scores lie in [0, 6]


def _check_precision_checks(meta: dict, path: str) -> tuple[dict, ...]:
    checks = meta.get("precision_checks")
    if checks is None:
        return ()

    def valid(c: Any) -> bool:
        if isinstance(c, dict) and set(c) == set(OLD_PRECISION_CHECK_KEYS):
            c = {**c, "recheck_band": None, "rechecked": None}
        if not (isinstance(c, dict) and set(c) == set(PRECISION_CHECK_KEYS)
                and isinstance(c["backend"], str) and isinstance(c["precision"], str)
                and is_whole_number(c["images"]) and 0 < c["images"] <= 1_000_000
                and _numbers([c["ms_per_image"], c["min_pearson"]], 2)):
            return False
        n = c["images"]
        return (0.001 <= c["ms_per_image"] <= 1e7 and -1 <= c["min_pearson"] <= 1
                and is_whole_number(c["swapped_pairs"]) and 0 <= c["swapped_pairs"] <= n * (n - 1) // 2
                and (c["verdict_changes"] is None
                     or is_whole_number(c["verdict_changes"]) and 0 <= c["verdict_changes"] <= n)
                and (c["recheck_band"] is None and c["rechecked"] is None
                     or c["precision"] == "int8" and _numbers([c["recheck_band"]], 1)
                     and 0 < c["recheck_band"] <= MAX_RECHECK_BAND and fits_float32(c["recheck_band"])
                     and is_whole_number(c["rechecked"]) and 0 <= c["rechecked"] <= n))
    if not isinstance(checks, list) or not all(valid(c) for c in checks):
        raise ModelError(f"{path}: 'precision_checks' must be a list of {{{', '.join(PRECISION_CHECK_KEYS)}}}, "
                         f"each within its range "
                         f"(got {shorten(checks)}); export the model again")
    return tuple({key: c.get(key) for key in PRECISION_CHECK_KEYS} for c in checks)  # in one order


def _check_int8_score_bias(meta: dict, path: str) -> dict[str, float]:
    """onnx_int8.score_bias: {runtime: the mean int8 - fp32 score on the calibration images},
    which that runtime's int8 predictor subtracts. Exports before it have none (no correction)."""
    int8 = meta.get("onnx_int8")
    bias = int8.get("score_bias") if isinstance(int8, dict) else None
    if bias is None:
        return {}
    if not (isinstance(bias, dict) and len(bias) <= 16 and all(
            isinstance(k, str) and len(k) <= 32 and _numbers([v], 1) and abs(v) <= MAX_SCORE_BIAS
            and fits_float32(v)  # subtracted from float32 scores
            for k, v in bias.items())):
        raise ModelError(f"{path}: 'onnx_int8' 'score_bias' must map runtime names to finite numbers within "
                         f"+-{MAX_SCORE_BIAS:g} (got {shorten(bias)}); export the model again")
    return {k: float(v) for k, v in bias.items()}


def _check_manifest(files: Any, path: str) -> dict[str, dict] | None:
    if files is None:
        return None
    ok = isinstance(files, dict) and all(
        isinstance(name, str) and name == os.path.basename(name) and name not in ("", ".", "..")
        and isinstance(r, dict) and is_whole_number(r.get("bytes")) and r["bytes"] > 0
        and isinstance(r.get("sha256"), str) and len(r["sha256"]) == 64 and set(r["sha256"]) <= _HEX
        for name, r in files.items())
    if not ok:
        raise ModelError(f"{path}: 'files' must map file names to {{bytes, sha256}} (got "
                         f"{shorten(files)}); export the model again")
    return files


def normalisation_is_finite(mean: list, std: list) -> bool:
    """dataset.normalize's (pixel - mean) / std, computed as it is (float32), is finite for
    the darkest and the brightest pixel, hence for every pixel (it is linear). A mean of
    3e38 passes as a float32 but makes every pixel -inf."""
    pixels = np.array([[0.0], [1.0]], dtype=np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        out = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return bool(np.isfinite(out).all())


def _numbers(values: Any, count: int) -> bool:
    """A list of `count` finite numbers (booleans are not numbers here)."""
    return (isinstance(values, list) and len(values) == count
            and all(is_finite_number(v) for v in values))


def paddle_graph_input_shape(model_json: str, input_name: str = "image") -> list | None:
    """The declared shape of the graph's input (e.g. [-1, 3, 256, 256]) from model.json
    (Paddle 3 PIR JSON: a "*.data" op whose attributes hold name and shape); None when the
    graph does not say. Paddle Inference's input handle reports no shape before a run, so
    the file is the only place to read it. ModelError when the file is not JSON."""
    graph = read_json_file(model_json, MAX_GRAPH_JSON_BYTES, "a Paddle graph (model.json)")
    stack = [graph]
    while stack:  # iterative: a graph is deeply nested
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if isinstance(node.get("#"), str) and node["#"].endswith(".data"):
                entries = node.get("A") if isinstance(node.get("A"), list) else []
                attrs = {a["N"]: a["AT"].get("D") for a in entries  # any other shape: not ours
                         if isinstance(a, dict) and isinstance(a.get("N"), str) and isinstance(a.get("AT"), dict)}
                if attrs.get("name") == input_name and isinstance(attrs.get("shape"), list):
                    return attrs["shape"]
            stack.extend(node.values())
    return None


def check_graph_size(shape: Any, deployment: Deployment, model_path: str) -> None:
    """The graph's input [N, 3, H, W] must be deploy.json's image size (when it says)."""
    if not isinstance(shape, list | tuple) or len(shape) != 4:
        return
    h, w = shape[2], shape[3]
    if is_whole_number(h) and is_whole_number(w) and h > 0 and w > 0 and (h, w) != (deployment.image_size,) * 2:
        raise ModelError(f"{deployment.path}: image_size {deployment.image_size} disagrees with "
                         f"the graph's input {h}x{w} ({model_path}); export the model again")


def check_outputs(maps: Any, scores: Any, count: int, size: int, model_path: str) -> None:
    """A graph's outputs must be [count, size, size] maps and [count] scores: anything else
    means the graph is not the one deploy.json describes."""
    shapes = (tuple(getattr(maps, "shape", ())), tuple(getattr(scores, "shape", ())))
    if shapes != ((count, size, size), (count,)):
        raise ModelError(f"{model_path}: the graph gave outputs of shapes {shapes[0]} and "
                         f"{shapes[1]} for {count} images of {size} px, not ({count}, {size}, "
                         f"{size}) and ({count},); export the model again")
def deploy_meta(state: dict, onnx: bool, int8_calibration: list | None, files: dict) -> dict:
    """deploy.json: what infer.py needs besides the graph, and the manifest of the files."""
    return {
        "format": DEPLOY_FORMAT,
        # the method and the arguments that rebuild it (engine/checkpoint.py's load_trained)
        "model": state.get("model", "rd4ad"),  # load_checkpoint fills both in for older checkpoints
        "model_args": state.get("model_args", {"arch": state["arch"], "image_size": state["image_size"]}),
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


