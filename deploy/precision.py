"""Runtimes and precisions, judged on the exported model itself: each path this machine can
run (ONNX Runtime and OpenVINO in fp32 and int8, OpenVINO and Paddle Inference in bf16) is
compared with Paddle Inference fp32 on check images at export time, and `infer.py
--precision auto` picks the fastest path that changed no verdict there.

Each int8 runtime's score bias (the mean int8 - fp32 score on the int8 calibration images)
is measured first and, where removing it holds on the check images (bias_note), recorded in
deploy.json; its int8 predictor subtracts it from maps and scores, and is judged so.

An int8 path may also be judged "rechecked": images whose int8 score lies within a band of
the image threshold are scored again in fp32 by the same runtime, so that only an int8 error
larger than the band can change a verdict. The band is RECHECK_SAFETY times the largest int8
score error on the int8 calibration images (good images, not the check images), and the
rechecked path is then judged on the check images like every other path.

Why at export: the judgement needs the trained weights and the calibrated threshold (on
random weights every map is nearly flat and any rounding swaps scores), and it is made once,
on images the user names (`export_model.py --check_dir`, by default the int8 calibration
images), not on every inference run.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .deployment import Deployment, ModelError
from .predictor import (PredictorOptions, Rechecked, UsageError, build_predictor, check_auto_band, onnx_model_file,
                        warm_up)

# Every path besides the baseline, fastest first as measured on CPUs (README, Performance);
# the order matters only between paths of equal measured speed.
JUDGED_PATHS = (("openvino", "int8"), ("onnxruntime", "int8"), ("openvino", "bf16"), ("paddle", "bf16"),
                ("openvino", "fp32"), ("onnxruntime", "fp32"))
BASELINE = ("paddle", "fp32")
MIN_PEARSON = 0.99  # a path whose maps correlate less with fp32 is not chosen, verdicts or not
RECHECK_SAFETY = 2.0  # the recheck band: twice the largest int8 score error on the calibration images


@dataclass(frozen=True)
class PrecisionCheck:
    """One path against fp32 on the check images (deploy.json "precision_checks")."""
    backend: str
    precision: str
    images: int
    ms_per_image: float          # mean at batch 1 on the export's machine (a rechecked path's cost is
                                 # int8 for most images and int8 + fp32 for a few: a median would hide it)
    min_pearson: float           # of the anomaly maps, image by image
    swapped_pairs: int           # image pairs the scores order differently from fp32
    verdict_changes: int | None  # at the calibrated threshold; None without one
    recheck_band: float | None = None  # int8 rechecked in fp32 within this score distance of the threshold
    rechecked: int | None = None       # check images that were scored again in fp32

    @property
    def name(self) -> str:
        band = f" + fp32 recheck within {self.recheck_band:.4g}" if self.recheck_band else ""
        return f"{self.backend} {self.precision}{band}"

    @property
    def keeps_verdicts(self) -> bool:
        return self.verdict_changes == 0 and self.min_pearson >= MIN_PEARSON

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def scores_one_by_one(predictor, images: np.ndarray) -> np.ndarray:
    """The predictor's score of each image, run at batch 1 as the judgement runs them."""
    return np.array([float(predictor(x[None])[1][0]) for x in images])


def score_errors(fast, baseline_scores: np.ndarray, images: np.ndarray) -> np.ndarray:
    """`fast`'s score minus the baseline's, image by image."""
    return scores_one_by_one(fast, images) - baseline_scores


def recheck_band(fast, baseline_scores: np.ndarray, images: np.ndarray) -> float:
    """RECHECK_SAFETY times the largest score error of `fast` against the baseline's scores
    of `images`."""
    return float(f"{RECHECK_SAFETY * np.abs(score_errors(fast, baseline_scores, images)).max():.6g}")


@dataclass(frozen=True)
class Judgement:
    checks: list[PrecisionCheck]  # the baseline first
    int8_score_bias: dict[str, float]  # per runtime, measured on the calibration images (deploy.json onnx_int8)
    notes: list[str] = field(default_factory=list)  # biases not removed (bias_note)


