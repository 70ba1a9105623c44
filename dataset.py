"""MVTec AD (or BTAD) folders -> samples -> normalised image tensors and binary masks.

Layouts: MVTec AD's ROOT/CLASS/train/good/*, ROOT/CLASS/test/<defect>/* (good/ for good
images), ROOT/CLASS/ground_truth/<defect>/<name>_mask.png; BTAD's (beanTech Anomaly
Detection) ROOT/CLASS/train/ok/*, ROOT/CLASS/test/ok/* and test/ko/*,
ROOT/CLASS/ground_truth/ko/<name>.png or .bmp (classes 01, 02, 03; .bmp or .png images).
Each class folder's layout is told by its train/good or train/ok (--layout auto), or
chosen. Preprocessing follows the reference:
PIL bilinear resize to image_size x image_size, ImageNet mean/std; masks resized the same
way and binarised at 0.5. No augmentation.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np
from paddle.io import Dataset
from PIL import Image, ImageOps

from utils.errors import UserError, bounded_line
from utils.files import NotARegularFile
from utils.images import IMAGE_EXTENSIONS, IMAGE_FORMATS, open_image
from utils.layouts import LAYOUTS  # noqa: F401  (the settings read it without Paddle)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MVTEC_CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                 "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
# Each layout's folder of good images (train/GOOD, test/GOOD).
GOOD_FOLDER = {"mvtec": "good", "btad": "ok"}


class DataError(UserError):
    """A data folder or file is missing or not what the MVTec layout expects."""


@dataclass(frozen=True)
class Sample:
    image_path: str
    mask_path: str | None  # None: a good image (all-zero mask), or no mask known
    label: int             # 0 good, 1 defective, -1 unlabelled
    defect: str            # "good", the defect folder's name, or "unlabeled"

    @property
    def name(self) -> str:
        return f"{self.defect}_{os.path.splitext(os.path.basename(self.image_path))[0]}"

    @property
    def has_mask(self) -> bool:
        """The pixel labels are known: a good image, or a defect image with its mask."""
        return self.label == 0 or self.mask_path is not None


@dataclass(frozen=True)
class DataSource:
    """Where one class's images are: good training images, test images, masks."""
    name: str
    train_dir: str
    test_dir: str | None = None  # None or missing: no test set (train and calibrate only)
    gt_dir: str | None = None    # None or missing: no masks (pixel metrics skipped)
    layout: str = "mvtec"        # names of the good folder and of masks (GOOD_FOLDER, mask_candidates)


def _images_in(folder: str, folders: bool = True) -> list[str]:
    """Entries of a folder named like images, sorted by name; hidden and other files are
    skipped. Kept even when not a regular file (a FIFO, socket, device, link loop and, with
    `folders`, a folder named x.png): reading one refuses it with the reason, never blocks,
    so the run says so (a row, or a warning in training) instead of skipping it unsaid."""
    names = sorted(n for n in os.listdir(folder)
                   if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
                   and (folders or not os.path.isdir(os.path.join(folder, n))))
    return [os.path.join(folder, n) for n in names]


def _subdirs(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder)
                  if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


def class_layouts(root: str, layout: str = "auto") -> dict[str, str]:
    """{class: "mvtec" or "btad"} for every class folder under root, told by its train/good
    (MVTec AD) or train/ok (BTAD); `layout` other than auto: only that one's classes."""
    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    if not os.path.isdir(root):
        raise DataError(f"{root}: data directory not found")
    kinds = ("mvtec", "btad") if layout == "auto" else (layout,)
    found = {}
    for c in _subdirs(root):
        has = [k for k in kinds if os.path.isdir(os.path.join(root, c, "train", GOOD_FOLDER[k]))]
        if len(has) > 1:
            raise DataError(f"{os.path.join(root, c)}: both train/good (MVTec AD) and train/ok (BTAD): "
                            f"choose with --layout mvtec or --layout btad")
        if has:
            found[c] = has[0]
    if not found:
        if layout == "btad":
            raise DataError(f"{root}: no class folders with train/ok inside (expected the BTAD layout "
                            f"ROOT/CLASS/train/ok)")
        other = ", or BTAD's ROOT/CLASS/train/ok" if layout == "auto" else ""
        raise DataError(f"{root}: no class folders with train/good inside (expected the MVTec AD "
                        f"layout ROOT/CLASS/train/good{other})")
    return found


