"""What an evaluation yields and how it is scored: Predictions (maps, scores, masks,
labels of a test set), the one registry of metrics (METRICS) that feeds the log lines,
metrics.json, results.md and the HTML report, and the good-image score statistics. Plain
arrays in, numbers out: engine/ produces these, report/ and deploy/ read them."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from utils.errors import UserError, bounded_line, shorten
from utils.io import is_whole_number
from utils.numbers import fits_float32, is_finite_number
from utils.log import number

from .decision import MAX_COUNT, MAX_THRESHOLD, Calibration, decision_metrics
from .metrics import aupro, pixel_auroc, sample_auroc


@dataclass
class Predictions:
    """Everything one pass over a test set yields, in preallocated arrays."""
    maps: np.ndarray    # [N, H, W] float32, smoothed anomaly maps
    scores: np.ndarray  # [N] float32, max of each map
    masks: np.ndarray   # [N, H, W] uint8 ground truth
    labels: np.ndarray  # [N] int64, 1 = defective, 0 = good, -1 = unlabelled
    mask_known: np.ndarray | None = None  # [N] bool; None: every labelled image's mask

    def known_masks(self) -> np.ndarray:
        labelled = self.labels >= 0
        return labelled if self.mask_known is None else labelled & self.mask_known


def metric_line(metrics: dict) -> str:
    """The metrics of a log line: name value, n/a where undefined."""
    return ", ".join(f"{k} {number(v)}" for k, v in metrics.items() if isinstance(v, float))


@dataclass
class MetricInputs:
    """What every metric of one class is computed from: the labelled images only."""
    labels: np.ndarray               # [M] 0/1
    scores: np.ndarray               # [M]
    masks: np.ndarray | None         # [M, H, W]; None when some labelled image's mask is unknown
    maps: np.ndarray | None
    calibration: Calibration | None
    names: list[str]                 # of the labelled images, for warnings
    warn: Callable[[str], None]
    _decisions: dict | None = None

    @property
    def both_pixels(self) -> bool:
        """Defect and defect-free pixels both present: pixel curves are defined."""
        return self.masks is not None and bool(self.masks.any()) and not bool(self.masks.all())

    @property
    def both_labels(self) -> bool:
        return 0 < self.labels.sum() < len(self.labels)

    def decision(self, key: str) -> float:
        """F1 / precision / recall at the calibrated thresholds (computed once for all)."""
        if self._decisions is None:
            self._decisions = decision_metrics(self.labels, self.scores, self.masks, self.maps,
                                               self.calibration)
        return self._decisions[key]


@dataclass(frozen=True)
class Metric:
    """One metric: its key (metrics.json, results.json), its column header (results.md,
    the console table, the HTML report; None: recorded in JSON only), its label in log
    lines and warnings, and how it is computed."""
    name: str
    header: str | None
    label: str
    compute: Callable[[MetricInputs], float]
    image_level: bool = False       # needs labels only (no masks)
    needs_calibration: bool = False


def _decision(key: str) -> Callable[[MetricInputs], float]:
    return lambda x: x.decision(key)


nan = math.nan
# The one list of metrics: to add one, add its formula (core/metrics.py) and a line here.
METRICS: tuple[Metric, ...] = (
    Metric("pixel_auroc", "Pixel AUROC", "pixel AUROC",
           lambda x: pixel_auroc(x.masks, x.maps) if x.both_pixels else nan),
    Metric("sample_auroc", "Sample AUROC", "sample AUROC",
           lambda x: sample_auroc(x.labels, x.scores) if x.both_labels else nan, image_level=True),
    Metric("aupro_per_image", "AUPRO (per image)", "AUPRO (per image)",
           lambda x: _aupro_per_image(x.masks, x.maps, x.labels, x.names, x.warn) if x.masks is not None else nan),
    Metric("aupro_set", "AUPRO (set)", "AUPRO (set)",
           lambda x: aupro(x.masks, x.maps, mode="set") if x.both_pixels else nan),
    Metric("image_f1", "Image F1", "image F1", _decision("image_f1"), image_level=True, needs_calibration=True),
    Metric("image_precision", "Precision", "image precision", _decision("image_precision"),
           image_level=True, needs_calibration=True),
    Metric("image_recall", "Recall", "image recall", _decision("image_recall"),
           image_level=True, needs_calibration=True),
    Metric("pixel_f1", "Pixel F1", "pixel F1", _decision("pixel_f1"), needs_calibration=True),
    # the F1-optimal thresholds on the test labels, beside the calibrated ones (JSON only)
    Metric("best_image_f1", None, "best image F1", _decision("best_image_f1"), needs_calibration=True),
    Metric("best_image_threshold", None, "best image threshold", _decision("best_image_threshold"),
           needs_calibration=True),
    Metric("best_pixel_f1", None, "best pixel F1", _decision("best_pixel_f1"), needs_calibration=True),
    Metric("best_pixel_threshold", None, "best pixel threshold", _decision("best_pixel_threshold"),
           needs_calibration=True),
)
TABLE_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if m.header)


def no_metrics() -> dict[str, float]:
    """The threshold-free table metrics, all n/a: a class with no test image, or failed."""
    return {m.name: nan for m in TABLE_METRICS if not m.needs_calibration}


def compute_metrics(pred: Predictions, calibration: Calibration | None = None,
                    names: Sequence[str] | None = None,
                    warn: Callable[[str], None] | None = None) -> dict[str, float]:
    """Every metric of METRICS that applies (those needing thresholds only with a
    calibration). Unlabelled images count in none.

    An image that cannot take part in a metric is left out of that metric only, with one
    warning through `warn` naming it (`names[i]`, else its index); a metric is nan only
    where nothing defines it (no defective image, no masks), also said in one warning.
    Scores or maps that are not finite raise MetricsError: no number comes from them."""
    warn = warn or _ignore
    name = _namer(names, len(pred.labels))
    labelled = pred.labels >= 0
    _check_finite(pred, labelled, name)
    masks, maps = _pixel_arrays(pred, labelled)
    inputs = MetricInputs(pred.labels[labelled], pred.scores[labelled], masks, maps, calibration,
                          [name(i) for i in np.flatnonzero(labelled)], warn)
    out = {m.name: m.compute(inputs) for m in METRICS if calibration is not None or not m.needs_calibration}
    unknown = int((labelled & ~pred.known_masks()).sum())
    _warn_undefined(out, inputs.labels, masks, unknown, warn)
    return out


class MetricsError(UserError):
    """Model output that is not finite: no metric is computed from it."""



def _ignore(message: str) -> None:
    pass


def _namer(names: Sequence[str] | None, count: int) -> Callable[[int], str]:
    if names is not None and len(names) != count:
        raise ValueError(f"{len(names)} names for {count} images")
    return (lambda i: str(names[i])) if names is not None else (lambda i: f"test image {i}")


def _check_finite(pred: Predictions, labelled: np.ndarray, name: Callable[[int], str]) -> None:
    """Raise MetricsError for a labelled image whose score or map is NaN or inf (a broken
    model): sklearn would raise a traceback and our sorts would give a number. Unlabelled
    images count in no metric; their rows say what is wrong with them."""
    axes = tuple(range(1, pred.maps.ndim))
    # max and min propagate NaN and show inf, without a copy of the maps (memory)
    finite = (np.isfinite(pred.scores) & np.isfinite(pred.maps.max(axis=axes))
              & np.isfinite(pred.maps.min(axis=axes)))
    bad = np.flatnonzero(labelled & ~finite)
    if bad.size:
        raise MetricsError(bounded_line(
            f"model output is not finite (NaN or inf) for {bad.size} image"
            f"{'' if bad.size == 1 else 's'} (first: {name(int(bad[0]))}); the model is broken: "
            f"retrain it"))


def _pixel_arrays(pred: Predictions, labelled: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Masks and maps of the labelled images, or (None, None) when some labelled image's
    mask is unknown: pixel metrics over part of the defects would be biased."""
    if not labelled.any() or not bool(np.all(pred.known_masks()[labelled])):
        return None, None
    if labelled.all():  # no copy in the common case
        return pred.masks, pred.maps
    return pred.masks[labelled], pred.maps[labelled]


