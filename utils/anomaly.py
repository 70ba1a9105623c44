"""Anomaly map: per-scale 1 - cosine similarity, upsampled, summed, Gaussian smoothed.

Upsampling (bilinear, align_corners=True) and smoothing (scipy.ndimage.gaussian_filter
semantics) are both separable linear maps, so each is applied as two matmuls with a fixed
matrix: out = A_rows @ x @ A_cols^T. That is exact, has no boundary special cases, and
exports to a static graph, ONNX and oneDNN unchanged.
"""
from __future__ import annotations

import functools

import numpy as np
import paddle
import paddle.nn.functional as F

SIGMA = 4.0
TRUNCATE = 4.0


@functools.lru_cache(maxsize=32)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of 1-D linear interpolation with align_corners=True."""
    m = np.zeros((out_size, in_size), dtype=np.float64)
    if in_size == 1 or out_size == 1:
        m[:, 0] = 1.0
        return m
    pos = np.arange(out_size) * (in_size - 1) / (out_size - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, in_size - 2)
    frac = pos - lo
    m[np.arange(out_size), lo] = 1.0 - frac
    m[np.arange(out_size), lo + 1] += frac
    return m


@functools.lru_cache(maxsize=32)
def gaussian_matrix(size: int, sigma: float = SIGMA, truncate: float = TRUNCATE) -> np.ndarray:
    """[size, size] matrix of scipy.ndimage.gaussian_filter1d (mode 'reflect').

    scipy's kernel: radius int(truncate * sigma + 0.5), weights exp(-x^2 / 2 sigma^2)
    normalised; 'reflect' mirrors about the edge including the edge pixel (d c b a | a b c d).
    """
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / float(sigma)) ** 2)
    weights /= weights.sum()
    m = np.zeros((size, size), dtype=np.float64)
    period = 2 * size
    for i in range(size):
        src = np.mod(i + offsets, period)
        src = np.where(src >= size, period - 1 - src, src)
        np.add.at(m[i], src, weights)
    return m


def _separable(x: paddle.Tensor, rows: np.ndarray, cols: np.ndarray) -> paddle.Tensor:
    """rows @ x @ cols^T over the last two axes of x."""
    dtype = "float64" if x.dtype == paddle.float64 else "float32"
    r = paddle.to_tensor(rows.astype(dtype))
    c = paddle.to_tensor(cols.T.astype(dtype).copy())
    return paddle.matmul(paddle.matmul(r, x), c)


def raw_anomaly_map(teacher_feats: list[paddle.Tensor], student_feats: list[paddle.Tensor],
                    out_size: int | tuple[int, int]) -> paddle.Tensor:
    """[N, H, W] sum over scales of upsampled 1 - cos(teacher, student) over channels."""
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else out_size
    total = None
    for t, s in zip(teacher_feats, student_feats):
        distance = 1.0 - F.cosine_similarity(t, s, axis=1, eps=1e-8)  # [N, h, w]
        h, w = distance.shape[-2:]
        up = _separable(distance, bilinear_matrix(h, out_h), bilinear_matrix(w, out_w))
        total = up if total is None else total + up
    return total


def gaussian_smooth(maps: paddle.Tensor, sigma: float = SIGMA) -> paddle.Tensor:
    """scipy.ndimage.gaussian_filter(map, sigma) (truncate 4, reflect) over [..., H, W]."""
    h, w = maps.shape[-2:]
    return _separable(maps, gaussian_matrix(h, sigma), gaussian_matrix(w, sigma))


def anomaly_map(teacher_feats: list[paddle.Tensor], student_feats: list[paddle.Tensor],
                out_size: int | tuple[int, int], sigma: float = SIGMA) -> paddle.Tensor:
    """Smoothed anomaly map [N, H, W], as the reference's evaluation (amap_mode 'a')."""
    return gaussian_smooth(raw_anomaly_map(teacher_feats, student_feats, out_size), sigma)


def image_scores(maps: paddle.Tensor) -> paddle.Tensor:
    """Image anomaly score [N]: the maximum of each smoothed map."""
    return maps.flatten(1).max(axis=1)
