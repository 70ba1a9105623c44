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

from core.decision import Calibration
from core.results import Predictions
from core.metrics import pro_curve
from core.paths import RunPaths
from model.registry import DEFAULT_MODEL, model_title  # names only: no Paddle
from utils.io import atomic_write, atomic_write_text
from utils.log import finite_value, number, percent

from .per_image import ImageItem, caption, colour_range
from .pictures import DISPLAY_WIDTH, side_by_side, stack_vertically
from .tables import HEADERS, MODEL_HEADERS, TABLE_NAMES, TABLE_NOTE, mean_row, model_cells, model_line

# Published means over the 15 MVTec AD classes (pixel AUROC / sample AUROC / AUPRO per
# image), per method: the rows shown beside a run of that method.
PUBLISHED = {
    "rd4ad": {
        "RD4AD paper (Deng & Li, CVPR 2022)": {"pixel_auroc": 0.978, "sample_auroc": 0.985,
                                               "aupro_per_image": 0.939},
        "earlier Paddle reproduction": {"pixel_auroc": 0.979, "sample_auroc": 0.989,
                                        "aupro_per_image": 0.944},
    },
    "rdpp": {
        "RD++ paper (Tien et al., CVPR 2023; best test-set epoch)": {
            "pixel_auroc": 0.9825, "sample_auroc": 0.9944, "aupro_per_image": 0.9499},
    },
}
GRID_SIZE = 6  # images per grid
# The page is at most DISPLAY_WIDTH px wide: report/pictures.py sizes the pictures' text for it.
_CSS = (f"body{{font-family:sans-serif;margin:2em;max-width:{DISPLAY_WIDTH}px}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}.note{color:#a40}")


def _threshold(v: object) -> str:
    return number(v, 5)


def _save_figure(fig: Figure, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def _roc_plot(path: str, labels: np.ndarray, values: np.ndarray, title: str, auc: float,
              threshold: float | None = None) -> bool:
    """The ROC curve; with `threshold`, the point where "value > threshold" lies on it."""
    labels = np.asarray(labels).ravel().astype(bool)
    if labels.all() or not labels.any():
        return False
    values = np.asarray(values).ravel()
    fpr, tpr, _ = roc_curve(labels, values, drop_intermediate=True)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {percent(auc)}%")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    if threshold is not None:
        at_fpr, at_tpr = threshold_point(labels, values, threshold)
        ax.plot([at_fpr], [at_tpr], "o", c="red", ms=8, zorder=3,
                label=f"threshold {threshold:.4f}: FPR {at_fpr:.2f}, TPR {at_tpr:.2f}")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, path)
    return True


def threshold_point(labels: np.ndarray, values: np.ndarray, threshold: float) -> tuple[float, float]:
    """(false positive rate, true positive rate) of the decision "value > threshold"."""
    labels = np.asarray(labels).ravel().astype(bool)
    called = np.asarray(values).ravel() > threshold
    return float(called[~labels].mean()), float(called[labels].mean())