def _aupro_per_image(masks: np.ndarray, maps: np.ndarray, labels: np.ndarray, names: list[str],
                     warn: Callable[[str], None]) -> float:
    """Per-image AUPRO over the images that define their own curve; a warning for each
    image left out that should have been in (a full mask, or a defect image's empty mask).
    Pixel AUROC, AUPRO (set) and pixel F1 keep them: the other images' pixels complete
    the curve."""
    has_defect = masks.reshape(len(masks), -1).any(axis=1)
    full = masks.reshape(len(masks), -1).all(axis=1)
    for k in np.flatnonzero(full | ((labels == 1) & ~has_defect)):  # in test-set order
        why = ("its mask covers the whole image (no defect-free pixel, so no FPR axis of its "
               "own)" if full[k] else "defect image with an empty mask (no defect pixel)")
        counted = "defect" if full[k] else "defect-free"
        warn(bounded_line(f"{names[k]}: {why}: left out of AUPRO (per image); the other pixel "
                          f"metrics count its pixels as {counted}"))
    if not (has_defect & ~full).any():
        return math.nan
    return aupro(masks, maps, mode="per_image")  # leaves out the same images (metrics.py)


def _warn_undefined(out: dict[str, float], labels: np.ndarray, masks: np.ndarray | None,
                    unknown: int, warn: Callable[[str], None]) -> None:
    """One warning per reason for the table's metrics that are nan."""
    reasons: dict[str, list[str]] = {}
    for metric in TABLE_METRICS:
        if metric.name in out and math.isnan(out[metric.name]):
            reasons.setdefault(_why_undefined(metric, labels, masks, unknown), []).append(metric.label)
    for reason, metric_labels in reasons.items():
        warn(f"{', '.join(metric_labels)}: n/a ({reason})")


