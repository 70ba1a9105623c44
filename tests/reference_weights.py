"""Deterministic, reference-keyed weights for parity tests (no file needed: a formula).

Each array is drawn from a generator seeded by the crc32 of its reference name, so the
PyTorch side (tests/make_parity_fixture.py) and the Paddle side get identical weights.
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np

SHARED_KEYS = os.path.join(os.path.dirname(__file__), "fixtures")


def reference_keys(arch: str) -> dict[str, dict[str, list[int]]]:
    """{'encoder'|'bn'|'decoder': {name: shape}} of the reference model."""
    with open(os.path.join(SHARED_KEYS, f"keys_{arch}.json"), encoding="utf-8") as f:
        return json.load(f)


def deterministic_array(part: str, name: str, shape: list[int]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{part}.{name}".encode()))
    shape = tuple(shape)
    if name.endswith("num_batches_tracked"):
        return np.array(0, dtype=np.int64)
    if name.endswith("running_var"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("running_mean") or name.endswith(".bias"):
        return rng.normal(0.0, 0.1, shape).astype(np.float32)
    if len(shape) == 1:  # BatchNorm weight
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    fan = int(np.prod(shape[1:]))
    return (rng.normal(0.0, 1.0, shape) * np.sqrt(1.0 / fan)).astype(np.float32)


def deterministic_state_dicts(arch: str) -> dict[str, dict[str, np.ndarray]]:
    """{'encoder', 'bn', 'decoder'} -> {reference name: array}."""
    return {part: {name: deterministic_array(part, name, shape) for name, shape in keys.items()}
            for part, keys in reference_keys(arch).items()}


def deterministic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, 3, size, size)).astype(np.float32)


# RD++'s projector (the reference's MultiProjectionLayer): per teacher scale of C channels,
# four 3x3 convolutions with bias, C -> C/2 -> C/4 -> C/2 -> C, at nn.Sequential indices
# 0, 3, 6, 9 (InstanceNorm and LeakyReLU between them have no parameters).
PROJECTOR_CHANNELS = {"resnet18": (64, 128, 256), "wide_resnet50_2": (256, 512, 1024)}


def projector_keys(arch: str) -> dict[str, list[int]]:
    """{name: shape} of the reference's MultiProjectionLayer for `arch`'s teacher widths."""
    keys: dict[str, list[int]] = {}
    for branch, c in zip(("proj_a", "proj_b", "proj_c"), PROJECTOR_CHANNELS[arch]):
        widths = [c, c // 2, c // 4, c // 2, c]
        for k, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            keys[f"{branch}.proj.{3 * k}.weight"] = [c_out, c_in, 3, 3]
            keys[f"{branch}.proj.{3 * k}.bias"] = [c_out]
    return keys


def deterministic_projector(arch: str) -> dict[str, np.ndarray]:
    """The reference projector's state dict ('proj' of an RD++ checkpoint), by formula."""
    return {name: deterministic_array("proj", name, shape) for name, shape in projector_keys(arch).items()}


def deterministic_noisy(images: np.ndarray, seed: int = 1) -> np.ndarray:
    """`images` with one deterministic additive patch each (normalised units): the
    pseudo-anomalous copy of RD++'s loss, fixed so both sides see the same input."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    n, _, size, _ = images.shape
    for i in range(n):
        h, w = rng.integers(size // 8, size // 3, 2)
        top, left = rng.integers(1, size - h), rng.integers(1, size - w)
        out[i, :, top:top + h, left:left + w] += rng.normal(0.0, 0.5, (3, h, w)).astype(images.dtype)
    return out


def assert_close(ours, ref, what: str, rtol: float = 1e-4) -> None:
    """Parity: the largest difference relative to the reference's largest magnitude."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert err <= rtol, f"{what}: relative error {err:.2e}"
