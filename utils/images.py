"""The one way this project decodes an image: Pillow restricted to an allow-list of decoders.

Pillow picks a decoder from a file's first bytes, whatever its name, among 40-odd formats.
One of them, EPS, is handed to Ghostscript when it is installed: the file's PostScript
runs (a crafted `x.png` ran its own code). Every image read (training, evaluation,
inference, calibration, --check_dir, uploads to the service, tools) goes through
`open_image`, which offers Pillow only the formats anomaly-detection data comes in:

    PNG   MVTec AD, BTAD, VisA masks; the usual lossless camera export
    JPEG  VisA images; compressed camera frames
    BMP   BTAD; many industrial camera SDKs' default
    TIFF  16-bit grayscale and multi-channel camera frames
    PPM   the Netpbm family (PBM/PGM/PPM/PNM): raw 8/16-bit frames from machine-vision tools

No decoder in this list calls an external program. Left out on purpose: EPS (Ghostscript),
and every format no dataset or camera delivers (GIF, WebP, JPEG 2000, PSD, ICO, ...),
each one more parser for hostile bytes to reach. A file of another format is refused with
one line naming it: convert it to PNG.

A path must be a regular file (utils/files.py): a FIFO named x.png never blocks a run.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from .files import open_regular

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "PPM")
# Names a folder walk takes for images (any other file is ignored): the allow-list's.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pbm", ".pgm", ".ppm", ".pnm")
NOT_AN_IMAGE = f"not an image of {', '.join(IMAGE_FORMATS)}"


@contextmanager
def open_image(source: str | os.PathLike | BinaryIO) -> Iterator[Image.Image]:
    """Image.open limited to IMAGE_FORMATS (header read, pixels not yet decoded). A path
    is opened only when it is a regular file (NotARegularFile, a UserError, otherwise);
    bytes of another format raise UnidentifiedImageError saying NOT_AN_IMAGE."""
    if isinstance(source, str | os.PathLike):
        with open_regular(os.fspath(source)) as f, _open(f) as img:
            yield img
    else:
        with _open(source) as img:
            yield img


def _open(f: BinaryIO) -> Image.Image:
    try:
        return Image.open(f, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:  # Pillow's message names the file object, not the file
        raise UnidentifiedImageError(NOT_AN_IMAGE) from None