def list_classes(root: str, layout: str = "auto") -> list[str]:
    """Classes under root: every folder that holds train/good (or BTAD's train/ok)."""
    return sorted(class_layouts(root, layout))


def resolve_classes(root: str, cls: str, layout: str = "auto") -> list[str]:
    """'all', one name, or a comma list -> class names present under root."""
    present = list_classes(root, layout)
    if cls in (None, "", "all"):
        return present
    wanted = list(dict.fromkeys(c.strip() for c in cls.split(",") if c.strip()))  # each class once
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise DataError(f"{root}: class {unknown[0]!r} not found (present: {', '.join(present)})")
    return wanted


def layout_source(root: str, cls: str, layout: str) -> DataSource:
    """One class's folders in `layout` ("mvtec" or "btad")."""
    if layout == "mvtec":
        return mvtec_source(root, cls)
    base = os.path.join(root, cls)
    return DataSource(cls, os.path.join(base, "train", GOOD_FOLDER[layout]), os.path.join(base, "test"),
                      os.path.join(base, "ground_truth"), layout)


def mvtec_source(root: str, cls: str) -> DataSource:
    base = os.path.join(root, cls)
    return DataSource(cls, os.path.join(base, "train", "good"), os.path.join(base, "test"),
                      os.path.join(base, "ground_truth"))


def folder_class_name(train_dir: str, good: str = "good") -> str:
    """A class name for a plain folder: its name, or its parent's for .../train/good (BTAD:
    `good` "ok")."""
    parts = [p for p in os.path.normpath(os.path.abspath(train_dir)).split(os.sep) if p]
    while len(parts) > 1 and parts[-1] in (good, "train"):
        parts.pop()
    return parts[-1] if parts else "custom"


def resolve_sources(data_dir: str, cls: str, train_dir: str = "", test_dir: str = "",
                    layout: str = "auto") -> list[DataSource]:
    """The classes to run: the MVTec AD or BTAD layout under data_dir, or one class from
    plain folders (masks and good/ named as `layout` says: MVTec AD's unless btad)."""
    if test_dir and not train_dir:
        raise DataError(f"{test_dir}: --test_dir needs --train_dir (or use --data_dir)")
    if not train_dir:
        layouts = class_layouts(data_dir, layout)
        return [layout_source(data_dir, c, layouts[c]) for c in resolve_classes(data_dir, cls, layout)]
    if not os.path.isdir(train_dir):
        raise DataError(f"{train_dir}: training folder not found")
    if test_dir and not os.path.isdir(test_dir):
        raise DataError(f"{test_dir}: test folder not found")
    if cls not in (None, "", "all") and "," in cls:
        raise DataError(f"--cls {cls}: --train_dir holds one class; give one name")
    plain_layout = "btad" if layout == "btad" else "mvtec"
    name = cls if cls not in (None, "", "all") else folder_class_name(train_dir, GOOD_FOLDER[plain_layout])
    gt_dir = os.path.join(os.path.dirname(os.path.normpath(test_dir)), "ground_truth") if test_dir else None
    return [DataSource(name, train_dir, test_dir or None, gt_dir, plain_layout)]


def index_train_dir(folder: str) -> list[Sample]:
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: training folder not found")
    samples = [Sample(p, None, 0, "good") for p in _images_in(folder)]
    if not samples:
        raise DataError(f"{folder}: no training images")
    return samples


