"""Pictures: original | ground truth | heatmap overlay | predicted mask, side by side."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

_JET = colormaps["jet"]


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


def side_by_side(image: np.ndarray, mask: np.ndarray | None, amap: np.ndarray, vmin: float,
                 vmax: float, caption: str, predicted: np.ndarray | None = None) -> Image.Image:
    """[original | ground truth | heatmap | predicted mask] with a caption strip
    underneath; panels without data (mask None: no ground truth; predicted None: no
    threshold) are left out."""
    h, w = amap.shape
    panels = [image]
    if mask is not None:
        panels.append(_mask_panel(mask))
    panels.append(heatmap_overlay(image, amap, vmin, vmax))
    if predicted is not None:
        panels.append(_mask_panel(predicted))
    panels = np.concatenate(panels, axis=1)
    strip = 18
    canvas = Image.new("RGB", (panels.shape[1], h + strip), (255, 255, 255))
    canvas.paste(Image.fromarray(panels), (0, 0))
    ImageDraw.Draw(canvas).text((4, h + 3), caption, fill=(0, 0, 0))
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