def _why_undefined(metric: Metric, labels: np.ndarray, masks: np.ndarray | None, unknown: int) -> str:
    if labels.size == 0:
        return "no labelled test image"
    if metric.image_level:
        return "no good test image" if labels.all() else "no defective test image"
    if masks is None:
        return f"{unknown} labelled test image{'' if unknown == 1 else 's'} without a ground-truth mask"
    if not masks.any():
        return "no mask has a defect pixel"
    if masks.all():
        return "no defect-free pixel in the test set"
    return "no image has both defect and defect-free pixels"


SCORE_STAT_NAMES = ("count", "mean", "std", "min", "max", "q99", "map_min")


def check_score_stats(stats: Any) -> str | None:
    """What is wrong with a file's score statistics (good_score_statistics' dict), or None.
    Keys are its names (a bytes key crashed the export's JSON); values finite numbers
    within +-MAX_THRESHOLD that float32 holds without flushing to 0 (1e-300 is 0 there);
    count a whole number >= 1, std >= 0, min <= max."""
    if not isinstance(stats, dict):
        return "not a mapping"
    for key, value in stats.items():
        if not isinstance(key, str) or key not in SCORE_STAT_NAMES:
            return f"unknown key {shorten(key)} (known: {', '.join(SCORE_STAT_NAMES)})"
        if not (is_finite_number(value) and abs(value) <= MAX_THRESHOLD and fits_float32(value)):
            return f"{key} {shorten(value)} is not a finite number within +-{MAX_THRESHOLD:g} in float32"
    if "count" in stats and not (is_whole_number(stats["count"]) and 1 <= stats["count"] <= MAX_COUNT):
        return f"count {shorten(stats['count'])} is not a whole number >= 1"
    if stats.get("std", 0) < 0:
        return f"std {stats['std']:g} is negative"
    if "min" in stats and "max" in stats and stats["min"] > stats["max"]:
        return f"min {stats['min']:g} is above max {stats['max']:g}"
    return None


def good_score_statistics(pred: Predictions) -> dict[str, float]:
    """Statistics of defect-free images' scores and maps, for normalising scores and
    colouring heatmaps at deployment, where no test set is at hand."""
    scores = pred.scores.astype(np.float64)
    return {
        "count": len(scores),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "max": float(scores.max()),
        "q99": float(np.quantile(scores, 0.99)),
        "map_min": float(pred.maps.min()),
    }


@dataclass
class ClassEvaluation:
    """One class's test-set evaluation as a report draws it: engine/ produces it, the
    orchestrator (app/run.py) hands it to report/."""
    cls: str
    pred: Predictions
    samples: list                              # dataset.Sample of each row of pred
    read_image: Callable[[int], np.ndarray]    # image i as the model saw it, [H, W, 3] uint8
    metrics: dict[str, float]
    calibration: Calibration | None
    note: str                                  # why some metric is n/a, which epoch is shown...
    model: dict | None = None                  # what the results were computed with (engine/model_info.py)