def _histogram(path: str, scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> bool:
    """Image scores of good, defective and unlabelled images on shared bins, the image
    threshold as a vertical line: where the verdicts fall, checkable by eye."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    if not finite.any():
        return False
    values = scores[finite]
    edges = np.histogram_bin_edges(np.r_[values, [] if threshold is None else [threshold]],
                                   bins=min(30, max(5, values.size)))
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.add_subplot()
    for label, name, colour in ((0, "good", "tab:green"), (1, "defective", "tab:red"), (-1, "unlabelled", "tab:grey")):
        group = scores[finite & (labels == label)]
        if group.size:
            ax.hist(group, bins=edges, alpha=0.6, color=colour, label=f"{name} ({group.size})")
    if threshold is not None:
        ax.axvline(threshold, c="black", ls="--", lw=1.5, label=f"threshold {threshold:.4f}")
    ax.set(xlabel="image score (left of the threshold: OK, right: DEFECT)" if threshold is not None
           else "image score", ylabel="images", title="Image scores")
    ax.legend(fontsize=8)
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


def _verdict_grids(pred: Predictions, calibration: Calibration | None) -> list[tuple[str, list[int], str]]:
    """(file, images, heading) of each grid. With thresholds: the good images called
    DEFECT (false alarms, highest first) and the defective ones called OK (misses, lowest
    first), only those; without, the highest good and lowest defective scores. Unlabelled
    images (own data): the highest scores."""
    scores = pred.scores
    good = [int(i) for i in np.flatnonzero(pred.labels == 0)]
    bad = [int(i) for i in np.flatnonzero(pred.labels == 1)]
    unlabelled = [int(i) for i in np.flatnonzero(pred.labels < 0)]
    grids = []
    if calibration is not None:
        threshold = calibration.image_threshold
        alarms = sorted((i for i in good if scores[i] > threshold), key=lambda i: -scores[i])
        misses = sorted((i for i in bad if not scores[i] > threshold), key=lambda i: scores[i])
        if good:
            grids.append(("good_highest.png", alarms[:GRID_SIZE],
                          f"False alarms: good images called DEFECT ({len(alarms)} of {len(good)}"
                          + (f"; the {GRID_SIZE} highest-scoring shown)" if len(alarms) > GRID_SIZE else ")")))
        if bad:
            grids.append(("defect_lowest.png", misses[:GRID_SIZE],
                          f"Hardest misses: defective images called OK ({len(misses)} of {len(bad)}"
                          + (f"; the {GRID_SIZE} lowest-scoring shown)" if len(misses) > GRID_SIZE else ")")))
    else:
        good_top = sorted(good, key=lambda i: -scores[i])[:GRID_SIZE]
        bad_low = sorted(bad, key=lambda i: scores[i])[:GRID_SIZE]
        if good:
            grids.append(("good_highest.png", good_top,
                          f"Highest-scoring good images, top {len(good_top)} (no thresholds: no verdicts)"))
        if bad:
            grids.append(("defect_lowest.png", bad_low,
                          f"Lowest-scoring defective images, bottom {len(bad_low)} (no thresholds: no verdicts)"))
    if unlabelled:
        top = sorted(unlabelled, key=lambda i: -scores[i])[:GRID_SIZE]
        grids.append(("unlabelled_highest.png", top,
                      f"Unlabelled images, highest scores first ({len(top)} of {len(unlabelled)})"))
    return grids


def _scores_table(pred: Predictions, samples: list, calibration: Calibration | None) -> str:
    """Every test image's score and verdict, highest score first (open when no image is
    labelled: then it is the page's main result)."""
    kinds = {0: "good", 1: "defective"}
    rows = []
    for i in sorted(range(len(samples)), key=lambda i: -float(pred.scores[i])):
        item = ImageItem(samples[i].image_path, "")
        score = float(pred.scores[i])
        normalised = verdict = ""
        if calibration is not None:
            normalised = f"{float(calibration.normalize_scores(score)):.2f}"
            verdict = calibration.verdict(score)
        rows.append(f"<tr><td>{html.escape(item.short_name)}</td><td>{kinds.get(int(pred.labels[i]), 'unlabelled')}"
                    f"</td><td>{score:.4f}</td><td>{normalised}</td><td>{verdict}</td></tr>")
    opened = " open" if (pred.labels < 0).all() else ""
    head = "<tr><th>image</th><th>label</th><th>score</th><th>normalised</th><th>verdict</th></tr>"
    return (f"<details{opened}><summary>Scores and verdicts of all {len(samples)} test images</summary>"
            f"<table>{head}\n" + "\n".join(rows) + "</table></details>")


def write_class_report(folder: str, cls: str, pred: Predictions, samples: list,
                       image_of: Callable[[int], np.ndarray], metrics: dict,
                       calibration: Calibration | None, note: str = "", model: dict | None = None) -> str:
    """Write the class's report into `folder` (OUTPUT_DIR/report/CLASS) and return the path
    of its index.html. `image_of(i)` gives test image i as [H, W, 3] uint8 at the maps' size;
    `model` (engine/model_info.py) says what the results were computed with."""
    labelled = pred.labels >= 0
    known = pred.known_masks()
    image_threshold = None if calibration is None else calibration.image_threshold
    figures = []
    if _histogram(os.path.join(folder, "scores.png"), pred.scores, pred.labels, image_threshold):
        figures.append(("scores.png", "Image scores and the threshold"))
    if _roc_plot(os.path.join(folder, "roc_image.png"), pred.labels[labelled] == 1,
                 pred.scores[labelled], f"{cls}: image ROC", metrics.get("sample_auroc"), image_threshold):
        figures.append(("roc_image.png", "Image-level ROC"))
    if known[labelled].all() and known.any() and pred.masks[known].any():
        if _roc_plot(os.path.join(folder, "roc_pixel.png"), pred.masks[known], pred.maps[known],
                     f"{cls}: pixel ROC", metrics.get("pixel_auroc"),
                     None if calibration is None else calibration.pixel_threshold):
            figures.append(("roc_pixel.png", "Pixel-level ROC"))
        if _pro_plot(os.path.join(folder, "pro.png"), pred.masks[known], pred.maps[known], metrics):
            figures.append(("pro.png", "PRO curve"))
    vmin, vmax = colour_range(calibration, {}, pred.maps)
    grids = []
    for name, indices, title in _verdict_grids(pred, calibration):
        path = os.path.join(folder, name)
        if _grid(path, indices, pred, samples, image_of, calibration, vmin, vmax):
            grids.append((name, title))
        else:
            if os.path.isfile(path):
                os.remove(path)  # an earlier run's grid must not stand for this one's
            grids.append((None, title))

    good, bad = int((pred.labels == 0).sum()), int((pred.labels == 1).sum())
    method = model_title(str((model or {}).get("model", DEFAULT_MODEL)))
    parts = [f"<h1>{html.escape(method)} report: {html.escape(cls)}</h1>"]
    if model:
        parts.append(f"<p><b>{html.escape(model_line(model))}</b></p>")
    parts.append(f"<p>{len(samples)} test images ({good} good, {bad} defective, "
                 f"{int((~labelled).sum())} unlabelled). Values in percent.</p>")
    if any(finite_value(metrics.get(m)) is not None for m in TABLE_NAMES):
        parts.append(_metrics_table({html.escape(cls): metrics}))
    else:  # a table of n/a says nothing: say why, and what there is instead
        parts.append("<p>No metrics: they need labelled test images (good/ and DEFECT/ subfolders of the "
                     "test folder) and, for pixel metrics, ground-truth masks. Below: each image's score"
                     + (" and verdict." if calibration is not None else ".") + "</p>")
    if note:
        parts.append(f'<p class="note">Note: {html.escape(note)}</p>')
    if calibration is not None:
        parts.append(
            f"<p>Thresholds from {calibration.count} {calibration.source}-good image(s) at the "
            f"{100 * calibration.quantile:g}% quantile: image {calibration.image_threshold:.5f}, "
            f"pixel {calibration.pixel_threshold:.5f}. An image scoring above the image threshold is "
            f"DEFECT, else OK. Normalised score 0.5 = threshold."
            + _best_thresholds(metrics) + "</p>")
    else:
        parts.append("<p>No calibrated thresholds in this checkpoint: scores only, no verdicts.</p>")
    for name, title in figures:
        parts.append(f'<figure style="display:inline-block"><img src="{name}"><figcaption>{title}'
                     f"</figcaption></figure>")
    for name, title in grids:
        parts.append(f"<h2>{html.escape(title)}</h2>" + (f'<img src="{name}">' if name else "<p>None.</p>"))
    parts.append(_scores_table(pred, samples, calibration))
    index = os.path.join(folder, "index.html")
    atomic_write_text(index, _page(f"{method} {cls}", "\n".join(parts)))
    return index


def _best_thresholds(metrics: dict) -> str:
    """The F1-optimal thresholds on the test labels, where the labels define them."""
    found = [f"{what} {percent(metrics.get(f'best_{what}_f1'))}% at {_threshold(metrics.get(f'best_{what}_threshold'))}"
             for what in ("image", "pixel") if finite_value(metrics.get(f"best_{what}_threshold")) is not None]
    return f" F1-optimal on this test set (for comparison): {', '.join(found)}." if found else ""


def _models_table(models: dict[str, dict | None]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in MODEL_HEADERS)
    body = ""
    for cls, model in models.items():
        cells = model_cells(model) if model else ("no checkpoint",) + ("",) * (len(MODEL_HEADERS) - 2)
        body += f"<tr><td>{html.escape(cls)}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>\n"
    return f"<h2>Models</h2><table><tr>{head}</tr>\n{body}</table>"


def write_summary_report(output_dir: str, results: dict[str, dict],
                         models: dict[str, dict | None] | None = None, unfinished: str = "") -> str:
    """report.html: every class's metrics and a link to its page, the mean, the published
    means beside ours, and per class the model its results come from (`models`:
    engine/model_info.py's descriptions, read from the checkpoints); `unfinished`: a line
    saying the training has not finished (engine/run.py's unfinished_line)."""
    models = models or {}
    rows = {}
    for cls, r in results.items():
        page = os.path.join(os.path.relpath(RunPaths(output_dir).report_dir(cls), output_dir), "index.html")
        label = (f'<a href="{html.escape(page)}">{html.escape(cls)}</a>'
                 if os.path.isfile(os.path.join(output_dir, page)) else html.escape(cls))
        rows[label] = r
    rows["<b>mean (ours)</b>"] = mean_row(results)
    names = sorted({str((models.get(cls) or {}).get("model", DEFAULT_MODEL)) for cls in results}) or [DEFAULT_MODEL]
    for name in names:
        for label, r in PUBLISHED.get(name, {}).items():
            rows[f"<i>{html.escape(label)}</i>"] = r
    title = " / ".join(model_title(name) for name in names) + " results"
    body = (f"<h1>{html.escape(title)}</h1><p>Written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. "
            f"Values in percent; the published rows are 15-class MVTec AD means (AUPRO per image), "
            f"comparable only to a full 15-class run with ImageNet weights.</p>"
            + (f'<p class="unfinished"><b>{html.escape(unfinished)}</b></p>' if unfinished else "")
            + _metrics_table(rows)
            + _models_table({cls: models.get(cls) for cls in results}))
    path = RunPaths(output_dir).file("report.html")
    atomic_write_text(path, _page(title, body))
    return path


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")
