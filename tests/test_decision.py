"""Thresholds, normalised scores and F1 at calibrated thresholds, on known cases."""
import numpy as np
import pytest
from sklearn.metrics import f1_score

from core.decision import MIN_SPREAD_IMAGES, Calibration, best_f1, calibrate, decision_metrics, normalize
from core.metrics import aupro, pro_curve


def test_calibration_is_a_quantile_of_good_scores():
    rng = np.random.default_rng(0)
    maps = rng.random((200, 8, 8)).astype(np.float32)
    scores = maps.reshape(200, -1).max(axis=1)
    cal = calibrate(scores, maps, quantile=0.99)
    assert cal.image_threshold == pytest.approx(np.quantile(scores.astype(np.float64), 0.99))
    assert np.mean(cal.verdicts(scores)) == pytest.approx(0.01, abs=0.006)  # ~1% false alarms
    # score = map max, so pixel threshold = image threshold: OK images get empty masks
    assert cal.pixel_threshold == pytest.approx(cal.image_threshold)
    ok = ~cal.verdicts(scores)
    assert not cal.masks(maps[ok]).any()
    assert cal.count == 200 and cal.source == "validation"


def test_normalised_scores_are_monotone_with_half_at_the_threshold():
    values = np.linspace(-1.0, 3.0, 101)
    out = normalize(values, threshold=1.0, low=0.0)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(np.diff(out) >= 0)
    assert normalize(np.array([0.0, 1.0, 2.0]), 1.0, 0.0).tolist() == [0.0, 0.5, 1.0]


def test_one_validation_image_still_gives_graded_scores():
    maps = np.full((1, 4, 4), 0.2, dtype=np.float32)
    maps[0, 0, 0] = 0.5
    cal = calibrate(np.array([0.5]), maps, 0.995)
    assert cal.image_threshold == 0.5 and cal.image_low == pytest.approx(0.45)
    assert 0.0 < cal.normalize_scores(np.array([0.47]))[0] < 0.5
    assert MIN_SPREAD_IMAGES > 1


def test_best_f1_equals_brute_force():
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.3
    values = np.round(rng.random(300) + labels * 0.4, 2)  # ties on purpose
    f1, threshold = best_f1(labels, values)
    brute = max(f1_score(labels, values > t) for t in np.unique(values) - 1e-9)
    assert f1 == pytest.approx(brute)
    assert f1_score(labels, values > threshold) == pytest.approx(f1)


def test_decision_metrics_on_a_known_case():
    cal = Calibration(image_threshold=0.5, pixel_threshold=0.5, image_low=0.0, pixel_low=0.0,
                      quantile=0.99, count=10, source="validation")
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.2, 0.6, 0.7, 0.9, 0.4])  # 1 false alarm, 2 hits, 1 miss
    masks = np.zeros((5, 2, 2), dtype=np.uint8)
    masks[2:, 0, 0] = 1
    maps = np.zeros((5, 2, 2), dtype=np.float32)
    maps[2, 0, 0] = maps[3, 0, 0] = 0.9   # 2 defect pixels found
    maps[1, 1, 1] = 0.8                  # 1 false pixel; image 4's defect pixel missed
    m = decision_metrics(labels, scores, masks, maps, cal)
    assert m["image_precision"] == pytest.approx(2 / 3) and m["image_recall"] == pytest.approx(2 / 3)
    assert m["image_f1"] == pytest.approx(2 / 3)
    assert m["pixel_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["best_image_f1"] == pytest.approx(f1_score(labels, scores > m["best_image_threshold"]))


def test_pro_curve_area_is_aupro_set():
    rng = np.random.default_rng(2)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[0, 4:10, 4:12] = masks[2, 20:30, 5:9] = True
    maps = rng.random((4, 32, 32)) + masks * 0.6
    fpr, pro = pro_curve(masks, maps)
    assert fpr[0] == 0.0 and fpr[-1] == pytest.approx(0.3) and np.all(np.diff(fpr) >= 0)
    assert np.trapezoid(pro, fpr) / 0.3 == pytest.approx(aupro(masks, maps, mode="set"))
