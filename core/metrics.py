"""Pixel AUROC, sample AUROC and AUPRO (area under the per-region overlap curve).

All take numpy arrays and return a Python float. AUPRO's exact mode sorts the pixels once
and reads the whole curve off cumulative sums; `num_thresholds=200` reproduces the
reference's `compute_pro` (hq-deng/RD4AD test.py) from the same sorted arrays. Scores or
maps that are not finite (NaN, inf) raise ValueError: sorting would place them silently
and give a number (core/results.py names the images first).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # skimage.measure.label's default in 2-D


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over every pixel of the set: masks [N, H, W] (0/1), maps [N, H, W].

    The Mann-Whitney form, P(defect pixel > good pixel) + P(tie) / 2, equal to sklearn's
    roc_auc_score (tests/test_metrics.py) but with one sorted copy of the good pixels as
    the largest allocation, where roc_auc_score holds several float64 and index arrays
    of every pixel (about 6x the float32 maps).
    """
    masks, maps = _check_pair(masks, maps)
    negatives = maps[~masks]                # the only full-size copy, sorted in place
    negatives.sort()
    positives = maps[masks]
    if negatives.size == 0 or positives.size == 0:
        raise ValueError("pixel AUROC needs both defect and defect-free pixels")
    below = np.searchsorted(negatives, positives, side="left").astype(np.float64)
    at_or_below = np.searchsorted(negatives, positives, side="right").astype(np.float64)
    wins = below.sum() + 0.5 * (at_or_below - below).sum()
    return float(wins / (float(positives.size) * float(negatives.size)))


