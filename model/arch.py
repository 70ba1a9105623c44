"""One row per backbone: everything that differs between architectures.

A new backbone is one new row here (teacher constructor, residual blocks, depths, widths,
feature channels). The teacher, the OCBE bottleneck, the student, the memory estimate and
the config's --arch choices all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from paddle.vision.models import resnet as paddle_resnet
from paddle.vision.models.resnet import BasicBlock, BottleneckBlock

from .student import DeBasicBlock, DeBottleneck

# The teacher's layer1, layer2, layer3 run at these strides of the input image.
FEATURE_STRIDES = (4, 8, 16)
STEM_CHANNELS, STEM_STRIDE = 64, 2  # conv1's output: the largest activation of the teacher


@dataclass(frozen=True)
class Arch:
    name: str
    teacher: Callable                     # paddle.vision ResNet constructor (pretrained=False)
    block: type                           # the teacher's residual block, reused by OCBE
    student_block: type                   # its mirror image in the decoder
    oce_blocks: int                       # residual blocks of OCBE's one-class embedding
    student_layers: tuple[int, int, int]  # decoder blocks per stage (the teacher's, reversed)
    width_per_group: int                  # 128: the "wide" ResNet's doubled bottleneck width
    feature_channels: tuple[int, int, int]  # channels of layer1, layer2, layer3

    def floats_per_pixel(self) -> float:
        """Floats of the teacher's three feature maps per input pixel."""
        return sum(c / s ** 2 for c, s in zip(self.feature_channels, FEATURE_STRIDES))


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("resnet18", paddle_resnet.resnet18, BasicBlock, DeBasicBlock, 2, (2, 2, 2), 64, (64, 128, 256)),
    Arch("resnet34", paddle_resnet.resnet34, BasicBlock, DeBasicBlock, 3, (3, 4, 6), 64, (64, 128, 256)),
    Arch("resnet50", paddle_resnet.resnet50, BottleneckBlock, DeBottleneck, 3, (3, 4, 6), 64, (256, 512, 1024)),
    Arch("wide_resnet50_2", paddle_resnet.wide_resnet50_2, BottleneckBlock, DeBottleneck, 3, (3, 4, 6), 128,
         (256, 512, 1024)),
)}
ARCH_NAMES = tuple(ARCHS)


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(ARCH_NAMES)}") from None
