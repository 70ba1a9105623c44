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


@functools.lru_cache(maxsize=32)
def smoothed_upsampling_matrix(in_size: int, out_size: int, sigma: float = SIGMA) -> np.ndarray:
    """[out_size, in_size]: bilinear upsampling then Gaussian smoothing along one axis.

    Both are linear, so smoothing the sum of upsampled maps equals summing maps upsampled
    by G @ B: one matrix product per axis and scale instead of two.
    """
    return gaussian_matrix(out_size, sigma) @ bilinear_matrix(in_size, out_size)


# Floors of _scaled, whose product is the eps (1e-8) of F.cosine_similarity and of the
# reference's torch CosineSimilarity. Both are float16 numbers, and so is the product of
# two norm floors (a zero vector's cosine is 0 / 1e-4, not 0 / 0).
SCALE_FLOOR = 1e-6
NORM_FLOOR = 1e-2


def _scaled(x: paddle.Tensor, axis: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """(x / s, max(||x / s||, NORM_FLOOR)) along `axis`, s = max(max |x|, SCALE_FLOOR):
    elements within +-1, a norm within [1, sqrt(n)] (n: the elements summed). The scale
    carries no gradient: the cosine does not depend on it."""
    scaled = x / paddle.clip(x.abs().max(axis=axis, keepdim=True), min=SCALE_FLOOR).detach()
    return scaled, paddle.clip(paddle.sqrt((scaled * scaled).sum(axis=axis)), min=NORM_FLOOR)


def cosine_similarity(a: paddle.Tensor, b: paddle.Tensor, axis: int) -> paddle.Tensor:
    """Cosine similarity along `axis` that cannot overflow in float16.

    F.cosine_similarity (as the reference's torch CosineSimilarity) divides a.b by
    sqrt(max(|a|^2 |b|^2, 1e-16)). Paddle Inference's --precision fp16 on GPU runs those
    ops in float16, where |a|^2 |b|^2 overflows past 65504 (256 channels near 4 already):
    the cosine becomes 0 and the map 1 (past about 256, a_i b_i overflows: NaN). Here each
    vector is first divided by its largest |element|, so no value computed exceeds n (the
    channels, at most 1024): the scaled vectors' dot product over their norms. It equals
    a.b / (max(|a|, 1e-8) max(|b|, 1e-8)): the reference's (up to rounding) whenever |a|,
    |b| and |a| |b| are at least 1e-8, and 0 for a zero vector as the reference's."""
    a_scaled, a_norm = _scaled(a, axis)
    b_scaled, b_norm = _scaled(b, axis)
    return (a_scaled * b_scaled).sum(axis=axis) / (a_norm * b_norm)


def cosine_distance(teacher: paddle.Tensor, student: paddle.Tensor) -> paddle.Tensor:
    """[N, h, w] 1 - cosine similarity over channels."""
    return 1.0 - cosine_similarity(teacher, student, axis=1)


def _separable(x: paddle.Tensor, rows: paddle.Tensor, cols_t: paddle.Tensor) -> paddle.Tensor:
    """rows @ x @ cols_t over the last two axes of x (cols_t: the column matrix, transposed)."""
    if rows.dtype != x.dtype:  # float64 features (parity tests): the matrices follow them
        rows, cols_t = rows.astype(x.dtype), cols_t.astype(x.dtype)
    return paddle.matmul(paddle.matmul(rows, x), cols_t)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class AnomalyMapHead(paddle.nn.Layer):
    """Teacher and student features -> (anomaly maps [N, H, W], image scores [N]).

    Per scale 1 - cos(teacher, student), bilinearly upsampled (align_corners=True) to the
    image, summed, Gaussian smoothed (sigma 4), as the reference's evaluation; the score
    is the map's maximum. Upsampling and smoothing are folded into one fixed matrix per
    axis and scale, kept as buffers, so the head exports to a static graph and ONNX
    unchanged. The only implementation: evaluation, export and tests all use it.
    """

    def __init__(self, feature_sizes: list, image_size: int | tuple[int, int], sigma: float = SIGMA,
                 smooth: bool = True) -> None:
        super().__init__()
        out_h, out_w = _pair(image_size)
        matrix = (lambda n_in, n_out: smoothed_upsampling_matrix(n_in, n_out, sigma)) if smooth \
            else bilinear_matrix
        self.num_scales = len(feature_sizes)
        for k, size in enumerate(feature_sizes):
            h, w = _pair(size)
            self.register_buffer(f"rows_{k}", paddle.to_tensor(matrix(h, out_h).astype(np.float32)))
            self.register_buffer(f"cols_t_{k}", paddle.to_tensor(matrix(w, out_w).T.astype(np.float32)))

    @classmethod
    def for_image(cls, image_size: int, strides: tuple[int, ...], sigma: float = SIGMA) -> "AnomalyMapHead":
        return cls([image_size // s for s in strides], image_size, sigma)

    def forward(self, teacher_feats: list[paddle.Tensor],
                student_feats: list[paddle.Tensor]) -> tuple[paddle.Tensor, paddle.Tensor]:
        total = None
        for k in range(self.num_scales):
            term = _separable(cosine_distance(teacher_feats[k], student_feats[k]),
                              getattr(self, f"rows_{k}"), getattr(self, f"cols_t_{k}"))
            total = term if total is None else total + term
        return total, image_scores(total)


def image_scores(maps: paddle.Tensor) -> paddle.Tensor:
    """Image anomaly score [N]: the maximum of each smoothed map."""
    return maps.flatten(1).max(axis=1)