def judge_precisions(deployment: Deployment, images: np.ndarray, threads: int,
                     band_images: np.ndarray | None = None) -> Judgement:
    """Paddle fp32 (the baseline, first) and every other path that runs here, each on
    `images` ([N, 3, S, S] normalised), one image at a time as an inspection line sends
    them. Each path runs all images in a block (after one untimed lead-in run), in two
    rounds, the second in reverse order.

    With `band_images` (the int8 calibration images: good images), each int8 runtime's
    score bias is measured there first: quantisation noise lowers the cosine similarity of
    teacher and student features, which raises every map by about the same amount (a few
    thousandths on a trained wide_resnet50_2). Where removing it holds on the check images
    (bias_note), the int8 paths are judged with it removed, as build_predictor then runs
    them. With a threshold too, each int8 path is judged rechecked within a band of twice
    its largest remaining error on the calibration images."""
    predictors, own, biases, notes = {}, [], {}, []
    threshold = deployment.calibration.image_threshold if deployment.calibration is not None else None
    try:
        for backend, precision in (BASELINE,) + JUDGED_PATHS:
            options = PredictorOptions(backend=backend, precision=precision, cpu_threads=threads)
            try:
                predictors[(backend, precision)] = build_predictor(deployment, options)
            except (UsageError, ModelError):  # not installed, no bf16 CPU, no model.onnx or model_int8.onnx
                continue
        own = list(predictors.values())
        if band_images is not None:
            base_scores = scores_one_by_one(predictors[BASELINE], band_images)
            check_scores = None  # the baseline's on the check images, once an int8 path needs them
            for backend in dict.fromkeys(b for b, _ in JUDGED_PATHS):
                fast, exact = predictors.get((backend, "int8")), predictors.get((backend, "fp32"))
                if fast:
                    fast.remove_bias(0.0)  # measured on the raw outputs, whatever the deployment recorded
                    errors = score_errors(fast, base_scores, band_images)
                    bias = float(f"{errors.mean():.6g}")
                    if check_scores is None:
                        check_scores = scores_one_by_one(predictors[BASELINE], images)
                    raw = scores_one_by_one(fast, images)
                    note = bias_note(backend, bias, raw, check_scores, threshold, errors)
                    if note:
                        notes.append(note)
                    else:
                        biases[backend] = bias
                        fast.remove_bias(bias)
                if fast and exact and threshold is not None:
                    band = recheck_band(fast, base_scores, band_images)
                    if band > 0:
                        predictors[(backend, "int8", band)] = Rechecked(fast, exact, threshold, band)
        for predictor in predictors.values():
            warm_up(predictor, images[:1])  # the first run builds kernels
        runs = {path: ([], [], []) for path in predictors}
        order = list(predictors)
        for round_paths in (order, order[::-1]):
            for path in round_paths:
                predictor, (maps, scores, seconds) = predictors[path], runs[path]
                lead_in(predictor, images[-1:])
                for image in images:
                    start = time.perf_counter()
                    amap, score = predictor(image[None])
                    seconds.append(time.perf_counter() - start)
                    if len(scores) < len(images):  # the maps and scores of the first round
                        maps.append(amap[0])
                        scores.append(float(score[0]))
        for predictor in predictors.values():
            if isinstance(predictor, Rechecked):
                predictor.rechecked //= 2  # the images of one round
    finally:
        for predictor in own:  # a Rechecked shares its two predictors with the plain paths
            predictor.close()
    results = {path: (np.stack(maps), np.asarray(scores, np.float64), 1000 * statistics.fmean(seconds),
                      getattr(predictors[path], "band", None), getattr(predictors[path], "rechecked", None))
               for path, (maps, scores, seconds) in runs.items()}
    return Judgement([_compare(path, result, results[BASELINE], threshold) for path, result in results.items()],
                     biases, notes)


def bias_note(backend: str, bias: float, raw_scores: np.ndarray, baseline_scores: np.ndarray,
              threshold: float | None, calibration_errors: np.ndarray) -> str | None:
    """None when removing `bias` (the mean of `calibration_errors`, raw int8 - fp32 on good
    images) holds on the check images: no more verdicts changed than raw int8, when as many a
    mean score error no larger, and every remaining error within the recheck band it gives
    (at another --threshold, a rechecked path relies on that band). Otherwise the bias does
    not hold there, is not removed, and the note says why."""
    if not bias:
        return None

    def faithfulness(scores: np.ndarray) -> tuple[int, float]:
        changes = 0 if threshold is None else int(((scores > threshold) != (baseline_scores > threshold)).sum())
        return changes, float(np.mean(np.abs(scores - baseline_scores)))
    with_bias, without = faithfulness(raw_scores - bias), faithfulness(raw_scores)
    band = RECHECK_SAFETY * float(np.abs(np.asarray(calibration_errors) - bias).max())
    largest = float(np.abs(raw_scores - bias - baseline_scores).max())
    if with_bias > without:
        why = (f"verdicts changed {with_bias[0]} with it removed, {without[0]} without; mean score error "
               f"{with_bias[1]:.4g} and {without[1]:.4g}")
    elif largest > band:
        why = f"an error of {largest:.4g} with it removed, beyond the recheck band of {band:.4g} it gives"
    else:
        return None
    return f"{backend} int8: its bias on the calibration images ({bias:.4g}) did not hold on the check images " \
           f"({why}): int8 runs raw"


