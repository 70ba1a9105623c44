"""Metrics against brute force, sklearn-free definitions and known cases."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage import measure

from core.metrics import aupro, pixel_auroc, sample_auroc


def brute_auroc(labels, scores):
    """P(score of a random positive > that of a random negative), ties count half."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (len(pos) * len(neg))


def brute_reference_pro(masks, amaps, num_th=200, max_fpr=0.3):
    """The reference's compute_pro procedure, loop by loop (skimage regions, 200 thresholds,
    FPR < 0.3 kept, FPR rescaled by its max, trapezoid)."""
    masks = masks.astype(int)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / num_th
    pros_curve, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary = amaps > th
        pros = []
        for b, m in zip(binary, masks):
            for region in measure.regionprops(measure.label(m)):
                pros.append(b[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
        inverse = 1 - masks
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
        pros_curve.append(np.mean(pros))
    fprs, pros_curve = np.array(fprs), np.array(pros_curve)
    keep = fprs < max_fpr
    fprs, pros_curve = fprs[keep] / fprs[keep].max(), pros_curve[keep]
    # sklearn.metrics.auc on an FPR that falls as thresholds rise: -trapezoid in that order
    # (the order inside runs of equal FPR matters, so do not sort).
    assert np.all(np.diff(fprs) <= 0)
    return -np.trapezoid(pros_curve, fprs)


def brute_exact_pro(masks, amaps, max_fpr=0.3):
    """Every distinct score as a threshold (positives: score >= t), curve cut at max_fpr."""
    masks = masks.astype(bool)
    regions = [(i, r.coords) for i, m in enumerate(masks)
               for r in measure.regionprops(measure.label(m.astype(int)))]
    neg = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(amaps)[::-1]:
        positive = amaps >= t
        fpr = (positive & neg).sum() / neg.sum()
        pro = np.mean([positive[i][c[:, 0], c[:, 1]].mean() for i, c in regions])
        points.append((fpr, pro))
    fpr, pro = map(np.array, zip(*points))
    k = np.searchsorted(fpr, max_fpr, side="right")
    if k < len(fpr):
        y = pro[k - 1] + (pro[k] - pro[k - 1]) * (max_fpr - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        fpr, pro = np.r_[fpr[:k], max_fpr], np.r_[pro[:k], y]
    return np.trapezoid(pro, fpr) / max_fpr


def realistic_case(seed, n=4, size=48):
    """Smooth maps that are higher, noisily, on blob-shaped defects; one image is good."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n - 1):
        for _ in range(rng.integers(1, 3)):
            cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(2, 6)
            yy, xx = np.mgrid[:size, :size]
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    maps = np.stack([gaussian_filter(rng.random((size, size)) + 1.2 * m * rng.random((size, size)), 1.5)
                     for m in masks])
    return masks, maps


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 2)  # rounding makes ties
    assert sample_auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores), abs=1e-12)
    masks = (rng.random((3, 10, 10)) > 0.8).astype(np.uint8)
    maps = np.round(rng.random((3, 10, 10)) + 0.5 * masks, 2)
    assert pixel_auroc(masks, maps) == pytest.approx(brute_auroc(masks, maps), abs=1e-12)


def test_auroc_known_cases():
    labels = np.array([0, 0, 1, 1, 0, 1])
    assert sample_auroc(labels, labels * 2.0 + 1) == 1.0
    assert sample_auroc(labels, 1.0 - labels) == 0.0
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 2:4, 2:5] = 1
    assert pixel_auroc(masks, masks.astype(float)) == 1.0
    assert pixel_auroc(masks, -masks.astype(float)) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_200_thresholds_reproduces_reference_procedure(seed):
    masks, maps = realistic_case(seed)
    # per image: each defective image alone, as the reference's evaluation loop calls it
    expected = np.mean([brute_reference_pro(m[None], a[None]) for m, a in zip(masks, maps) if m.any()])
    assert aupro(masks, maps, mode="per_image", num_thresholds=200) == pytest.approx(expected, abs=1e-12)
    assert aupro(masks, maps, mode="set", num_thresholds=200) == pytest.approx(
        brute_reference_pro(masks, maps), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_aupro_exact_matches_brute_force(seed):
    masks, maps = realistic_case(seed, n=3, size=24)
    maps = np.round(maps, 3)  # ties between pixels must be handled as one threshold
    expected = np.mean([brute_exact_pro(m[None], a[None]) for m, a in zip(masks, maps) if m.any()])
    assert aupro(masks, maps, mode="per_image") == pytest.approx(expected, abs=1e-12)
    assert aupro(masks, maps, mode="set") == pytest.approx(brute_exact_pro(masks, maps), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_exact_and_200_thresholds_agree_on_realistic_maps(seed):
    masks, maps = realistic_case(seed, n=6, size=64)
    for mode in ("per_image", "set"):
        exact = aupro(masks, maps, mode=mode)
        approx = aupro(masks, maps, mode=mode, num_thresholds=200)
        assert abs(exact - approx) < 0.005, (mode, exact, approx)


def test_aupro_known_cases():
    masks, maps = realistic_case(5)
    for mode in ("per_image", "set"):
        assert aupro(masks, masks.astype(float) * 0.9 + 0.05, mode=mode) == pytest.approx(1.0)
        assert aupro(masks, 1.0 - masks.astype(float), mode=mode) == pytest.approx(0.0)
        assert 0.0 <= aupro(masks, maps, mode=mode) <= 1.0


def test_regions_are_eight_connected():
    # Block A (4 px) and block B (6 px) touch only at a corner: one 8-connected region
    # (skimage.measure.label's default, as the reference), two 4-connected ones.
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 1:3, 1:3] = 1
    mask[0, 3:5, 3:6] = 1
    assert measure.label(mask[0]).max() == 1
    amap = np.zeros((1, 8, 8))
    amap[0, 1:3, 1:3] = 1.0  # A found first...
    amap[0, 3:5, 3:6] = 0.5  # ...B only after a false positive
    amap[0, 6, 6] = 0.75
    # One region: PRO 4/10 at FPR 0, then 4/10 at FPR 1/54, then 1 at FPR 1/54.
    # Two regions would give PRO (1 + 0)/2 = 0.5 on the first step instead of 0.4.
    fp = 1 / 54
    one_region = (0.4 * fp + 1.0 * (0.5 - fp)) / 0.5
    assert aupro(mask, amap, mode="set", max_fpr=0.5) == pytest.approx(one_region, abs=1e-12)
    assert aupro(mask, amap, mode="set", max_fpr=0.5) == pytest.approx(
        brute_exact_pro(mask, amap, max_fpr=0.5), abs=1e-12)


def test_aupro_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def test_pixel_auroc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(11)
    masks = rng.random((3, 20, 20)) < 0.2
    maps = np.round(rng.random((3, 20, 20)) + masks * 0.3, 1).astype(np.float32)  # many ties
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
