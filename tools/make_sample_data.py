"""Build sample_data/ from real MVTec AD good images plus synthetic, exactly masked defects.

    python tools/make_sample_data.py --seed_dir PATH/TO/seed_sample_data --out sample_data

The seed holds 6 real good bottle images. 4 go to train/good, 2 to test/good. Defective
test images are rotated copies of the real good images with a painted defect (scratch,
crack, missing piece, stain); the mask is exactly the painted pixels. The seed's real
broken_large image has no true mask, so it goes to unlabeled/ (inference only).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.images import open_image  # noqa: E402

DEFECTS = ("scratch", "crack", "missing", "stain")


def _ring_point(rng: np.random.Generator, size: int) -> tuple[float, float]:
    """A point on the bottle's rim (an annulus around the centre)."""
    r = size * rng.uniform(0.22, 0.42)
    a = rng.uniform(0, 2 * math.pi)
    return size / 2 + r * math.cos(a), size / 2 + r * math.sin(a)


def _curve(rng, start, length, jitter, steps):
    x, y = start
    heading = rng.uniform(0, 2 * math.pi)
    pts = [(x, y)]
    for _ in range(steps):
        heading += rng.normal(0, jitter)
        x += math.cos(heading) * length / steps
        y += math.sin(heading) * length / steps
        pts.append((x, y))
    return pts


def paint_defect(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Return (defective image, mask) where the mask is 255 exactly on changed pixels."""
    size = image.size[0]
    shape = Image.new("L", image.size, 0)  # where the defect is
    draw = ImageDraw.Draw(shape)
    if kind == "scratch":
        pts = _curve(rng, _ring_point(rng, size), size * rng.uniform(0.15, 0.35), 0.08, 24)
        draw.line(pts, fill=255, width=int(rng.integers(2, 5)), joint="curve")
        colour, alpha = (235, 235, 225), 0.85
    elif kind == "crack":
        trunk = _curve(rng, _ring_point(rng, size), size * rng.uniform(0.15, 0.3), 0.6, 12)
        draw.line(trunk, fill=255, width=3)
        for _ in range(int(rng.integers(1, 4))):  # branches from random trunk points
            start = trunk[int(rng.integers(1, len(trunk)))]
            draw.line(_curve(rng, start, size * rng.uniform(0.05, 0.12), 0.7, 6), fill=255, width=2)
        colour, alpha = (20, 15, 10), 0.9
    elif kind == "missing":
        cx, cy = _ring_point(rng, size)
        n = int(rng.integers(5, 9))
        radius = size * rng.uniform(0.04, 0.09)
        poly = [(cx + radius * rng.uniform(0.5, 1.3) * math.cos(2 * math.pi * k / n),
                 cy + radius * rng.uniform(0.5, 1.3) * math.sin(2 * math.pi * k / n)) for k in range(n)]
        draw.polygon(poly, fill=255)
        colour, alpha = (200, 200, 195), 1.0
    elif kind == "stain":
        cx, cy = _ring_point(rng, size)
        n = 24
        radius = size * rng.uniform(0.03, 0.07)
        wobble = np.convolve(rng.uniform(0.6, 1.4, n + 4), np.ones(5) / 5, mode="valid")
        poly = [(cx + radius * wobble[k] * math.cos(2 * math.pi * k / n),
                 cy + radius * wobble[k] * math.sin(2 * math.pi * k / n)) for k in range(n)]
        draw.polygon(poly, fill=255)
        colour, alpha = (150, 95, 40), 0.7
    else:
        raise ValueError(f"unknown defect {kind!r}")

    mask = np.asarray(shape) > 0
    base = np.asarray(image, dtype=np.float32)
    texture = rng.normal(0, 12, base.shape)  # so the defect is not a flat colour
    painted = (1 - alpha) * base + alpha * (np.array(colour, dtype=np.float32) + texture)
    out = np.where(mask[..., None], np.clip(painted, 0, 255), base).astype(np.uint8)
    return Image.fromarray(out), Image.fromarray((mask * 255).astype(np.uint8))


def _load(path: str, size: int) -> Image.Image:
    with open_image(path) as img:
        return img.convert("RGB").resize((size, size), Image.BILINEAR)


def build(seed_dir: str, out_dir: str, size: int = 320, per_defect: int = 2, seed: int = 0) -> None:
    src = os.path.join(seed_dir, "bottle")
    dst = os.path.join(out_dir, "bottle")
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    goods = [os.path.join(src, "train", "good", f"00{i}.png") for i in range(1, 6)]
    goods.append(os.path.join(src, "test", "good", "001.png"))
    train, test_good = goods[:4], goods[4:]
    for sub in ("train/good", "test/good"):
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
    for i, path in enumerate(train):
        _load(path, size).save(os.path.join(dst, "train", "good", f"{i:03d}.png"), optimize=True)
    for i, path in enumerate(test_good):
        _load(path, size).save(os.path.join(dst, "test", "good", f"{i:03d}.png"), optimize=True)

    rng = np.random.default_rng(seed)
    k = 0
    for kind in DEFECTS:
        os.makedirs(os.path.join(dst, "test", kind), exist_ok=True)
        os.makedirs(os.path.join(dst, "ground_truth", kind), exist_ok=True)
        for i in range(per_defect):
            base = _load(goods[k % len(goods)], size).rotate(90 * int(rng.integers(1, 4)))
            k += 1
            image, mask = paint_defect(base, kind, rng)
            image.save(os.path.join(dst, "test", kind, f"{i:03d}.png"), optimize=True)
            mask.save(os.path.join(dst, "ground_truth", kind, f"{i:03d}_mask.png"), optimize=True)

    unlabeled = os.path.join(out_dir, "unlabeled")
    os.makedirs(unlabeled, exist_ok=True)
    _load(os.path.join(src, "test", "broken_large", "000.png"), size).save(
        os.path.join(unlabeled, "bottle_broken_large_000.png"), optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--seed_dir", required=True, help="folder holding bottle/ of real MVTec images")
    p.add_argument("--out", default="sample_data")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--per_defect", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    build(a.seed_dir, a.out, a.size, a.per_defect, a.seed)


if __name__ == "__main__":
    main()
