"""Pictures: image | ground truth | anomaly map (+ colour bar) | predicted mask, side by side.

Each picture must be readable on its own (no README at hand): every panel carries a
title, the anomaly map carries its colour scale, and the ground-truth panel says when
there is no mask rather than silently disappearing. Drawn with PIL only (no pyplot):
this runs once per image, for hundreds of images."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

_JET = colormaps["jet"]

# Layout, in pixels. Panels are the map's size (H x W); strips and gaps are fixed for a
# picture width, so that pictures of the same size stack into aligned columns.
# Text must be readable where the picture is shown: at its own size in an image viewer,
# and at most DISPLAY_WIDTH px wide in the HTML report (report/html.py's page width). A
# picture wider than that is shown scaled down, so its text is drawn larger by as much.
DISPLAY_WIDTH = 1200
FONT_PX = 16   # Pillow's own font (always present, no font files): 11 px capitals, 14 px with descenders
_GAP = 2       # white gap between panels, so a black mask does not merge with its neighbour
_BAR_W = 10    # the colour bar itself
_LABEL_PAD = 4  # bar -> its labels
CAPTION_LINES = 2  # name; score against threshold and verdict


@dataclass(frozen=True)
class _Style:
    """The font and the text strips' sizes of pictures drawn at one font size."""
    font: ImageFont.FreeTypeFont
    text_h: int       # bottom of the tallest glyphs, from the draw origin
    title_h: int      # title strip above the panels
    caption_h: int    # caption strip below the panels
    label_w: int      # room for the widest short number f"{v:.3g}" ("-1.23e-05"); longer ones
                      # are reformatted with fewer digits (see _number) rather than widening the picture
    bar_column_w: int


@lru_cache(maxsize=16)
def _style(font_px: int) -> _Style:
    font = ImageFont.load_default(size=font_px)
    text_h = font.getbbox("Ag0")[3]
    label_w = int(math.ceil(ImageDraw.Draw(Image.new("L", (1, 1))).textlength("-8.88e-88", font=font))) + 2
    return _Style(font, text_h, text_h + 4, CAPTION_LINES * (text_h + 2) + 4, label_w,
                  _GAP + _BAR_W + _LABEL_PAD + label_w)


