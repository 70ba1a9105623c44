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
