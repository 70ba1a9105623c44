"""Names of the reference RD4AD (PyTorch) -> names of this project (Paddle)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

# torch BatchNorm buffer suffix -> Paddle's
_BUFFER_SUFFIXES = {".running_mean": "._mean", ".running_var": "._variance"}
_PREFIXES = {"encoder": "teacher.", "bn": "bottleneck.", "decoder": "student."}


def _convert_key(key: str) -> str:
    for torch_suffix, paddle_suffix in _BUFFER_SUFFIXES.items():
        if key.endswith(torch_suffix):
            return key[: -len(torch_suffix)] + paddle_suffix
    return key


def convert_reference_state_dicts(arch: str, encoder: Mapping[str, np.ndarray] | None,
                                  bn: Mapping[str, np.ndarray] | None,
                                  decoder: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Map the reference's three state dicts (numpy arrays) onto this project's model.

    encoder -> teacher, bn -> bottleneck, decoder -> student. torch's
    `num_batches_tracked` has no Paddle counterpart and is dropped; fc.weight is
    transposed (Paddle's Linear stores [in, out]). The teacher's layer4 and fc are kept
    under teacher.* although the model has no such layers: they are the only leftovers
    `set_state_dict` sees. Any part may be None (e.g. a torchvision backbone alone).
    """
    del arch  # names are the same for every arch; kept for a stable signature
    out: dict[str, np.ndarray] = {}
    for part, state in (("encoder", encoder), ("bn", bn), ("decoder", decoder)):
        for key, value in (state or {}).items():
            if key.endswith("num_batches_tracked"):
                continue
            value = np.asarray(value, dtype=np.float32)
            if part == "encoder" and key == "fc.weight":
                value = value.T
            out[_PREFIXES[part] + _convert_key(key)] = np.ascontiguousarray(value)
    return out
