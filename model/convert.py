"""Names of the reference RD4AD (PyTorch) -> names of this project (Paddle)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

# torch BatchNorm buffer suffix -> Paddle's
_BUFFER_SUFFIXES = {".running_mean": "._mean", ".running_var": "._variance"}
_PREFIXES = {"encoder": "teacher.", "bn": "bottleneck.", "decoder": "student.", "proj": "projector."}


def _convert_key(key: str) -> str:
    for torch_suffix, paddle_suffix in _BUFFER_SUFFIXES.items():
        if key.endswith(torch_suffix):
            return key[: -len(torch_suffix)] + paddle_suffix
    return key


def _convert_proj_key(key: str) -> str:
    """RD++'s projector: our 3x3 convolution with bias keeps the bias beside a bias-free
    convolution (model/rdpp.py BiasedConv3x3): proj_a.proj.0.weight -> proj_a.proj.0.conv.weight."""
    return key[: -len(".weight")] + ".conv.weight" if key.endswith(".weight") else key


def convert_reference_state_dicts(arch: str, encoder: Mapping[str, np.ndarray] | None,
                                  bn: Mapping[str, np.ndarray] | None,
                                  decoder: Mapping[str, np.ndarray] | None,
                                  proj: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Map the reference's three state dicts (numpy arrays) onto this project's model.

    encoder -> teacher, bn -> bottleneck, decoder -> student. torch's
    `num_batches_tracked` has no Paddle counterpart and is dropped; fc.weight is
    transposed (Paddle's Linear stores [in, out]). The teacher's layer4 and fc are kept
    under teacher.* although the model has no such layers: they are the only leftovers
    `set_state_dict` sees. Any part may be None (e.g. a torchvision backbone alone).
    proj (RD++'s MultiProjectionLayer) -> projector.
    """
    del arch  # names are the same for every arch; kept for a stable signature
    out: dict[str, np.ndarray] = {}
    for part, state in (("encoder", encoder), ("bn", bn), ("decoder", decoder), ("proj", proj)):
        for key, value in (state or {}).items():
            if key.endswith("num_batches_tracked"):
                continue
            value = np.asarray(value, dtype=np.float32)
            if part == "encoder" and key == "fc.weight":
                value = value.T
            name = _convert_proj_key(key) if part == "proj" else _convert_key(key)
            out[_PREFIXES[part] + name] = np.ascontiguousarray(value)
    return out
