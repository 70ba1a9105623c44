"""A trained model back from its checkpoint: the one way main.py (eval, infer), export,
and the benchmark rebuild a network."""
from __future__ import annotations

from utils.checkpoint import CheckpointError, apply_checkpoint, load_checkpoint

from .rd4ad import RD4AD, build_rd4ad


def load_trained(path: str, *, arch: str | None = None, image_size: int | None = None,
                 teacher_weights: str | None = None) -> tuple[RD4AD, dict]:
    """(eval-mode model, checkpoint contents). The checkpoint is read without running code
    and checked part by part; `arch` / `image_size`, when given, must match it. The
    teacher: the one the checkpoint carries (trained with a random teacher), else
    `teacher_weights` when given, else the one the checkpoint names."""
    state = load_checkpoint(path, arch=arch, image_size=image_size)
    if "teacher" in state:
        source = "none"  # the checkpoint's own teacher is applied below
    else:
        source = teacher_weights or state["teacher_weights"]
        if source.lower() == "none":
            raise CheckpointError(f"{path}: trained with teacher weights {state['teacher_weights']!r}; "
                                  f"--teacher_weights none would pair it with a random teacher")
    net = build_rd4ad(state["arch"], source, state["image_size"])
    apply_checkpoint(net, state, path)
    net.eval()
    return net, state
