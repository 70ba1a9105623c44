"""Run a trained model over a test set and compute the metrics of one class."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import paddle
from paddle.io import DataLoader
from tqdm import tqdm

from .anomaly import anomaly_map, image_scores
from .decision import Calibration, decision_metrics
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
            teacher_feats, student_feats = net(images)
            batch_maps = anomaly_map(teacher_feats, student_feats, image_size)
            batch_maps, batch_scores = batch_maps.numpy(), image_scores(batch_maps).numpy()
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


def compute_metrics(pred: Predictions, calibration: Calibration | None = None) -> dict[str, float]:
    """The metrics of the results table; nan where the test set cannot define one (no
    defective images, or defect masks unknown). Unlabelled images count in none.
    With a calibration, also F1 / precision / recall at its thresholds."""
    labelled = pred.labels >= 0
    labels, scores = pred.labels[labelled], pred.scores[labelled]
    has_both_labels = 0 < labels.sum() < len(labels)
    # Pixel metrics need every labelled defect's mask, else they would be biased.
    pixel_ok = bool(np.all(pred.known_masks()[labelled]))
    masks = maps = None
    if pixel_ok and labelled.any():
        if labelled.all():  # no copy in the common case
            masks, maps = pred.masks, pred.maps
        else:
            masks, maps = pred.masks[labelled], pred.maps[labelled]
    has_defect_pixels = masks is not None and bool(masks.any()) and not bool(masks.all())
    nan = math.nan
    out = {
        "pixel_auroc": pixel_auroc(masks, maps) if has_defect_pixels else nan,
        "sample_auroc": sample_auroc(labels, scores) if has_both_labels else nan,
        "aupro_per_image": aupro(masks, maps, mode="per_image") if has_defect_pixels else nan,
        "aupro_set": aupro(masks, maps, mode="set") if has_defect_pixels else nan,
    }
    if calibration is not None:
        out.update(decision_metrics(labels, scores, masks if has_defect_pixels else None,
                                    maps, calibration))
    return out


def good_score_statistics(pred: Predictions) -> dict[str, float]:
    """Statistics of defect-free images' scores and maps, for normalising scores and
    colouring heatmaps at deployment, where no test set is at hand."""
    scores = pred.scores.astype(np.float64)
    return {
        "count": int(len(scores)),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "max": float(scores.max()),
        "q99": float(np.quantile(scores, 0.99)),
        "map_min": float(pred.maps.min()),
    }
