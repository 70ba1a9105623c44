"""MVTec AD folders -> samples -> normalised image tensors and binary masks.

Layout: ROOT/CLASS/train/good/*, ROOT/CLASS/test/<defect>/*,
ROOT/CLASS/ground_truth/<defect>/<name>_mask.png. Preprocessing follows the reference:
PIL bilinear resize to image_size x image_size, ImageNet mean/std; masks resized the same
way and binarised at 0.5. No augmentation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image
from paddle.io import Dataset

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MVTEC_CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                 "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")


class DataError(ValueError):
    """A data folder or file is missing or not what the MVTec layout expects."""


@dataclass(frozen=True)
class Sample:
    image_path: str
    mask_path: str | None  # None: a good image (all-zero mask)
    label: int             # 0 good, 1 defective
    defect: str            # "good" or the defect folder's name

    @property
    def name(self) -> str:
        return f"{self.defect}_{os.path.splitext(os.path.basename(self.image_path))[0]}"


def _images_in(folder: str) -> list[str]:
    """Image files of a folder, sorted by name; hidden and non-image files are skipped."""
    names = sorted(n for n in os.listdir(folder)
                   if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, n) for n in names]


def _subdirs(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder)
                  if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


def list_classes(root: str) -> list[str]:
    """Classes under root: every folder that holds train/good."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: data directory not found")
    classes = [c for c in _subdirs(root) if os.path.isdir(os.path.join(root, c, "train", "good"))]
    if not classes:
        raise DataError(f"{root}: no class folders with train/good inside (expected the MVTec AD "
                        f"layout ROOT/CLASS/train/good)")
    return classes


def resolve_classes(root: str, cls: str) -> list[str]:
    """'all', one name, or a comma list -> class names present under root."""
    present = list_classes(root)
    if cls in (None, "", "all"):
        return present
    wanted = [c.strip() for c in cls.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise DataError(f"{root}: class {unknown[0]!r} not found (present: {', '.join(present)})")
    return wanted


def index_train(root: str, cls: str) -> list[Sample]:
    folder = os.path.join(root, cls, "train", "good")
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: training folder not found")
    samples = [Sample(p, None, 0, "good") for p in _images_in(folder)]
    if not samples:
        raise DataError(f"{folder}: no training images")
    return samples


def index_test(root: str, cls: str) -> list[Sample]:
    """Test images with their masks, paired by file name (<name>_mask.png), never by order."""
    test_dir = os.path.join(root, cls, "test")
    gt_dir = os.path.join(root, cls, "ground_truth")
    if not os.path.isdir(test_dir):
        raise DataError(f"{test_dir}: test folder not found")
    samples = []
    for defect in _subdirs(test_dir):
        for image_path in _images_in(os.path.join(test_dir, defect)):
            if defect == "good":
                samples.append(Sample(image_path, None, 0, defect))
                continue
            stem = os.path.splitext(os.path.basename(image_path))[0]
            mask_path = os.path.join(gt_dir, defect, f"{stem}_mask.png")
            if not os.path.isfile(mask_path):
                raise DataError(f"{image_path}: defective test image has no mask "
                                f"(expected {mask_path})")
            samples.append(Sample(image_path, mask_path, 1, defect))
    if not samples:
        raise DataError(f"{test_dir}: no test images")
    return samples


def _open(path: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


def load_rgb(path: str, image_size: int) -> np.ndarray:
    """[S, S, 3] uint8, resized with PIL bilinear. Grayscale and RGBA become RGB."""
    return np.asarray(_open(path, "RGB").resize((image_size, image_size), Image.BILINEAR))


def normalize(rgb: np.ndarray) -> np.ndarray:
    """[S, S, 3] uint8 -> [3, S, S] float32, ImageNet mean/std."""
    x = rgb.astype(np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()


def load_image(path: str, image_size: int) -> np.ndarray:
    """[3, S, S] float32, ImageNet-normalised. Grayscale and RGBA become RGB."""
    return normalize(load_rgb(path, image_size))


def load_mask(path: str | None, image_size: int) -> np.ndarray:
    """[1, S, S] float32 in {0, 1}: bilinear resize, then > 0.5 (as the reference)."""
    if path is None:
        return np.zeros((1, image_size, image_size), dtype=np.float32)
    mask = _open(path, "L").resize((image_size, image_size), Image.BILINEAR)
    return (np.asarray(mask, dtype=np.float32)[None] / 255.0 > 0.5).astype(np.float32)


def denormalize(image: np.ndarray) -> np.ndarray:
    """[3, S, S] normalised -> [S, S, 3] uint8, for pictures."""
    x = image.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class MVTecDataset(Dataset):
    """Yields (image [3,S,S] float32, mask [1,S,S] float32, label int64).

    Decoded, resized images (uint8) and masks are kept after the first read, so a test
    set evaluated every few epochs is decoded once (per loader process).
    """

    def __init__(self, samples: list[Sample], image_size: int, cache: bool = True) -> None:
        super().__init__()
        self.samples = samples
        self.image_size = image_size
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int):
        s = self.samples[idx]
        if self._cache is not None and idx in self._cache:
            rgb, mask = self._cache[idx]
        else:
            rgb = load_rgb(s.image_path, self.image_size)
            mask = load_mask(s.mask_path, self.image_size).astype(np.uint8)
            if self._cache is not None:
                self._cache[idx] = (rgb, mask)
        return normalize(rgb), mask.astype(np.float32), np.int64(s.label)
