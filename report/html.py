"""Visual reports: OUTPUT_DIR/report/CLASS/index.html (ROC and PRO plots, the hardest
images, metrics and thresholds) and OUTPUT_DIR/report.html over all classes, with the
paper's numbers beside ours. Every file is written atomically; pure matplotlib Figure
objects (no pyplot state), so reports can be written from any thread or process.
"""
from __future__ import annotations

import datetime
import html
import os
from collections.abc import Callable

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from engine.decision import Calibration
from engine.evaluate import Predictions
from engine.metrics import pro_curve
from engine.paths import RunPaths
from utils.io import atomic_write, atomic_write_text
from utils.log import number, percent

from .per_image import ImageItem, caption, colour_range
from .pictures import side_by_side, stack_vertically
from .tables import HEADERS, TABLE_NAMES, TABLE_NOTE, mean_row

# Mean over the 15 MVTec AD classes (pixel AUROC / sample AUROC / AUPRO per image).
PUBLISHED = {
    "RD4AD paper (Deng & Li, CVPR 2022)": {"pixel_auroc": 0.978, "sample_auroc": 0.985,
                                           "aupro_per_image": 0.939},
    "earlier Paddle reproduction": {"pixel_auroc": 0.979, "sample_auroc": 0.989,
                                    "aupro_per_image": 0.944},
}
GRID_SIZE = 6  # images per grid
_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}.note{color:#a40}")


def _threshold(v: object) -> str:
    return number(v, 5)


def _save_figure(fig: Figure, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def _roc_plot(path: str, labels: np.ndarray, values: np.ndarray, title: str, auc: float) -> bool:
    labels = np.asarray(labels).ravel().astype(bool)
    if labels.all() or not labels.any():
        return False
    fpr, tpr, _ = roc_curve(labels, np.asarray(values).ravel(), drop_intermediate=True)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {percent(auc)}%")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    _save_figure(fig, path)
    return True


def _pro_plot(path: str, masks: np.ndarray, maps: np.ndarray, metrics: dict) -> bool:
    fpr, pro = pro_curve(masks, maps, max_fpr=0.3)
    if fpr.size == 0:
        return False
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(fpr, pro, lw=2, label=f"AUPRO set {percent(metrics.get('aupro_set'))}%, "
                                  f"per image {percent(metrics.get('aupro_per_image'))}%")
    ax.set(xlabel="false positive rate", ylabel="per-region overlap", title="PRO curve (FPR <= 0.3)",
           xlim=(0, 0.3), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, path)
    return True


def _grid(path: str, indices: list[int], pred: Predictions, samples: list,
          image_of: Callable[[int], np.ndarray], calibration: Calibration | None,
          vmin: float, vmax: float) -> bool:
    """Rows of [original | ground truth | heatmap | predicted mask], stacked."""
    if not indices:
        return False
    rows = []
    for i in indices:
        s = samples[i]
        item = ImageItem(s.image_path, "", s.defect, None if s.label < 0 else int(s.label), s.mask_path)
        rows.append(side_by_side(
            image_of(i), pred.masks[i] if s.has_mask else None, pred.maps[i], vmin, vmax,
            caption(item, pred.scores[i], calibration),
            calibration.masks(pred.maps[i]) if calibration is not None else None,
            truth="mask" if s.has_mask else ("good" if s.label == 0 else "none"),
            threshold=None if calibration is None else calibration.pixel_threshold))
    canvas = stack_vertically(rows)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return True


def _metrics_table(rows: dict[str, dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = ""
    for name, r in rows.items():
        cells = "".join(f"<td>{percent(r.get(n))}</td>" for n in TABLE_NAMES)
        body += f"<tr><td>{name}</td>{cells}</tr>\n"
    return f"<table><tr>{head}</tr>\n{body}</table>\n<p>{html.escape(TABLE_NOTE)}</p>"


def write_class_report(folder: str, cls: str, pred: Predictions, samples: list,
                       image_of: Callable[[int], np.ndarray], metrics: dict,
                       calibration: Calibration | None, note: str = "") -> str:
    """Write the class's report into `folder` (OUTPUT_DIR/report/CLASS) and return the path
    of its index.html. `image_of(i)` gives test image i as [H, W, 3] uint8 at the maps' size."""
    labelled = pred.labels >= 0
    known = pred.known_masks()
    figures = []
    if _roc_plot(os.path.join(folder, "roc_image.png"), pred.labels[labelled] == 1,
                 pred.scores[labelled], f"{cls}: image ROC", metrics.get("sample_auroc")):
        figures.append(("roc_image.png", "Image-level ROC"))
    if known[labelled].all() and known.any() and pred.masks[known].any():
        if _roc_plot(os.path.join(folder, "roc_pixel.png"), pred.masks[known], pred.maps[known],
                     f"{cls}: pixel ROC", metrics.get("pixel_auroc")):
            figures.append(("roc_pixel.png", "Pixel-level ROC"))
        if _pro_plot(os.path.join(folder, "pro.png"), pred.masks[known], pred.maps[known], metrics):
            figures.append(("pro.png", "PRO curve"))
    vmin, vmax = colour_range(calibration, {}, pred.maps)
    good = [int(i) for i in np.flatnonzero(pred.labels == 0)]
    bad = [int(i) for i in np.flatnonzero(pred.labels == 1)]
    good_top = sorted(good, key=lambda i: -pred.scores[i])[:GRID_SIZE]
    bad_low = sorted(bad, key=lambda i: pred.scores[i])[:GRID_SIZE]
    grids = []
    if _grid(os.path.join(folder, "good_highest.png"), good_top, pred, samples, image_of,
             calibration, vmin, vmax):
        grids.append(("good_highest.png", f"Highest-scoring good images (worst false alarms), top {len(good_top)}"))
    if _grid(os.path.join(folder, "defect_lowest.png"), bad_low, pred, samples, image_of,
             calibration, vmin, vmax):
        grids.append(("defect_lowest.png", f"Lowest-scoring defective images (hardest misses), bottom {len(bad_low)}"))

    parts = [f"<h1>RD4AD report: {html.escape(cls)}</h1>",
             (f"<p>{len(samples)} test images ({len(good)} good, {len(bad)} defective, "
              f"{int((~labelled).sum())} unlabelled). Values in percent.</p>"),
             _metrics_table({html.escape(cls): metrics})]
    if note:
        parts.append(f'<p class="note">Note: {html.escape(note)}</p>')
    if calibration is not None:
        parts.append(
            f"<p>Thresholds from {calibration.count} {calibration.source}-good image(s) at the "
            f"{100 * calibration.quantile:g}% quantile: image {calibration.image_threshold:.5f}, "
            f"pixel {calibration.pixel_threshold:.5f}. Normalised score 0.5 = threshold."
            + (f" F1-optimal on this test set (for comparison): image {percent(metrics.get('best_image_f1'))}% "
               f"at {_threshold(metrics.get('best_image_threshold'))}, pixel "
               f"{percent(metrics.get('best_pixel_f1'))}% at {_threshold(metrics.get('best_pixel_threshold'))}."
               if "best_image_threshold" in metrics else "") + "</p>")
    for name, title in figures:
        parts.append(f'<figure style="display:inline-block"><img src="{name}"><figcaption>{title}'
                     f"</figcaption></figure>")
    for name, title in grids:
        parts.append(f"<h2>{html.escape(title)}</h2><img src=\"{name}\">")
    index = os.path.join(folder, "index.html")
    atomic_write_text(index, _page(f"RD4AD {cls}", "\n".join(parts)))
    return index


def write_summary_report(output_dir: str, results: dict[str, dict], config: dict, unfinished: str = "") -> str:
    """report.html: every class's metrics and a link to its page, the mean, and the
    published means beside ours; `unfinished`: a line saying the training has not finished."""
    rows = {}
    for cls, r in results.items():
        page = os.path.join(os.path.relpath(RunPaths(output_dir).report_dir(cls), output_dir), "index.html")
        label = (f'<a href="{html.escape(page)}">{html.escape(cls)}</a>'
                 if os.path.isfile(os.path.join(output_dir, page)) else html.escape(cls))
        rows[label] = r
    rows["<b>mean (ours)</b>"] = mean_row(results)
    for name, r in PUBLISHED.items():
        rows[f"<i>{html.escape(name)}</i>"] = r
    settings = ", ".join(f"{k} {html.escape(str(config.get(k)))}"
                         for k in ("arch", "image_size", "epochs", "batch_size", "teacher_weights"))
    body = (f"<h1>RD4AD results</h1><p>{settings}. Written "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Values in percent; the published "
            f"rows are 15-class MVTec AD means (AUPRO per image), comparable only to a full "
            f"15-class run with ImageNet weights.</p>"
            + (f'<p class="unfinished"><b>{html.escape(unfinished)}</b></p>' if unfinished else "")
            + _metrics_table(rows))
    path = RunPaths(output_dir).file("report.html")
    atomic_write_text(path, _page("RD4AD results", body))
    return path


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")
