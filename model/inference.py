"""The deployable pipeline: image batch -> (anomaly map, image score), one Layer."""
from __future__ import annotations

import paddle
import paddle.nn as nn

from utils.anomaly import SIGMA, AnomalyMapHead

from .rd4ad import RD4AD

# ResNet feature strides of layer1, layer2, layer3
FEATURE_STRIDES = (4, 8, 16)


class InferenceModel(nn.Layer):
    """teacher (layer1..3) -> bottleneck -> student -> anomaly-map head, for export.

    Input `image` [N, 3, S, S] float32, ImageNet-normalised. Outputs `anomaly_map`
    [N, S, S] (smoothed, as evaluation) and `score` [N] (its maximum).
    """

    def __init__(self, net: RD4AD, image_size: int, sigma: float = SIGMA) -> None:
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size {image_size} must be a multiple of 32")
        self.teacher = net.teacher
        self.bottleneck = net.bottleneck
        self.student = net.student
        self.head = AnomalyMapHead([image_size // s for s in FEATURE_STRIDES], image_size, sigma)
        self.image_size = image_size
        self.eval()

    def forward(self, image: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        teacher_feats = self.teacher(image)
        student_feats = self.student(self.bottleneck(teacher_feats))
        return self.head(teacher_feats, student_feats)
