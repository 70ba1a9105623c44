"""Student decoder: a ResNet run backwards (hq-deng/RD4AD de_resnet.py).

Each stage upsamples 2x with a learned 2x2 transposed convolution, so the student's
outputs have the teacher's layer3, layer2, layer1 shapes. Returned in teacher order.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn

from .layers import InplaceReLU, TorchBatchNorm2D, conv1x1, conv3x3, deconv2x2, reference_init_


class DeBasicBlock(nn.Layer):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 upsample: nn.Layer | None = None, width_per_group: int = 64) -> None:
        super().__init__()
        self.conv1 = deconv2x2(inplanes, planes) if stride == 2 else conv3x3(inplanes, planes)
        self.bn1 = TorchBatchNorm2D(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = TorchBatchNorm2D(planes)
        self.relu = InplaceReLU()
        self.upsample = upsample

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.upsample is None else self.upsample(x)
        return self.relu(out + identity)


class DeBottleneck(nn.Layer):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 upsample: nn.Layer | None = None, width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = TorchBatchNorm2D(width)
        self.conv2 = deconv2x2(width, width) if stride == 2 else conv3x3(width, width)
        self.bn2 = TorchBatchNorm2D(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = TorchBatchNorm2D(planes * self.expansion)
        self.relu = InplaceReLU()
        self.upsample = upsample

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.upsample is None else self.upsample(x)
        return self.relu(out + identity)


class Student(nn.Layer):
    def __init__(self, block: type, layers: tuple[int, int, int], width_per_group: int = 64) -> None:
        super().__init__()
        self.inplanes = 512 * block.expansion
        self.layer1 = self._make_stage(block, 256, layers[0], width_per_group)
        self.layer2 = self._make_stage(block, 128, layers[1], width_per_group)
        self.layer3 = self._make_stage(block, 64, layers[2], width_per_group)
        reference_init_(self)

    def _make_stage(self, block: type, planes: int, num_blocks: int, width: int) -> nn.Sequential:
        out_ch = planes * block.expansion
        upsample = nn.Sequential(deconv2x2(self.inplanes, out_ch), TorchBatchNorm2D(out_ch))
        blocks = [block(self.inplanes, planes, 2, upsample, width)]
        self.inplanes = out_ch
        blocks += [block(out_ch, planes, 1, None, width) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def forward(self, embedding: paddle.Tensor) -> list[paddle.Tensor]:
        a = self.layer1(embedding)  # teacher layer3's shape
        b = self.layer2(a)          # teacher layer2's shape
        c = self.layer3(b)          # teacher layer1's shape
        return [c, b, a]


def build_student(arch) -> Student:
    """The decoder for a row of model/arch.py: the teacher's stages, reversed."""
    return Student(arch.student_block, arch.student_layers, arch.width_per_group)
