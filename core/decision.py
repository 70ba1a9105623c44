"""From anomaly maps to decisions: thresholds calibrated on good images, scores in [0, 1],
OK / DEFECT verdicts, predicted masks, and F1 / precision / recall at those thresholds.

Calibration uses validation-good images only (held out from training), never the test
set. The image threshold is a high quantile (default 99.5%) of their image scores: about
that share of good images is called OK. The pixel threshold is the same quantile of their
per-image map maxima, so on good images a predicted mask is empty exactly when the verdict
is OK. As the image score is the map's maximum, the two are equal when calibrated this
way; they are kept apart so either can be replaced (e.g. by the F1-optimal one reported
beside it when test labels exist).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from utils.errors import UserError, shorten
from utils.numbers import fits_float32, is_finite_number

MIN_SPREAD_IMAGES = 5
# An image score is a smoothed sum of three cosine distances, so it lies in [0, 6]. A
# threshold far outside that range is a mistake (and 1e308 overflows the colour scale).
MAX_THRESHOLD = 1e6
CALIBRATION_SOURCES = ("validation", "training")
MAX_COUNT = 2 ** 31 - 1  # images counted


class CalibrationError(UserError):
    """Thresholds that are missing, not numbers, or not finite: never used for a verdict."""


@dataclass
class Calibration:
    image_threshold: float
    pixel_threshold: float
    image_low: float      # normalises to 0: the lowest validation score (see calibrate)
    pixel_low: float      # normalises to 0: the lowest validation map value
    quantile: float
    count: int            # validation images used
    source: str           # "validation" or "training" (when no image could be held out)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        """From a checkpoint's or deploy.json's dict, every field checked (CalibrationError)."""
        if not isinstance(d, dict):
            raise CalibrationError(f"must be a mapping, got {shorten(d)}")
        unknown = [k for k in d if k not in cls.__dataclass_fields__]  # a bytes key crashed the export's JSON
        if unknown:
            raise CalibrationError(f"has unknown key {shorten(unknown[0])}")
        values = {}
        for key in cls.__dataclass_fields__:
            if key not in d:
                raise CalibrationError(f"lacks {key!r}")
            value = d[key]
            if key == "source":
                ok = isinstance(value, str) and value in CALIBRATION_SOURCES
            elif key == "count":
                ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_COUNT
            else:
                ok = (is_finite_number(value) and abs(value) <= MAX_THRESHOLD
                      and fits_float32(value))  # compared with float32 scores: 1e-320 is 0 there
                value = float(value) if ok else value
            if ok and key == "quantile":
                ok = 0.0 < value <= 1.0
            if not ok:
                raise CalibrationError(f"{key} is {shorten(value)}, not a valid value")
            values[key] = value
        # as calibrate() makes them: the lowest good value lies at or below its threshold
        # (normalize() and heatmap_range() map low -> 0 and threshold -> 0.5)
        for low, threshold in (("image_low", "image_threshold"), ("pixel_low", "pixel_threshold")):
            if values[low] > values[threshold]:
                raise CalibrationError(f"{low} {values[low]:g} is above {threshold} {values[threshold]:g}")
        return cls(**values)

    def with_threshold(self, threshold: float) -> "Calibration":
        """The same calibration with both thresholds replaced (--threshold)."""
        if not (math.isfinite(threshold) and abs(threshold) <= MAX_THRESHOLD and fits_float32(threshold)):
            raise CalibrationError(f"--threshold {threshold}: must be a finite number within "
                                   f"+-{MAX_THRESHOLD:g} (scores lie in [0, 6])")
        return Calibration(**{**self.to_dict(), "image_threshold": float(threshold),
                              "pixel_threshold": float(threshold)})

    def normalize_scores(self, scores: np.ndarray) -> np.ndarray:
        return normalize(scores, self.image_threshold, self.image_low)

    def verdicts(self, scores: np.ndarray) -> np.ndarray:
        """True = DEFECT."""
        return np.asarray(scores) > self.image_threshold

    def masks(self, maps: np.ndarray) -> np.ndarray:
        return np.asarray(maps) > self.pixel_threshold

    def verdict(self, score: float) -> str:
        """'DEFECT' or 'OK'; '' for a score that is not finite, which is never a verdict
        (the caller reports it as a failed image)."""
        if not math.isfinite(float(score)):
            return ""
        return "DEFECT" if score > self.image_threshold else "OK"

    def heatmap_range(self) -> tuple[float, float]:
        """One colour scale for every picture of a class: blue at the lowest validation
        value, red as far again above the pixel threshold, so a good image looks cool."""
        return self.pixel_low, 2 * self.pixel_threshold - self.pixel_low


def calibrate(scores: np.ndarray, maps: np.ndarray, quantile: float = 0.995,
              source: str = "validation") -> Calibration:
    """Thresholds from good images' scores [N] and maps [N, H, W]."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"threshold quantile {quantile} must lie in (0, 1]")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("calibration needs at least one good image")
    if not np.isfinite(scores).all() or not np.isfinite(maps).all():
        raise CalibrationError("calibration images gave scores or maps that are not finite "
                               "(NaN or inf): the model is broken; retrain it")
    per_image_max = np.asarray(maps, dtype=np.float32).reshape(len(scores), -1).max(axis=1)
    image_threshold = float(np.quantile(scores, quantile))
    pixel_threshold = float(np.quantile(per_image_max.astype(np.float64), quantile))
    image_low, pixel_low = float(scores.min()), float(np.asarray(maps).min())
    if scores.size < MIN_SPREAD_IMAGES:
        # Too few images to measure the spread of good scores (one image: none at all):
        # place 0 at least 10% of the threshold below it, so normalised scores stay graded.
        image_low = min(image_low, image_threshold - 0.1 * abs(image_threshold))
    return Calibration(image_threshold, pixel_threshold, image_low, pixel_low,
                       quantile=float(quantile), count=int(scores.size), source=source)


