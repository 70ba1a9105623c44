"""Metrics that cannot be computed: an image that cannot take part in a metric is left out
of that metric only, with a warning naming it; a metric is n/a only when nothing defines
it; model output that is not finite is a one-line error; JSON files stay strict."""
import json
import math

import numpy as np
import pytest

from utils.io import atomic_write_json
from core.decision import Calibration
from core.results import MetricsError, Predictions, compute_metrics
from core.metrics import aupro, pixel_auroc
from report.tables import mean_row, results_table

SIZE = 8
CAL = Calibration(image_threshold=0.5, pixel_threshold=0.5, image_low=0.0, pixel_low=0.0,
                  quantile=0.99, count=10, source="validation")


def class_of(extra_mask=None, extra_label=1, seed=0):
    """Three good images and two defect images with a square defect; the maps are noisy
    and higher on defects. `extra_mask` appends a sixth image (label `extra_label`)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((5, SIZE, SIZE), dtype=np.uint8)
    masks[3, 2:5, 2:5] = masks[4, 4:7, 1:4] = 1
    labels = [0, 0, 0, 1, 1]
    if extra_mask is not None:
        masks = np.concatenate([masks, extra_mask[None].astype(np.uint8)])
        labels.append(extra_label)
    maps = (rng.random(masks.shape) + 0.8 * masks).astype(np.float32)
    names = [f"bottle/{'good' if y == 0 else 'broken'}/{i:03d}.png" for i, y in enumerate(labels)]
    return Predictions(maps, maps.reshape(len(maps), -1).max(1), masks, np.array(labels, dtype=np.int64)), names


def without_last(pred):
    return Predictions(pred.maps[:-1], pred.scores[:-1], pred.masks[:-1], pred.labels[:-1])


def run(pred, names, calibration=CAL):
    warnings = []
    return compute_metrics(pred, calibration, names=names, warn=warnings.append), warnings


@pytest.mark.parametrize("case", ["full", "empty"])
def test_an_image_that_cannot_define_per_image_aupro_is_left_out_of_it_only(case):
    """A defect image whose mask covers the whole image has no defect-free pixel (no FPR
    axis); one whose mask is empty has no region. Each leaves per-image AUPRO with one
    warning naming it; every other metric keeps it and stays defined."""
    mask = np.ones((SIZE, SIZE)) if case == "full" else np.zeros((SIZE, SIZE))
    pred, names = class_of(mask)
    metrics, warnings = run(pred, names)
    base, base_warnings = run(without_last(pred), names[:-1])

    assert base_warnings == []
    assert all(math.isfinite(v) for v in metrics.values()), metrics  # nothing n/a
    assert metrics["aupro_per_image"] == pytest.approx(base["aupro_per_image"], abs=1e-12)
    # the other pixel metrics are defined over every pixel, this image's included
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(pred.masks, pred.maps))
    assert metrics["aupro_set"] == pytest.approx(aupro(pred.masks, pred.maps, mode="set"))
    assert metrics["pixel_auroc"] != pytest.approx(base["pixel_auroc"])
    assert len(warnings) == 1
    assert names[-1] in warnings[0] and "AUPRO (per image)" in warnings[0]
    assert ("whole image" if case == "full" else "empty mask") in warnings[0]


def test_a_good_image_with_an_empty_mask_gives_no_warning():
    pred, names = class_of(np.zeros((SIZE, SIZE)), extra_label=0)
    _, warnings = run(pred, names)
    assert warnings == []


def test_a_class_whose_defect_masks_all_cover_the_whole_image_has_no_per_image_aupro():
    """Nothing defines per-image AUPRO: nan, said once, besides one warning per image.
    The good images' pixels still define the other pixel metrics."""
    pred, names = class_of()
    pred.masks[3:] = 1
    metrics, warnings = run(pred, names)
    assert math.isnan(metrics["aupro_per_image"])
    assert all(math.isfinite(v) for k, v in metrics.items()
               if k not in ("aupro_per_image", "best_pixel_f1", "best_pixel_threshold"))
    assert [n for n in names[3:] if any(n in w for w in warnings)] == names[3:]
    na = [w for w in warnings if "n/a" in w]
    assert len(na) == 1 and "AUPRO (per image)" in na[0] and "pixel AUROC" not in na[0]


def test_a_class_whose_defect_masks_are_all_empty_has_no_pixel_metrics():
    pred, names = class_of()
    pred.masks[:] = 0
    metrics, warnings = run(pred, names)
    pixel = ("pixel_auroc", "aupro_per_image", "aupro_set", "pixel_f1")
    assert all(math.isnan(metrics[k]) for k in pixel)
    assert math.isfinite(metrics["sample_auroc"]) and math.isfinite(metrics["image_f1"])
    na = [w for w in warnings if "n/a" in w]
    assert len(na) == 1 and "no mask has a defect pixel" in na[0]
    assert all(label in na[0] for label in ("pixel AUROC", "AUPRO (per image)", "AUPRO (set)", "pixel F1"))
    assert sum(names[3] in w for w in warnings) == 1 and sum(names[4] in w for w in warnings) == 1


