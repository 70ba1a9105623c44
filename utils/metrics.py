"""Pixel AUROC, sample AUROC and AUPRO (area under the per-region overlap curve).

All take numpy arrays and return a Python float. AUPRO's exact mode sorts the pixels once
and reads the whole curve off cumulative sums; `num_thresholds=200` reproduces the
reference's `compute_pro` (hq-deng/RD4AD test.py) from the same sorted arrays.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # skimage.measure.label's default in 2-D


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over every pixel of the set: masks [N, H, W] (0/1), maps [N, H, W]."""
    masks, maps = _check_pair(masks, maps)
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def sample_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of image scores against image labels (1 = defective)."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    return float(roc_auc_score(labels, scores))


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, mode: str = "per_image",
          num_thresholds: int | None = None) -> float:
    """Normalised area under the PRO curve up to `max_fpr`.

    mode "per_image": mean over defective images of each image's own AUPRO (its regions,
    its thresholds, FPR over its own defect-free pixels): what the reference, and so the
    paper's table, computes. mode "set": one curve over the whole set (MVTec AD protocol).
    Regions are 8-connected components of the masks.

    num_thresholds None: exact, every distinct score is a threshold, the curve is cut at
    max_fpr by linear interpolation and the area divided by max_fpr.
    num_thresholds K: the reference's procedure: K equally spaced thresholds from min to
    max (np.arange), keep points with FPR < max_fpr, divide FPR by the largest kept, area
    by the trapezoid rule. Returns nan where that procedure divides 0 by 0.
    """
    masks, maps = _check_pair(masks, maps)
    if mode not in ("per_image", "set"):
        raise ValueError(f"mode must be 'per_image' or 'set', not {mode!r}")
    if mode == "set":
        return _aupro_of(masks, maps, max_fpr, num_thresholds)
    values = [_aupro_of(m[None], a[None], max_fpr, num_thresholds)
              for m, a in zip(masks, maps) if m.any()]
    return float(np.mean(values)) if values else float("nan")


def _check_pair(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.ndim != 3:
        raise ValueError(f"expected [N, H, W] arrays, got {masks.ndim} dimensions")
    return masks.astype(bool), maps


def _sorted_pixels(masks: np.ndarray, maps: np.ndarray, max_fpr: float):
    """Scores ascending, and per pixel its FPR weight and its PRO weight, same order.

    A defect-free pixel adds 1 / (defect-free pixels) to the FPR once the threshold falls
    below its score; a pixel of region r adds 1 / (|r| * regions) to the PRO (the mean of
    the regions' overlaps). Only the curve up to max_fpr matters, so only pixels scoring
    at least as high as the defect-free pixel that pushes the FPR past max_fpr are sorted
    (about max_fpr of the image): every pixel above a kept one is kept, so the sums from
    the top are exact, and thresholds below the cut all have FPR > max_fpr.
    """
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    num_regions = 0
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        region_ids[i] = np.where(labels > 0, labels + num_regions, 0)
        num_regions += count
    negatives = int((~masks).sum())
    if num_regions == 0 or negatives == 0:
        return None
    areas = np.bincount(region_ids.ravel(), minlength=num_regions + 1).astype(np.float64)
    pro_per_region = np.zeros(num_regions + 1)
    pro_per_region[1:] = 1.0 / (areas[1:] * num_regions)

    scores = maps.ravel()
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    ids = region_ids.ravel()
    value_range = (float(scores.min()), float(scores.max()))  # the 200-threshold grid's ends
    needed = int(np.floor(max_fpr * negatives)) + 1  # defect-free pixels to pass max_fpr
    if needed < negatives:
        negative_scores = scores[ids == 0]
        cut = np.partition(negative_scores, negatives - needed)[negatives - needed]
        keep = scores >= cut
        scores, ids = scores[keep], ids[keep]
    order = np.argsort(scores)  # ties need no order: the curve is read at run boundaries
    scores = scores[order].astype(np.float64)
    ids = ids[order]
    del order
    fpr_weight = (ids == 0) / float(negatives)
    pro_weight = pro_per_region[ids]
    return scores, fpr_weight, pro_weight, value_range


def _aupro_of(masks: np.ndarray, maps: np.ndarray, max_fpr: float,
              num_thresholds: int | None) -> float:
    sorted_pixels = _sorted_pixels(masks, maps, max_fpr)
    if sorted_pixels is None:
        return float("nan")
    scores, fpr_weight, pro_weight, value_range = sorted_pixels
    # Suffix sums: above[k] = sum of weights of pixels k.. (the k highest-ranked excluded).
    fpr_above = np.concatenate([np.cumsum(fpr_weight[::-1])[::-1], [0.0]])
    pro_above = np.concatenate([np.cumsum(pro_weight[::-1])[::-1], [0.0]])
    if num_thresholds is None:
        return _exact_area(scores, fpr_above, pro_above, max_fpr)
    return _thresholded_area(scores, fpr_above, pro_above, max_fpr, num_thresholds, value_range)


def pro_curve(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) of the whole set (MVTec AD's curve), exact, from FPR 0 up to max_fpr;
    aupro(mode="set") is its area divided by max_fpr. Empty arrays without defects."""
    masks, maps = _check_pair(masks, maps)
    sorted_pixels = _sorted_pixels(masks, maps, max_fpr)
    if sorted_pixels is None:
        return np.zeros(0), np.zeros(0)
    scores, fpr_weight, pro_weight, _ = sorted_pixels
    fpr_above = np.concatenate([np.cumsum(fpr_weight[::-1])[::-1], [0.0]])
    pro_above = np.concatenate([np.cumsum(pro_weight[::-1])[::-1], [0.0]])
    return _exact_curve(scores, fpr_above, pro_above, max_fpr)


def _exact_curve(scores, fpr_above, pro_above, max_fpr) -> tuple[np.ndarray, np.ndarray]:
    # Threshold at each distinct score s: positives are pixels >= s, i.e. from the first
    # index of s onwards. Walk thresholds downwards so FPR rises.
    first_of_run = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])[::-1]
    fpr = np.r_[0.0, fpr_above[first_of_run]]
    pro = np.r_[0.0, pro_above[first_of_run]]
    cut = int(np.searchsorted(fpr, max_fpr, side="right"))  # first point with fpr > max_fpr
    if cut < len(fpr):
        t = (max_fpr - fpr[cut - 1]) / (fpr[cut] - fpr[cut - 1])
        fpr = np.r_[fpr[:cut], max_fpr]
        pro = np.r_[pro[:cut], pro[cut - 1] + t * (pro[cut] - pro[cut - 1])]
    return fpr, pro


def _exact_area(scores, fpr_above, pro_above, max_fpr) -> float:
    fpr, pro = _exact_curve(scores, fpr_above, pro_above, max_fpr)
    return float(np.trapezoid(pro, fpr) / max_fpr)


def _thresholded_area(scores, fpr_above, pro_above, max_fpr, num_thresholds, value_range) -> float:
    low, high = value_range
    if high == low:
        return float("nan")
    thresholds = np.arange(low, high, (high - low) / num_thresholds)
    first_above = np.searchsorted(scores, thresholds, side="right")  # positives: > th
    fpr = fpr_above[first_above]
    pro = pro_above[first_above]
    keep = fpr < max_fpr
    fpr, pro = fpr[keep], pro[keep]
    if len(fpr) == 0 or fpr.max() == 0:
        return float("nan")
    fpr = fpr / fpr.max()
    return float(np.trapezoid(pro[::-1], fpr[::-1]))