def sample_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of image scores against image labels (1 = defective)."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    if not np.isfinite(scores).all():
        raise ValueError("scores are not finite (NaN or inf)")
    return float(roc_auc_score(labels, scores))


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, mode: str = "per_image",
          num_thresholds: int | None = None) -> float:
    """Normalised area under the PRO curve up to `max_fpr`.

    mode "per_image": mean over defective images of each image's own AUPRO (its regions,
    its thresholds, FPR over its own defect-free pixels): what the reference, and so the
    paper's table, computes. An image defines its own curve only with both defect and
    defect-free pixels, so an empty mask or one covering the whole image is left out (nan
    only when no image is left). mode "set": one curve over the whole set (MVTec AD protocol).
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
              for m, a in zip(masks, maps) if defines_own_pro(m)]
    return float(np.mean(values)) if values else float("nan")


def defines_own_pro(mask: np.ndarray) -> bool:
    """An image's own PRO curve needs a region (a defect pixel) and an FPR axis (a
    defect-free pixel)."""
    return bool(mask.any()) and not bool(mask.all())


def _check_pair(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    # max and min propagate NaN and show inf without a copy of the maps (memory)
    if maps.size and not (np.isfinite(maps.max()) and np.isfinite(maps.min())):
        raise ValueError("maps are not finite (NaN or inf)")
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.ndim != 3:
        raise ValueError(f"expected [N, H, W] arrays, got {masks.ndim} dimensions")
    return masks.astype(bool), maps


def _regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=_EIGHT_CONNECTED)


def _sorted_pixels(masks: np.ndarray, maps: np.ndarray, max_fpr: float):
    """Scores descending, each pixel's region id (0 = defect-free), the PRO weight of each
    region id, the number of defect-free pixels, and the maps' value range.

    A defect-free pixel adds 1 / (defect-free pixels) to the FPR once the threshold falls
    below its score; a pixel of region r adds 1 / (|r| * regions) to the PRO (the mean of
    the regions' overlaps). Only the curve up to max_fpr matters, so only pixels scoring
    at least as high as the defect-free pixel that pushes the FPR past max_fpr are kept
    (about max_fpr of the set): every pixel above a kept one is kept, so the sums from
    the top are exact, and thresholds below the cut all have FPR > max_fpr. Regions are
    labelled image by image (twice, rather than holding a label array of the whole set),
    so the largest allocation is one copy of the defect-free scores.
    """
    areas = [np.zeros(1)]
    for mask in masks:
        labels, count = _regions(mask)
        if count:
            areas.append(np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(np.float64))
    num_regions = sum(len(a) for a in areas) - 1
    negatives = int(masks.size - np.count_nonzero(masks))
    if num_regions == 0 or negatives == 0:
        return None
    pro_per_region = np.concatenate(areas)
    pro_per_region[1:] = 1.0 / (pro_per_region[1:] * num_regions)
    value_range = (float(maps.min()), float(maps.max()))  # the 200-threshold grid's ends

    needed = int(np.floor(max_fpr * negatives)) + 1  # defect-free pixels to pass max_fpr
    cut = None
    if needed < negatives:
        negative_scores = maps[~masks]
        negative_scores.partition(negatives - needed)  # in place: no second copy
        cut = negative_scores[negatives - needed]
        del negative_scores
    kept_scores, kept_ids, offset = [], [], 0
    for mask, amap in zip(masks, maps):
        labels, count = _regions(mask)
        keep = slice(None) if cut is None else amap >= cut
        ids = labels[keep].astype(np.int32).ravel()
        ids[ids > 0] += offset
        offset += count
        kept_scores.append(amap[keep].ravel())
        kept_ids.append(ids)
    scores = np.concatenate(kept_scores)
    ids = np.concatenate(kept_ids)
    del kept_scores, kept_ids
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    order = np.argsort(scores)[::-1]  # highest first; ties need no order: the curve is
    scores, ids = scores[order], ids[order]  # read at run boundaries
    del order
    return scores, ids, pro_per_region, negatives, value_range


def _cumulative(ids: np.ndarray, pro_per_region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over pixels 0..k, highest-scoring first: defect-free pixels (int32) and PRO weight
    (float64), accumulated in place."""
    negatives_upto = np.cumsum(ids == 0, dtype=np.int32)  # < 2**31 kept pixels
    pro_upto = pro_per_region[ids]
    np.cumsum(pro_upto, out=pro_upto)
    return negatives_upto, pro_upto


def _aupro_of(masks: np.ndarray, maps: np.ndarray, max_fpr: float,
              num_thresholds: int | None) -> float:
    sorted_pixels = _sorted_pixels(masks, maps, max_fpr)
    if sorted_pixels is None:
        return float("nan")
    scores, ids, pro_per_region, negatives, value_range = sorted_pixels
    del sorted_pixels
    negatives_upto, pro_upto = _cumulative(ids, pro_per_region)
    del ids
    if num_thresholds is None:
        last_of_run = _last_of_runs(scores)
        del scores  # memory: the curve's arrays are as long as the kept pixels
        fpr, pro = _exact_curve(last_of_run, negatives_upto, negatives, pro_upto, max_fpr)
        del last_of_run, negatives_upto, pro_upto
        return _trapezoid(pro, fpr) / max_fpr
    return _thresholded_area(scores, negatives_upto, negatives, pro_upto, max_fpr,
                             num_thresholds, value_range)


def pro_curve(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) of the whole set (MVTec AD's curve), exact, from FPR 0 up to max_fpr;
    aupro(mode="set") is its area divided by max_fpr. Empty arrays without defects."""
    masks, maps = _check_pair(masks, maps)
    sorted_pixels = _sorted_pixels(masks, maps, max_fpr)
    if sorted_pixels is None:
        return np.zeros(0), np.zeros(0)
    scores, ids, pro_per_region, negatives, _ = sorted_pixels
    negatives_upto, pro_upto = _cumulative(ids, pro_per_region)
    return _exact_curve(_last_of_runs(scores), negatives_upto, negatives, pro_upto, max_fpr)


def _last_of_runs(scores: np.ndarray) -> np.ndarray:
    """Index of the last pixel of each run of equal scores (scores descending)."""
    return np.flatnonzero(np.r_[scores[1:] != scores[:-1], True]).astype(np.int32)


def _exact_curve(last_of_run, negatives_upto, negatives, pro_upto, max_fpr) -> tuple[np.ndarray, np.ndarray]:
    # Threshold at each distinct score s: positives are pixels >= s, i.e. up to the last
    # index of s. Thresholds fall along the array, so FPR rises.
    fpr = np.zeros(len(last_of_run) + 1)
    pro = np.zeros(len(last_of_run) + 1)
    step = 1 << 20  # in chunks: no temporary as long as the curve (memory)
    for a in range(0, len(last_of_run), step):
        index = last_of_run[a:a + step]
        fpr[1 + a:1 + a + len(index)] = negatives_upto[index] / float(negatives)
        pro[1 + a:1 + a + len(index)] = pro_upto[index]
    cut = int(np.searchsorted(fpr, max_fpr, side="right"))  # first point with fpr > max_fpr
    if cut < len(fpr):  # end the curve exactly at max_fpr (in place: no copies)
        t = (max_fpr - fpr[cut - 1]) / (fpr[cut] - fpr[cut - 1])
        pro[cut] = pro[cut - 1] + t * (pro[cut] - pro[cut - 1])
        fpr[cut] = max_fpr
        fpr, pro = fpr[:cut + 1], pro[:cut + 1]
    return fpr, pro


def _trapezoid(y: np.ndarray, x: np.ndarray, chunk: int = 1 << 20) -> float:
    """np.trapezoid(y, x) in chunks, so its temporaries stay small."""
    total = 0.0
    for a in range(0, len(x) - 1, chunk):
        b = min(a + chunk, len(x) - 1)
        total += float(np.dot(np.diff(x[a:b + 1]), y[a + 1:b + 1] + y[a:b])) / 2.0
    return total


def _thresholded_area(scores, negatives_upto, negatives, pro_upto, max_fpr, num_thresholds,
                      value_range) -> float:
    low, high = value_range
    if high == low:
        return float("nan")
    thresholds = np.arange(low, high, (high - low) / num_thresholds)
    # positives: scores > th, the first `count` pixels of the descending array
    count = len(scores) - np.searchsorted(scores[::-1], thresholds, side="right")
    at = np.maximum(count - 1, 0)
    fpr = np.where(count > 0, negatives_upto[at] / float(negatives), 0.0)
    pro = np.where(count > 0, pro_upto[at], 0.0)
    keep = fpr < max_fpr
    fpr, pro = fpr[keep], pro[keep]
    if len(fpr) == 0 or fpr.max() == 0:
        return float("nan")
    fpr = fpr / fpr.max()
    return float(np.trapezoid(pro[::-1], fpr[::-1]))
