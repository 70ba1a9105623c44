"""The files of scored images, written one way for `main.py --mode infer` and `infer.py`:

    FOLDER/NAME.png        the picture: image | ground truth | anomaly map (colour scale) |
                           predicted mask, captioned folder/name, score, normalised score, verdict
    FOLDER/masks/NAME.png  the predicted defect mask (255 = defect) at the pixel threshold
    FOLDER/scores.csv      one row per image, in input order, failures included (their error)

An image whose score or map is not finite gets no verdict, mask or picture: its row says
why. A new run first removes the pictures and masks the folder's previous scores.csv
listed, so a folder never mixes earlier pictures with a new scores.csv.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.decision import Calibration
from utils.io import atomic_write, atomic_write_text
from utils.names import is_within

from .pictures import binary_mask_image, side_by_side

# No z-score column: it was empty whenever thresholds came from fewer than two good images
# (the bundled sample's one), and the normalised score already places a score among the
# good images' (0.5 = the threshold).
CSV_FIELDS = ("image", "defect", "label", "output", "score", "normalized_score", "verdict", "error")
MAX_PREVIOUS_CSV_BYTES = 64 << 20


@dataclass(frozen=True)
class ImageItem:
    """One input image: where it is, what it is called in the outputs, what is known of it."""
    path: str                  # as written in scores.csv
    name: str                  # output base name (utils/names.output_names: unique, safe)
    defect: str = ""           # its folder: good, a defect type, or '' when unknown
    label: int | None = None   # 1 defective, 0 good, None unknown
    mask_path: str | None = None

    @property
    def short_name(self) -> str:
        """folder/file, as captions show it."""
        folder = os.path.basename(os.path.dirname(self.path))
        return f"{folder}/{os.path.basename(self.path)}" if folder else os.path.basename(self.path)


def colour_range(calibration: Calibration | None, score_stats: dict, maps: np.ndarray) -> tuple[float, float]:
    """One colour scale for every picture of a model: blue at the lowest value seen on good
    images, red as far again above the threshold. Without thresholds: from the good
    images' statistics, else the finite range of `maps`."""
    if calibration is not None:
        return calibration.heatmap_range()
    if score_stats.get("map_min") is not None and score_stats.get("max") is not None:
        return score_stats["map_min"], 2 * score_stats["max"] - score_stats["map_min"]
    finite = np.asarray(maps)[np.isfinite(maps)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def caption(item: ImageItem, score: float, calibration: Calibration | None) -> str:
    """Two lines, printable characters only: folder/name; then the raw score against the
    image threshold it was compared with, the verdict, and the same in normalised units
    (where the threshold is 0.5), e.g. "score 0.2994 > threshold 0.2500: DEFECT
    (normalised 0.56 > 0.50)"."""
    name = "".join(c if c.isprintable() else "?" for c in item.short_name)
    score = float(score)
    if calibration is None:
        return f"{name}\nscore {score:.4f} (no threshold: no verdict)"
    threshold = calibration.image_threshold
    verdict = calibration.verdict(score)
    relation = ">" if verdict == "DEFECT" else "<="
    shown_score, shown_threshold = _distinct(score, threshold)
    shown_normalised, half = _distinct(float(calibration.normalize_scores(score)), 0.5, 2)
    return (f"{name}\nscore {shown_score} {relation} threshold {shown_threshold}: {verdict} "
            f"(normalised {shown_normalised} {relation} {half})")


def _distinct(a: float, b: float, digits: int = 4) -> tuple[str, str]:
    """a and b with `digits` decimals, more where that would print two different numbers
    alike (a score just above its threshold must not read "0.2994 > threshold 0.2994")."""
    for digits in range(digits, 10):
        x, y = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if x != y or a == b:
            return x, y
    return f"{a!r}", f"{b!r}"
@dataclass
class ScoredImage:
    """One image's scores.csv row, and its predicted mask and picture (PIL images) when
    made; `row["error"]` says why there are none."""
    row: dict
    mask: Image.Image | None = None
    picture: Image.Image | None = None


def empty_row(item: ImageItem) -> dict:
    return {"image": item.path, "defect": item.defect, "label": "" if item.label is None else item.label,
            "output": "", "score": "", "normalized_score": "", "verdict": "", "error": ""}


def score_image(item: ImageItem, rgb: np.ndarray, amap: np.ndarray, score: float, calibration: Calibration | None,
                colour: tuple[float, float], truth: np.ndarray | None = None,
                picture: bool = True) -> ScoredImage:
    """What one scored image becomes, in memory: the row (score, normalised score
    and verdict at the calibrated threshold), the predicted mask and the picture. Used by
    ImageWriter (files) and the service (JSON), so both decide alike."""
    score = float(score)
    row = empty_row(item)
    bad = int(np.size(amap) - np.isfinite(amap).sum())
    if not math.isfinite(score) or bad:  # never a verdict, mask or picture from a broken output
        row["error"] = (f"{item.path}: the model's output is not finite (score {score}, {bad} map values NaN or "
                        f"inf): no verdict")
        return ScoredImage(row)
    row["score"] = f"{score:.6f}"
    predicted = mask_image = None
    if calibration is not None:
        row["normalized_score"] = f"{float(calibration.normalize_scores(score)):.4f}"
        row["verdict"] = calibration.verdict(score)
        predicted = calibration.masks(amap)
        mask_image = binary_mask_image(predicted)
    image = None
    if picture:
        kind = "mask" if truth is not None else ("good" if item.label == 0 else "none")
        image = side_by_side(rgb, truth, amap, colour[0], colour[1], caption(item, score, calibration), predicted,
                             truth=kind, threshold=None if calibration is None else calibration.pixel_threshold)
    return ScoredImage(row, mask_image, image)


class ImageWriter:
    """Pictures, masks and scores.csv of scored images in `folder` (see the module)."""

    def __init__(self, folder: str, calibration: Calibration | None, score_stats: dict | None = None,
                 pictures: bool = True) -> None:
        self.folder, self.calibration, self.pictures = folder, calibration, pictures
        self.score_stats = score_stats or {}
        self.rows: list[dict] = []

    @property
    def csv_path(self) -> str:
        return os.path.join(self.folder, "scores.csv")

    def clear_previous(self) -> None:
        """Remove what the folder's previous scores.csv listed (pictures, masks, the csv)."""
        for name in previous_outputs(self.csv_path):
            for path in (os.path.join(self.folder, name + ".png"), os.path.join(self.folder, "masks", name + ".png")):
                # never through a link: a masks/ that points elsewhere keeps what is there
                if os.path.isfile(path) and not os.path.islink(path) and is_within(os.path.dirname(path), self.folder) \
                        and not os.path.islink(os.path.dirname(path)):
                    os.remove(path)
        if os.path.isfile(self.csv_path):
            os.remove(self.csv_path)

    def add(self, item: ImageItem, rgb: np.ndarray, amap: np.ndarray, score: float,
            vmin: float, vmax: float, mask: np.ndarray | None = None) -> dict:
        """Write one scored image's mask and picture; return (and keep) its row."""
        scored = score_image(item, rgb, amap, score, self.calibration, (vmin, vmax), mask,
                             picture=self.pictures)
        row = scored.row
        if scored.mask is not None:
            atomic_write(os.path.join(self.folder, "masks", item.name + ".png"),
                         lambda tmp: scored.mask.save(tmp, format="PNG"))
            row["output"] = item.name
        if scored.picture is not None:
            atomic_write(os.path.join(self.folder, item.name + ".png"),
                         lambda tmp: scored.picture.save(tmp, format="PNG"))
            row["output"] = item.name
        self.rows.append(row)
        return row

    def add_failed(self, item: ImageItem, reason: str) -> dict:
        row = empty_row(item)
        row["error"] = reason
        self.rows.append(row)
        return row

    def finish(self) -> str:
        """Write scores.csv (atomically); return its path."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, buf.getvalue())
        return self.csv_path

    @property
    def failed(self) -> int:
        return sum(bool(r["error"]) for r in self.rows)

    @property
    def defects(self) -> int:
        return sum(r["verdict"] == "DEFECT" for r in self.rows)

def previous_outputs(csv_path: str) -> list[str]:
    """The output names a previous scores.csv lists (plain names only: a damaged or
    hostile csv never names a path outside its folder)."""
    if not os.path.isfile(csv_path) or os.path.getsize(csv_path) > MAX_PREVIOUS_CSV_BYTES:
        return []
    try:
        with open(csv_path, encoding="utf-8", newline="") as f:
            names = [row.get("output") or "" for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [n for n in names if n and n == os.path.basename(n) and not n.startswith(".") and "\x00" not in n]
