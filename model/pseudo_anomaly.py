"""RD++'s pseudo-anomalies: a patch of 3-D simplex-noise octaves added to each training image.

As the reference's MVTecDataset_train (tientrandinh/Revisiting-Reverse-Distillation,
dataset/dataset.py and dataset/noise.py): per image, a patch height and width drawn in
[10, size // 8), a top-left corner in [1, size - h) x [1, size - w), filled with
0.2 x (6 octaves of OpenSimplex noise over (channel, row, column), persistence 0.6, first
frequency 32, halved each octave), added to the image in [0, 1] before normalisation; the
draws are numpy's global RNG, in the reference's order (h, w, top, left).

The reference seeds its simplex generator once per dataset (np.random.randint at
construction) and evaluates the noise at the integer coordinates of the patch: with one
seed, the noise is a function of (channel, row, column) only, so every patch is the
top-left crop of one field. This module computes that field once per seed (with the
`opensimplex` package, the same algorithm and permutation as the reference's copy of it)
and crops it: the same numbers as the reference's generator, with no per-image cost.

Below 88 px (where size // 8 <= 10 leaves no room) the lower bound scales with the image,
max(1, size * 10 // 256); at 256 px, the reference's size, the draws are the reference's.
"""
from __future__ import annotations

import numpy as np

OCTAVES = 6
PERSISTENCE = 0.6
FREQUENCY = 32.0
AMPLITUDE = 0.2
CHANNELS = 3
SEED_RANGE = (-10000000000, 10000000000)  # the reference's Simplex_CLASS.newSeed


def simplex_octaves(seed: int, shape: tuple[int, int, int], octaves: int = OCTAVES,
                    persistence: float = PERSISTENCE, frequency: float = FREQUENCY) -> np.ndarray:
    """[Z, Y, X] float64: the reference's Simplex_CLASS.rand_3d_octaves for this seed."""
    from opensimplex import OpenSimplex

    noise_gen = OpenSimplex(int(seed))
    z, y, x = (np.arange(0, n, dtype=np.float64) for n in shape)
    noise = np.zeros(shape, dtype=np.float64)
    amplitude = 1.0
    for _ in range(octaves):
        noise += amplitude * noise_gen.noise3array(x / frequency, y / frequency, z / frequency)
        frequency /= 2
        amplitude *= persistence
    return noise


def patch_bounds(size: int) -> tuple[int, int]:
    """[low, high) of a patch side for a square image of `size` pixels."""
    high = size // 8
    low = 10 if high > 10 else max(1, size * 10 // 256)
    if high <= low:
        raise ValueError(f"image size {size}: too small for RD++'s pseudo-anomalies (need 16 px or more)")
    return low, high


class PseudoAnomalies:
    """Adds simplex-noise patches to normalised batches, one patch per image."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean = np.asarray(mean, np.float64).reshape(CHANNELS, 1, 1)
        self.std = np.asarray(std, np.float64).reshape(CHANNELS, 1, 1)
        self.seed: int | None = None
        self._fields: dict[int, np.ndarray] = {}

    def field(self, size: int) -> np.ndarray:
        """0.2 x the noise field [3, high-1, high-1] all patches of a size-px image crop.
        The seed is drawn from numpy's global RNG at the first call, as the reference
        draws it when its training dataset is built."""
        if self.seed is None:
            self.seed = int(np.random.randint(*SEED_RANGE))
        if size not in self._fields:
            side = patch_bounds(size)[1] - 1
            self._fields[size] = AMPLITUDE * simplex_octaves(self.seed, (CHANNELS, side, side))
        return self._fields[size]

    def patches(self, n: int, size: int) -> np.ndarray:
        """[n, 3, size, size] float64 additive noise in [0, 1] image units (zero off-patch)."""
        low, high = patch_bounds(size)
        field = self.field(size)
        out = np.zeros((n, CHANNELS, size, size), dtype=np.float64)
        for i in range(n):
            h = np.random.randint(low, high)
            w = np.random.randint(low, high)
            top = np.random.randint(1, size - h)
            left = np.random.randint(1, size - w)
            out[i, :, top:top + h, left:left + w] = field[:, :h, :w]
        return out

    def normalised_patches(self, n: int, size: int) -> np.ndarray:
        """The same patches in normalised units: (img + p - mean) / std - (img - mean) / std."""
        return (self.patches(n, size) / self.std).astype(np.float32)