def index_test_dir(test_dir: str | None, gt_dir: str | None, layout: str = "mvtec") -> list[Sample]:
    """Test images, labelled by subfolder (good/, BTAD's ok/, or a defect name; loose images:
    unlabelled), with masks paired by file name (mask_candidates), never by order. Where
    gt_dir exists, every defect image must have its mask; without gt_dir, masks are unknown."""
    if not test_dir or not os.path.isdir(test_dir):
        return []
    has_gt = bool(gt_dir) and os.path.isdir(gt_dir)
    # a folder here is a defect folder, whatever its name
    samples = [Sample(p, None, -1, "unlabeled") for p in _images_in(test_dir, folders=False)]
    for defect in _subdirs(test_dir):
        for image_path in _images_in(os.path.join(test_dir, defect)):
            if defect == GOOD_FOLDER[layout]:
                samples.append(Sample(image_path, None, 0, defect))
                continue
            mask_path = None
            if has_gt:
                candidates = mask_candidates(gt_dir, defect, image_path, layout)
                # anything there, even not a regular file: reading it says what it is
                mask_path = next((m for m in candidates if os.path.lexists(m)), None)
                if mask_path is None:
                    raise DataError(f"{image_path}: defective test image has no mask "
                                    f"(expected {' or '.join(candidates)})")
            samples.append(Sample(image_path, mask_path, 1, defect))
    return samples


def mask_path_for(gt_dir: str, defect: str, image_path: str) -> str:
    """MVTec AD's mask naming: test/<defect>/<name>.png -> ground_truth/<defect>/<name>_mask.png."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return os.path.join(gt_dir, defect, f"{stem}_mask.png")


def mask_candidates(gt_dir: str, defect: str, image_path: str, layout: str = "mvtec") -> list[str]:
    """Where an image's mask may be, in the order looked for. MVTec AD: <name>_mask.png.
    BTAD: <name>.png, or <name>.bmp (its class 03 ships .bmp masks), whatever the image's
    own extension (.bmp or .png)."""
    if layout == "mvtec":
        return [mask_path_for(gt_dir, defect, image_path)]
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return [os.path.join(gt_dir, defect, stem + ext) for ext in (".png", ".bmp")]


def mask_naming(layout: str) -> str:
    """How a layout names masks, for messages."""
    return "DEFECT/NAME_mask.png" if layout == "mvtec" else "ko/NAME.png (or .bmp)"


def guess_mask(image_path: str) -> str | None:
    """The mask of an image inside an MVTec layout (.../test/<defect>/<name>.png), when that
    file exists; None for good images and images elsewhere."""
    defect_dir = os.path.dirname(os.path.abspath(image_path))
    test_dir, defect = os.path.split(defect_dir)
    if os.path.basename(test_dir) != "test" or defect == "good":
        return None
    mask = mask_path_for(os.path.join(os.path.dirname(test_dir), "ground_truth"), defect, image_path)
    return mask if os.path.lexists(mask) else None


def index_train(root: str, cls: str) -> list[Sample]:
    return index_train_dir(mvtec_source(root, cls).train_dir)


def index_test(root: str, cls: str) -> list[Sample]:
    """The MVTec AD (or BTAD) layout's test images; error when there are none."""
    btad = os.path.isdir(os.path.join(root, cls, "train", "ok")) and not os.path.isdir(
        os.path.join(root, cls, "train", "good"))
    source = layout_source(root, cls, "btad" if btad else "mvtec")
    if not os.path.isdir(source.test_dir):
        raise DataError(f"{source.test_dir}: test folder not found")
    samples = index_test_dir(source.test_dir, source.gt_dir, source.layout)
    if not samples:
        raise DataError(f"{source.test_dir}: no test images")
    return samples


