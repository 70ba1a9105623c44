"""One-class bottleneck embedding (OCBE): multi-scale feature fusion + one-class embedding.

Mirrors the reference's `BN_layer` (hq-deng/RD4AD resnet.py) so parameter names, shapes
and counts match it exactly.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn

from .layers import TorchBatchNorm2D, conv1x1, conv3x3, reference_init_, use_inplace_relu


class OCBE(nn.Layer):
    """Fuses teacher features [f1, f2, f3] into one compact embedding for the student.

    MFF: f1 goes through two stride-2 3x3 convs, f2 through one, so both reach f3's
    resolution; the three are concatenated. OCE: a ResNet stage (`bn_layer`, stride 2)
    compresses the concatenation. `conv4`/`bn4` are unused in forward, as in the
    reference; they are kept so parameter counts and checkpoints match it.
    """

    def __init__(self, block: type, num_blocks: int, width_per_group: int = 64) -> None:
        super().__init__()
        e = block.expansion
        norm = TorchBatchNorm2D
        self.relu = nn.ReLU()
        self.conv1 = conv3x3(64 * e, 128 * e, 2)
        self.bn1 = norm(128 * e)
        self.conv2 = conv3x3(128 * e, 256 * e, 2)
        self.bn2 = norm(256 * e)
        self.conv3 = conv3x3(128 * e, 256 * e, 2)
        self.bn3 = norm(256 * e)
        self.conv4 = conv1x1(1024 * e, 512 * e, 1)
        self.bn4 = norm(512 * e)

        fused = 3 * 256 * e  # concatenation of three 256*e-channel maps
        planes = 512
        downsample = nn.Sequential(conv1x1(fused, planes * e, 2), norm(planes * e))
        blocks = [block(fused, planes, 2, downsample, 1, width_per_group, 1, norm)]
        blocks += [block(planes * e, planes, 1, None, 1, width_per_group, 1, norm)
                   for _ in range(1, num_blocks)]
        self.bn_layer = nn.Sequential(*blocks)
        use_inplace_relu(self)
        reference_init_(self)

    def forward(self, feats: list[paddle.Tensor]) -> paddle.Tensor:
        f1, f2, f3 = feats
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(f1))))))
        l2 = self.relu(self.bn3(self.conv3(f2)))
        return self.bn_layer(paddle.concat([l1, l2, f3], axis=1))


def build_bottleneck(arch) -> OCBE:
    """OCBE for a row of model/arch.py: the teacher's block, depth and width."""
    return OCBE(arch.block, arch.oce_blocks, arch.width_per_group)