def normalize(values: np.ndarray, threshold: float, low: float) -> np.ndarray:
    """Piecewise-linear map to [0, 1]: low -> 0, threshold -> 0.5, threshold + (threshold
    - low) -> 1, clipped. Monotone, so rankings and AUROCs are unchanged."""
    span = max(threshold - low, 1e-6 * max(1.0, abs(threshold)))
    out = 0.5 + 0.5 * (np.asarray(values, dtype=np.float64) - threshold) / span  # float64: no overflow
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return precision, recall, f1


def best_f1(labels: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(F1, threshold) of the F1-optimal threshold "value > t" over all cut points.

    Sorts once and counts, so millions of pixels take about a second; the returned
    threshold is the midpoint between the two values it separates.
    """
    labels = np.asarray(labels).ravel().astype(bool)
    values = np.asarray(values).ravel()
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        return float("nan"), float("nan")
    order = np.argsort(-values, kind="stable")
    v, y = values[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[v[1:] != v[:-1], True]  # one cut after each run of equal values
    tp, fp, cut = tp[last], fp[last], np.flatnonzero(last)
    f1 = 2 * tp / (2 * tp + fp + (positives - tp))
    k = int(np.argmax(f1))
    below = v[cut[k] + 1] if cut[k] + 1 < v.size else v[cut[k]] - 1.0
    return float(f1[k]), float((v[cut[k]] + below) / 2)


def decision_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                     calibration: Calibration) -> dict[str, float]:
    """F1, precision and recall of images, and pixel F1, at the calibrated thresholds, plus
    the F1-optimal thresholds on these labels for comparison. Pass only labelled images
    (labels 0/1) and, for pixels, only images whose masks are known; nan where undefined."""
    nan = float("nan")
    out = dict.fromkeys(("image_f1", "image_precision", "image_recall", "pixel_f1",
                         "best_image_f1", "best_image_threshold",
                         "best_pixel_f1", "best_pixel_threshold"), nan)
    labels = np.asarray(labels).astype(bool)
    if labels.size and labels.any():
        called = calibration.verdicts(scores)
        p, r, f = _prf(int((called & labels).sum()), int((called & ~labels).sum()),
                       int((~called & labels).sum()))
        out.update(image_precision=p, image_recall=r, image_f1=f)
        if not labels.all():
            out["best_image_f1"], out["best_image_threshold"] = best_f1(labels, scores)
    if masks is not None and len(masks) and np.asarray(masks).any():
        truth = np.asarray(masks).astype(bool)
        called = calibration.masks(maps)
        out["pixel_f1"] = _prf(int((called & truth).sum()), int((called & ~truth).sum()),
                               int((~called & truth).sum()))[2]
        out["best_pixel_f1"], out["best_pixel_threshold"] = best_f1(truth, maps)
    return out