def split_validation(samples: list[Sample], ratio: float) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): good images held out for calibration, chosen by file name.

    An image is held out when a hash of its file name falls in the lowest `ratio` of the
    hash range: the same split on every run and machine, about `ratio` of the images, and
    adding images never moves one already held out back to training. At least one image
    is held out when ratio > 0 (the lowest hash) and at least one stays in training.
    """
    if ratio <= 0 or len(samples) < 2:
        return list(samples), []

    def position(s: Sample) -> float:  # in [0, 1)
        digest = hashlib.sha1(os.path.basename(s.image_path).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0 ** 64

    ranked = sorted(samples, key=position)
    count = sum(position(s) < ratio for s in ranked)
    held = {s.image_path for s in ranked[:min(len(samples) - 1, max(1, count))]}
    return ([s for s in samples if s.image_path not in held],
            [s for s in samples if s.image_path in held])


def _decode(path: str) -> Image.Image:
    """Open and fully decode an image, upright (EXIF orientation applied)."""
    try:
        with open_image(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except NotARegularFile as err:  # a FIFO, device, folder or link loop: refused unopened
        raise DataError(f"{path}: cannot read image ({err.reason})") from None
    except PermissionError:
        raise DataError(f"{path}: cannot read image (permission denied)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = "empty file" if os.path.isfile(path) and os.path.getsize(path) == 0 else str(err)
        raise DataError(f"{path}: cannot read image ({reason})") from None


def _to_rgb(img: Image.Image, path: str = "image") -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit grayscale scaled by its range (PIL's own
    conversion would clip it at 255), transparency dropped, CMYK and palettes converted.
    A float image with NaN or infinite pixels is refused: it has no picture to score."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.array(img, dtype=np.float64)  # one copy, scaled in place: a 40 MP frame stays 320 MB
        if not np.isfinite(values).all():
            raise DataError(f"{path}: cannot read image (NaN or infinite pixel values)")
        top = 65535.0 if img.mode.startswith("I;16") else max(float(values.max()), 1.0)
        values /= top  # the order of the formula values / top * 255 + 0.5, rounding included
        values *= 255.0
        values += 0.5
        gray = np.clip(values, 0, 255, out=values).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")


MAX_UPLOAD_SIDE = 16384  # pixels: any camera frame; a 1 x 39M strip is an attack


# What an upload may be: the formats every image read allows (utils/images.py).
UPLOAD_FORMATS = IMAGE_FORMATS


def decode_upload(data: bytes, name: str, image_size: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An uploaded image's bytes -> ([S, S, 3] uint8 as load_rgb gives, (width, height) as
    sent). DataError naming `name` for what is not an image, is truncated, or would decode
    to more than `max_pixels` pixels (a decompression bomb: refused from its header, before
    any pixel is decoded). The size is the upright one, after the EXIF orientation, as
    image_size_of reports files."""
    try:
        with open_image(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DataError(f"{name}: {width}x{height} pixels, more than the {max_pixels} allowed")
            if max(width, height) > MAX_UPLOAD_SIDE:  # resizing such a strip takes gigabytes
                raise DataError(f"{name}: {width}x{height} pixels, a side longer than {MAX_UPLOAD_SIDE}")
            img.load()
            upright = ImageOps.exif_transpose(img)
    except DataError:
        raise
    except Exception as err:  # any decoder's failure on hostile bytes (struct.error in EXIF, ...)
        reason = "empty" if not data else ("truncated" if "truncated" in str(err) else str(err))
        raise DataError(f"{name}: cannot read image ({bounded_line(reason, 200)})") from None
    return np.asarray(_to_rgb(upright, name).resize((image_size, image_size), Image.BILINEAR)), upright.size


def load_rgb(path: str, image_size: int) -> np.ndarray:
    """[S, S, 3] uint8, resized with PIL bilinear. Every mode PIL reads becomes RGB."""
    return np.asarray(_to_rgb(_decode(path), path).resize((image_size, image_size), Image.BILINEAR))


def image_size_of(path: str) -> tuple[int, int]:
    """(width, height) as stored, upright; reads the header only."""
    try:
        with open_image(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except NotARegularFile as err:
        raise DataError(f"{path}: cannot read image ({err.reason})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def normalize(rgb: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """[S, S, 3] uint8 -> [3, S, S] float32, ImageNet mean/std (or an export's own)."""
    x = rgb.astype(np.float32) / 255.0
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1).copy()


def load_image(path: str, image_size: int) -> np.ndarray:
    """[3, S, S] float32, ImageNet-normalised. Grayscale and RGBA become RGB."""
    return normalize(load_rgb(path, image_size))


def load_mask(path: str | None, image_size: int) -> np.ndarray:
    """[1, S, S] float32 in {0, 1}: scaled by its maximum, bilinear resize, then > 0.5.
    For MVTec's 0/255 masks this is the reference's rule (resize, /255, > 0.5); a mask of
    other values (0/1, soft edges, JPEG noise) is binarised at half its maximum."""
    if path is None:
        return np.zeros((1, image_size, image_size), dtype=np.float32)
    img = _decode(path)
    values = _to_gray_values(img)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DataError(f"{path}: cannot read mask (NaN or infinite pixel values)")
    top = float(values.max())
    if top <= 0:
        return np.zeros((1, image_size, image_size), dtype=np.float32)
    if top == 255 and values.dtype == np.uint8:  # the reference's path, bit for bit
        resized = np.asarray(Image.fromarray(values, mode="L").resize((image_size, image_size),
                                                                      Image.BILINEAR), dtype=np.float32) / 255.0
    else:
        scaled = Image.fromarray(values.astype(np.float32) / top, mode="F")
        resized = np.asarray(scaled.resize((image_size, image_size), Image.BILINEAR))
    return (resized[None] > 0.5).astype(np.float32)


def _to_gray_values(img: Image.Image) -> np.ndarray:
    """A mask's values as stored (8/16/32-bit or float); colour masks via luminance."""
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8) * 255
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
        return np.asarray(img)
    return np.asarray(img.convert("L"))


def mask_problems(image_path: str, mask_path: str) -> list[str]:
    """Warnings for a mask that will be fixed on reading: size differs from its image,
    values not binary."""
    problems = []
    image_wh, mask_wh = image_size_of(image_path), image_size_of(mask_path)
    if image_wh != mask_wh:
        problems.append(f"{mask_path}: mask is {mask_wh[0]}x{mask_wh[1]}, its image "
                        f"{image_wh[0]}x{image_wh[1]}: resized to the image")
    values = np.unique(_to_gray_values(_decode(mask_path)))
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        problems.append(f"{mask_path}: mask is not binary ({len(values)} values): "
                        f"binarised at half its maximum")
    return problems


def denormalize(image: np.ndarray) -> np.ndarray:
    """[3, S, S] normalised -> [S, S, 3] uint8, for pictures."""
    x = image.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def read_sample(sample: Sample, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rgb [S, S, 3] uint8, mask [1, S, S] uint8) of a sample; DataError when unreadable."""
    return load_rgb(sample.image_path, image_size), load_mask(sample.mask_path, image_size).astype(np.uint8)


class MVTecDataset(Dataset):
    """Yields (image [3,S,S] float32, mask [1,S,S] float32, label int64).

    Decoded, resized images (uint8) and masks are kept after the first read, so a test
    set evaluated every few epochs is decoded once (per loader process).
    """

    def __init__(self, samples: list[Sample], image_size: int, cache: bool = True,
                 decoded: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """`decoded`: each sample's (rgb, mask) as read_sample gives them, already read."""
        super().__init__()
        self.samples = samples
        self.image_size = image_size
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None
        if decoded is not None:
            if len(decoded) != len(samples):
                raise ValueError(f"{len(decoded)} decoded images for {len(samples)} samples")
            self._cache = dict(enumerate(decoded))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int):
        s = self.samples[idx]
        if self._cache is not None and idx in self._cache:
            rgb, mask = self._cache[idx]
        else:
            rgb, mask = read_sample(s, self.image_size)
            if self._cache is not None:
                self._cache[idx] = (rgb, mask)
        return normalize(rgb), mask.astype(np.float32), np.int64(s.label)


def load_checked(samples: list[Sample], image_size: int, progress: bool = False,
                 desc: str = "read images") -> tuple[MVTecDataset, list[tuple[Sample, str]], list[str]]:
    """Decode every sample once (into the returned dataset's cache) so that unreadable
    files are found before any work: (dataset of the readable samples, [(sample, reason)]
    for the others, warnings about masks that will be fixed on reading)."""
    from tqdm import tqdm

    good: list[Sample] = []
    decoded: list[tuple[np.ndarray, np.ndarray]] = []
    failed: list[tuple[Sample, str]] = []
    warnings: list[str] = []
    for sample in tqdm(samples, desc=desc, leave=False, disable=not progress):
        try:
            item = read_sample(sample, image_size)
            if sample.mask_path is not None:
                warnings += mask_problems(sample.image_path, sample.mask_path)
        except DataError as err:
            failed.append((sample, str(err)))
            continue
        good.append(sample)
        decoded.append(item)
    return MVTecDataset(good, image_size, decoded=decoded), failed, warnings