def lead_in(predictor, image: np.ndarray) -> None:
    """One untimed run before a path's block: the path before it may still hold the cores
    (ONNX Runtime's worker threads spin for a while after a run), which made the first image
    of the next block about 15% slower. A recheck it makes is not counted."""
    rechecked = getattr(predictor, "rechecked", None)
    predictor(image)
    if rechecked is not None:
        predictor.rechecked = rechecked


def _compare(path: tuple, result: tuple, baseline: tuple, threshold: float | None) -> PrecisionCheck:
    maps, scores, ms, band, rechecked = result
    base_maps, base_scores = baseline[:2]
    pearson = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.std() and b.std() else float(np.array_equal(a, b))
               for a, b in zip(maps, base_maps)]
    order = np.sign(scores[:, None] - scores[None]) != np.sign(base_scores[:, None] - base_scores[None])
    changes = None if threshold is None else int(((scores > threshold) != (base_scores > threshold)).sum())
    return PrecisionCheck(path[0], path[1], len(scores), round(ms, 2), round(min(pearson), 6),
                          int(np.triu(order, 1).sum()), changes, band, rechecked)


@dataclass(frozen=True)
class Choice:
    backend: str
    precision: str
    recheck_band: float | None  # int8 rechecked in fp32 within it, when set
    why: str


def choose_path(checks: list[PrecisionCheck], runs_here, backend: str | None = None,
                other_threshold: bool = False) -> Choice:
    """The fastest checked path (of `backend`, when given) that changed no verdict and that
    `runs_here(check)` accepts; fp32 when none did. With `other_threshold` (a threshold
    other than the one judged at) only fp32 and rechecked paths qualify: a plain low
    precision path kept the verdicts at the judged threshold only."""
    candidates = [c for c in checks if (backend is None or c.backend == backend) and runs_here(c)
                  and (not other_threshold or c.precision == "fp32" or c.recheck_band)]
    keeping = [c for c in candidates if (c.backend, c.precision) == BASELINE or c.keeps_verdicts]
    rejected = [c.name for c in candidates if c not in keeping]
    reason = "verdicts or maps changed" if any(c.verdict_changes is not None for c in checks) else \
        "no threshold to judge verdicts at"
    why_not = f"; rejected ({reason}): {', '.join(rejected)}" if rejected else ""
    if other_threshold:
        why_not += "; with --threshold only fp32 and rechecked paths (the judgement was at the calibrated one)"
    if not keeping:
        return Choice(backend or BASELINE[0], "fp32", None,
                      f"no checked path of {backend or 'any backend'} that runs here kept every verdict{why_not}")
    best = min(keeping, key=lambda c: c.ms_per_image)
    rechecked = f", {best.rechecked} of them rechecked" if best.recheck_band else ""
    return Choice(best.backend, best.precision, best.recheck_band, (
        f"the fastest of {len(keeping)} checked paths that kept every verdict of the export's {best.images} check "
        f"images ({best.ms_per_image:g} ms/image there{rechecked}){why_not}"))


def auto_options(deployment: Deployment, options: PredictorOptions,
                 backend_given: bool) -> tuple[PredictorOptions, str]:
    """--precision auto (infer.py, serve.py): `options` turned to the fastest path the export
    judged to keep every verdict and that runs on this machine (of `options.backend` when
    `backend_given`), with the judged recheck band, and the line that says which and why."""
    check_auto_band(options.recheck_band)
    if not deployment.precision_checks:
        raise UsageError(f"--precision auto: {deployment.path} holds no precision checks; export with "
                         f"--check_dir (or --int8), or give --precision")

    def runs_here(check: PrecisionCheck) -> bool:
        try:
            replace(options, backend=check.backend, precision=check.precision, recheck_band=0.0).check()
            if check.backend == "paddle":
                deployment.model_file("model.json")
            else:
                onnx_model_file(deployment, check.precision)
            return True
        except (UsageError, ModelError):
            return False
    calibrated = deployment.calibration.image_threshold if deployment.calibration is not None else None
    choice = choose_path(checks_from_json(list(deployment.precision_checks)), runs_here,
                         options.backend if backend_given else None,
                         other_threshold=options.recheck_threshold not in (None, calibrated))
    band = (choice.recheck_band or 0.0) if choice.precision == "int8" else 0.0
    chosen = replace(options, backend=choice.backend, precision=choice.precision, recheck_band=band)
    recheck = f" + fp32 recheck within {band:.4g}" if band else ""
    return chosen, f"--precision auto: {chosen.backend} {chosen.precision}{recheck}, {choice.why}"


def checks_from_json(records: list[dict]) -> list[PrecisionCheck]:
    return [PrecisionCheck(**record) for record in records]