def test_no_defective_image_makes_every_defect_metric_na_in_one_warning():
    pred, names = class_of()
    good = Predictions(pred.maps[:3], pred.scores[:3], pred.masks[:3], pred.labels[:3])
    metrics, warnings = run(good, names[:3])
    assert all(math.isnan(metrics[k]) for k in ("sample_auroc", "image_f1", "pixel_auroc", "aupro_set"))
    assert len(warnings) == 2  # one per reason: no defective image; no defect pixel
    image = [w for w in warnings if "no defective test image" in w]
    assert len(image) == 1 and "sample AUROC" in image[0] and "image F1" in image[0]


def test_old_positional_call_still_works_and_is_silent():
    pred, _ = class_of(np.ones((SIZE, SIZE)))
    metrics = compute_metrics(pred, CAL)
    assert math.isfinite(metrics["aupro_per_image"]) and math.isfinite(metrics["image_f1"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_output_that_is_not_finite_is_one_line_naming_the_image(bad):
    pred, names = class_of()
    names[3] = "bottle/broken/a\nb.png"  # a newline in a name must not break the line
    pred.maps[3, 0, 0] = bad            # a map value: the score may still look finite
    pred.scores[4] = bad
    with pytest.raises(MetricsError) as err:
        run(pred, names)
    message = str(err.value)
    assert "\n" not in message
    assert "2 images" in message and "bottle/broken/a b.png" in message and "retrain" in message
    with pytest.raises(MetricsError, match="test image 3"):  # without names: the index
        compute_metrics(pred)


def test_output_that_is_not_finite_on_an_unlabelled_image_counts_in_no_metric():
    pred, names = class_of()
    pred.labels[0] = -1
    pred.scores[0] = np.nan
    metrics, _ = run(pred, names)
    assert math.isfinite(metrics["sample_auroc"])


def test_metric_functions_refuse_output_that_is_not_finite():
    pred, _ = class_of()
    pred.maps[0, 1, 1] = np.nan
    for metric in (pixel_auroc, lambda m, a: aupro(m, a, mode="set"), lambda m, a: aupro(m, a)):
        with pytest.raises(ValueError, match="not finite"):
            metric(pred.masks, pred.maps)


def strict_load(path):
    def refuse(constant):
        raise AssertionError(f"bare {constant} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_results_with_na_round_trip_through_strict_json(tmp_path):
    """A class with n/a metrics is written as null, read back, averaged and tabled."""
    pred, names = class_of()
    ok, _ = run(pred, names)
    pred.masks[:] = 0
    na, _ = run(pred, names)
    results = {"good_class": ok, "maskless": na}
    path = tmp_path / "results.json"
    atomic_write_json(str(path), {"classes": results, "mean": mean_row(results)})
    back = strict_load(path)
    assert back["classes"]["maskless"]["pixel_auroc"] is None
    assert back["mean"]["pixel_auroc"] == pytest.approx(ok["pixel_auroc"])  # n/a left out
    assert mean_row(back["classes"]) == pytest.approx(mean_row(results), nan_ok=True)
    assert back["mean"]["sample_auroc"] == pytest.approx((ok["sample_auroc"] + na["sample_auroc"]) / 2)
    all_na = mean_row({"a": {"pixel_auroc": None}, "b": {"pixel_auroc": float("nan")}})
    assert math.isnan(all_na["pixel_auroc"])


def test_results_table_shows_na():
    table = results_table({"a": {"pixel_auroc": None, "sample_auroc": 0.5},
                           "b": {"pixel_auroc": float("nan"), "sample_auroc": float("inf")}})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines()}
    assert rows["a"][:2] == ["n/a", "50.0"]
    assert rows["b"][:2] == ["n/a", "n/a"]
    assert rows["**mean**"][:2] == ["n/a", "50.0"]
    assert "nan" not in table.lower() and "inf" not in table.lower()


def test_summary_report_shows_na_for_null_metrics(tmp_path):
    from report.html import write_summary_report
    results = {"a": {"pixel_auroc": None, "sample_auroc": 0.5}, "b": {"pixel_auroc": float("nan")}}
    with open(write_summary_report(str(tmp_path), results, {}), encoding="utf-8") as f:
        page = f.read()
    assert "n/a" in page and "nan" not in page.lower().replace("name", "")