_BASE = _style(FONT_PX)
_TITLE_H = _BASE.title_h  # the title strip of every picture up to DISPLAY_WIDTH wide
_WHITE, _BLACK, _GREY, _TEXT_GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128), (150, 150, 150)
_TRUTHS = ("mask", "good", "none")


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
                    alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured map over an RGB uint8 image. The map is scaled with a fixed
    [vmin, vmax] (the class's range), not per image, so a good image stays cool."""
    scaled = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colour = (_JET(scaled)[..., :3] * 255.0).astype(np.float32)
    return (alpha * colour + (1 - alpha) * image.astype(np.float32)).astype(np.uint8)


def binary_mask_image(mask: np.ndarray) -> Image.Image:
    """[H, W] bool/0-1 -> 8-bit PNG-ready image, 255 = defect (MVTec's mask convention)."""
    return Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L")


def _mask_panel(mask: np.ndarray) -> np.ndarray:
    return np.repeat(((np.asarray(mask) > 0).astype(np.uint8) * 255)[..., None], 3, axis=2)


def _scale_range(amap: np.ndarray, vmin, vmax) -> tuple[float, float]:
    """The [vmin, vmax] to draw with. A broken range (non-finite, empty or reversed) must
    not cost the picture: fall back to the map's own finite range, else 0..1."""
    try:
        lo, hi = float(vmin), float(vmax)
        if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
            return lo, hi
    except (TypeError, ValueError):
        pass
    finite = np.asarray(amap, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size and finite.max() > finite.min():
        return float(finite.min()), float(finite.max())
    return 0.0, 1.0


@lru_cache(maxsize=8)
def _bar(height: int) -> Image.Image:
    """Jet from 1.0 (top, = vmax) down to 0.0 (bottom, = vmin): exactly the colours
    heatmap_overlay gives those values. Cached: every picture of a run has one height."""
    colours = (_JET(np.linspace(1.0, 0.0, height))[:, :3] * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.repeat(colours[:, None, :], _BAR_W, axis=1))


def _fit(draw: ImageDraw.ImageDraw, texts: list[str], width: float, font: ImageFont.FreeTypeFont) -> str:
    """The first of `texts` that fits in `width`; else the last one, cut with '..'.
    Lets a 64 px panel say "predicted" where a wide one says "predicted mask"."""
    for text in texts:
        if draw.textlength(text, font=font) <= width:
            return text
    text = texts[-1]
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".." if text else ""


def _number(draw: ImageDraw.ImageDraw, value: float, style: _Style) -> str:
    # Fewer digits rather than a cut-off number, which would read as a different value.
    return _fit(draw, [f"{value:.3g}", f"{value:.2g}", f"{value:.1g}"], style.label_w, style.font)


def _centred_lines(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int],
                   layouts: list[list[str]], fill, style: _Style) -> None:
    """Write the first layout (list of lines) whose lines all fit, centred in box."""
    x0, y0, w, h = box
    font = style.font
    lines = next((ls for ls in layouts if all(draw.textlength(s, font=font) <= w - 4 for s in ls)),
                 layouts[-1])
    lines = [_fit(draw, [s], w - 4, font) for s in lines]
    y = y0 + (h - len(lines) * (style.text_h + 2)) // 2
    for line in lines:
        x = x0 + (w - draw.textlength(line, font=font)) / 2
        draw.text((x, y), line, fill=fill, font=font)
        y += style.text_h + 2


def _place(h: int, w: int, predicted: bool, style: _Style) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    x_map = 2 * (w + _GAP)
    x_pred = x_map + w + style.bar_column_w + _GAP
    top = style.title_h
    corners = {"image": (0, top), "ground truth": (w + _GAP, top), "anomaly map": (x_map, top),
               "colour bar": (x_map + w + _GAP, top)}
    if predicted:
        corners["predicted mask"] = (x_pred, top)
    width = x_pred + w if predicted else x_pred - _GAP
    return corners, (width, top + h + style.caption_h)


def picture_style(h: int, w: int, predicted: bool) -> _Style:
    """The font of a picture of [h, w] maps: FONT_PX, scaled up by as much as the report
    scales the picture down (wider than DISPLAY_WIDTH), so its text is shown at FONT_PX."""
    font_px = FONT_PX
    for _ in range(3):  # a larger font widens the colour bar's labels, hence the picture
        width = _place(h, w, predicted, _style(font_px))[1][0]
        needed = math.ceil(FONT_PX * max(width, DISPLAY_WIDTH) / DISPLAY_WIDTH)
        if needed <= font_px:
            break
        font_px = needed
    return _style(font_px)


def layout(h: int, w: int, predicted: bool) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    """Where side_by_side puts things for [h, w] maps: the top-left corner of each panel
    (image, ground truth, anomaly map, colour bar, predicted mask) and the picture's size."""
    return _place(h, w, predicted, picture_style(h, w, predicted))


def side_by_side(image: np.ndarray, mask: np.ndarray | None, amap: np.ndarray, vmin: float,
                 vmax: float, caption: str, predicted: np.ndarray | None = None, *,
                 truth: str | None = None, threshold: float | None = None) -> Image.Image:
    """[image | ground truth | anomaly map + colour bar | predicted mask], titled, with a
    one-line caption strip underneath; an RGB PIL image.

    truth: "mask" draws `mask` ([H, W], 0/1) white-on-black; "good" a known good image,
    whose true mask is empty (black, "good: no defect"); "none" no mask known (grey,
    "no mask"). Default "mask" if mask is given, else "none": the ground-truth panel is
    always there, so the columns of stacked pictures line up and mean the same thing.
    The predicted-mask panel appears only when `predicted` is given (a threshold is known).
    The colour bar uses the same fixed [vmin, vmax] as the overlay; `threshold` (map
    units) adds a tick labelled "thr" at its place on the bar."""
    if truth is None:
        truth = "mask" if mask is not None else "none"
    if truth not in _TRUTHS:
        raise ValueError(f"truth must be one of {_TRUTHS}, not {truth!r}")
    if truth == "mask" and mask is None:
        raise ValueError('truth="mask" needs a mask')
    amap = np.asarray(amap)
    h, w = amap.shape
    lo, hi = _scale_range(amap, vmin, vmax)

    style = picture_style(h, w, predicted is not None)
    font, text_h = style.font, style.text_h
    corners, (width, height) = _place(h, w, predicted is not None, style)
    (x_image, top), (x_truth, _), (x_map, _), (x_bar, _) = [corners[k] for k in (
        "image", "ground truth", "anomaly map", "colour bar")]
    x_pred = corners.get("predicted mask", (0, 0))[0]
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)

    canvas.paste(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)), (x_image, top))
    if truth == "mask":
        canvas.paste(Image.fromarray(_mask_panel(mask)), (x_truth, top))
    else:  # a flat panel (black: the empty true mask of a good image; grey: unknown) + words
        draw.rectangle((x_truth, top, x_truth + w - 1, top + h - 1),
                       fill=_BLACK if truth == "good" else _GREY)
        if truth == "good":
            _centred_lines(draw, (x_truth, top, w, h), [["good: no defect"], ["good:", "no defect"], ["good"]],
                           _TEXT_GREY, style)
        else:
            _centred_lines(draw, (x_truth, top, w, h), [["no mask"], ["no", "mask"]], _BLACK, style)
    canvas.paste(Image.fromarray(heatmap_overlay(image, amap, lo, hi)), (x_map, top))
    if predicted is not None:
        canvas.paste(Image.fromarray(_mask_panel(predicted)), (x_pred, top))

    # Titles, centred over their panels and shortened to fit narrow ones.
    titles = [(x_image, ["image"]), (x_truth, ["ground truth", "truth"]),
              (x_map, ["anomaly map", "anomaly", "map"])]
    if predicted is not None:
        titles.append((x_pred, ["predicted mask", "predicted", "pred"]))
    for x, names in titles:
        title = _fit(draw, names, w - 2, font)
        draw.text((x + (w - draw.textlength(title, font=font)) / 2, 1), title, fill=_BLACK, font=font)

    # Colour bar: vmax at the top, vmin at the bottom, optional threshold tick.
    canvas.paste(_bar(h), (x_bar, top))
    x_label = x_bar + _BAR_W + _LABEL_PAD
    draw.text((x_label, top), _number(draw, hi, style), fill=_BLACK, font=font)
    draw.text((x_label, top + h - text_h), _number(draw, lo, style), fill=_BLACK, font=font)
    if threshold is not None and math.isfinite(float(threshold)):
        # Out-of-range thresholds sit at the bar's end: nothing (or everything) is flagged.
        at = min(max((float(threshold) - lo) / (hi - lo), 0.0), 1.0)
        y = top + int(round((1.0 - at) * (h - 1)))
        draw.line((x_bar - _GAP, y, x_bar + _BAR_W + _LABEL_PAD - 2, y), fill=_BLACK, width=1)
        # Label next to its tick, but kept clear of the vmax/vmin labels at the ends.
        y_text = min(max(y - text_h // 2, top + text_h), top + h - 2 * text_h)
        draw.text((x_label, y_text), "thr", fill=_BLACK, font=font)

    # The caption: up to CAPTION_LINES lines (split at newlines); a line too long for a
    # narrow picture first loses its closing "(...)" aside, then is cut.
    for k, line in enumerate(caption.split("\n")[:CAPTION_LINES]):
        shorter = line[:line.rindex(" (")] if line.endswith(")") and " (" in line else line
        draw.text((4, top + h + 3 + k * (text_h + 2)), _fit(draw, [line, shorter], width - 8, font),
                  fill=_BLACK, font=font)
    return canvas


def stack_vertically(pictures: list[Image.Image]) -> Image.Image:
    """One picture of several, top to bottom, on white."""
    canvas = Image.new("RGB", (max(p.size[0] for p in pictures), sum(p.size[1] for p in pictures)),
                       (255, 255, 255))
    y = 0
    for picture in pictures:
        canvas.paste(picture.convert("RGB"), (0, y))
        y += picture.size[1]
    return canvas
