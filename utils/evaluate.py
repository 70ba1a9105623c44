"""Run a trained model over a test set and compute the metrics of one class."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import paddle
from paddle.io import DataLoader
from tqdm import tqdm

from .decision import Calibration, decision_metrics
from .errors import UserError, bounded_line
from .metrics import aupro, pixel_auroc, sample_auroc

METRIC_NAMES = ("pixel_auroc", "sample_auroc", "aupro_per_image", "aupro_set")
DECISION_NAMES = ("image_f1", "image_precision", "image_recall", "pixel_f1")


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


@paddle.no_grad()
def predict(net: paddle.nn.Layer, loader: DataLoader, num_samples: int, image_size: int,
            desc: str = "eval", progress: bool = True, runner=None) -> Predictions:
    """One pass over `loader`. `runner` (images -> (maps, scores) as numpy), e.g. a
    StaticGraphRunner, replaces the dynamic graph when given."""
    net.eval()
    maps = np.empty((num_samples, image_size, image_size), dtype=np.float32)
    masks = np.empty((num_samples, image_size, image_size), dtype=np.uint8)
    scores = np.empty(num_samples, dtype=np.float32)
    labels = np.empty(num_samples, dtype=np.int64)
    i = 0
    for images, gt, label in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                                  disable=not progress):
        if runner is None:
            batch_maps, batch_scores = net(images)  # eval mode: the model's own anomaly-map head
            batch_maps, batch_scores = batch_maps.numpy(), batch_scores.numpy()
        else:
            batch_maps, batch_scores = runner(images)
        n = batch_maps.shape[0]
        maps[i:i + n] = batch_maps
        scores[i:i + n] = batch_scores
        masks[i:i + n] = gt.numpy()[:, 0] > 0.5
        labels[i:i + n] = label.numpy()
        i += n
    assert i == num_samples, f"loader gave {i} samples, expected {num_samples}"
    return Predictions(maps, scores, masks, labels)


def compute_metrics(pred: Predictions, calibration: Calibration | None = None,
                    names: Sequence[str] | None = None,
                    warn: Callable[[str], None] | None = None) -> dict[str, float]:
    """The metrics of the results table. Unlabelled images count in none. With a
    calibration, also F1 / precision / recall at its thresholds.

    An image that cannot take part in a metric is left out of that metric only, with one
    warning through `warn` naming it (`names[i]`, else its index); a metric is nan only
    where nothing defines it (no defective image, no masks), also said in one warning.
    Scores or maps that are not finite raise MetricsError: no number comes from them."""
    warn = warn or _ignore
    name = _namer(names, len(pred.labels))
    labelled = pred.labels >= 0
    _check_finite(pred, labelled, name)
    where = np.flatnonzero(labelled)  # index in pred of each labelled image
    labels, scores = pred.labels[labelled], pred.scores[labelled]
    masks, maps = _pixel_arrays(pred, labelled)
    both_pixels = masks is not None and bool(masks.any()) and not bool(masks.all())
    nan = math.nan
    out = {
        "pixel_auroc": pixel_auroc(masks, maps) if both_pixels else nan,
        "sample_auroc": sample_auroc(labels, scores) if 0 < labels.sum() < len(labels) else nan,
        "aupro_per_image": (_aupro_per_image(masks, maps, labels, [name(i) for i in where], warn)
                            if masks is not None else nan),
        "aupro_set": aupro(masks, maps, mode="set") if both_pixels else nan,
    }
    if calibration is not None:  # pixel F1 needs defect pixels only (decision_metrics)
        out.update(decision_metrics(labels, scores, masks, maps, calibration))
    unknown = int((labelled & ~pred.known_masks()).sum())
    _warn_undefined(out, labels, masks, unknown, warn)
    return out


class MetricsError(UserError):
    """Model output that is not finite: no metric is computed from it."""


_LABELS = {"pixel_auroc": "pixel AUROC", "sample_auroc": "sample AUROC",
           "aupro_per_image": "AUPRO (per image)", "aupro_set": "AUPRO (set)",
           "image_f1": "image F1", "image_precision": "image precision",
           "image_recall": "image recall", "pixel_f1": "pixel F1"}
_IMAGE_METRICS = ("sample_auroc", "image_f1", "image_precision", "image_recall")


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
    for key, label in _LABELS.items():
        if key in out and math.isnan(out[key]):
            reasons.setdefault(_why_undefined(key, labels, masks, unknown), []).append(label)
    for reason, metric_labels in reasons.items():
        warn(f"{', '.join(metric_labels)}: n/a ({reason})")


def _why_undefined(key: str, labels: np.ndarray, masks: np.ndarray | None, unknown: int) -> str:
    if labels.size == 0:
        return "no labelled test image"
    if key in _IMAGE_METRICS:
        return "no good test image" if labels.all() else "no defective test image"
    if masks is None:
        return f"{unknown} labelled test image{'' if unknown == 1 else 's'} without a ground-truth mask"
    if not masks.any():
        return "no mask has a defect pixel"
    if masks.all():
        return "no defect-free pixel in the test set"
    return "no image has both defect and defect-free pixels"


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
