"""RD4AD: frozen teacher -> one-class bottleneck -> student decoder -> anomaly-map head.

The model owns what it trains (model/base.py): its parts (bottleneck, student), one Adam
group at --lr, its loss (the cosine distillation loss of the reference) and its head. In
eval mode forward gives the anomaly maps and image scores; evaluation, export and the
tests all run this one forward.
"""
from __future__ import annotations

from typing import Any

import paddle
import paddle.nn as nn

from .anomaly_map import AnomalyMapHead
from .arch import FEATURE_STRIDES, get_arch
from .base import AnomalyModel, OptimizerGroup, prepared
from .bottleneck import build_bottleneck
from .loss import cosine_distillation_loss
from .student import build_student
from .teacher import Teacher


class RD4AD(AnomalyModel):
    name = "rd4ad"
    needs_images_with_cache = False  # the loss reads the teacher's features only

    def __init__(self, arch: str = "wide_resnet50_2", image_size: int | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.image_size = image_size
        self.teacher = Teacher(arch)
        self.bottleneck = build_bottleneck(get_arch(arch))
        self.student = build_student(get_arch(arch))
        # The head's matrices depend on the image size: one registered head for the size
        # the model is built for (exported with it), others made on demand and not saved.
        self.head = AnomalyMapHead.for_image(image_size, FEATURE_STRIDES) if image_size else None
        self._other_heads: dict[tuple[int, int], AnomalyMapHead] = {}

    def build_args(self) -> dict[str, Any]:
        return {"arch": self.arch, "image_size": self.image_size}

    def trainable_parts(self) -> dict[str, nn.Layer]:
        return {"bottleneck": self.bottleneck, "student": self.student}

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        """One Adam over bottleneck + student, as the reference."""
        params = [p for p in self.bottleneck.parameters() + self.student.parameters() if not p.stop_gradient]
        return [OptimizerGroup("distillation", params, lr)]

    def loss_terms(self, inputs: dict[str, paddle.Tensor],
                   teacher_feats: list[paddle.Tensor]) -> dict[str, paddle.Tensor]:
        # --amp's float16 student features are widened: the loss is computed in the
        # teacher features' dtype (model/loss.py)
        student_feats = [s if s.dtype == t.dtype else s.astype(t.dtype)
                         for t, s in zip(teacher_feats, self.student_features(teacher_feats))]
        return {"loss": cosine_distillation_loss(teacher_feats, student_feats)}

    def student_features(self, teacher_feats: list[paddle.Tensor]) -> list[paddle.Tensor]:
        """Bottleneck + student: what training updates, from (possibly cached) teacher features."""
        return self.student(self.bottleneck(teacher_feats))

    def features(self, images: paddle.Tensor) -> tuple[list[paddle.Tensor], list[paddle.Tensor]]:
        teacher_feats = self.teacher_features(images)
        return teacher_feats, self.student_features(teacher_feats)

    def head_for(self, height: int, width: int) -> AnomalyMapHead:
        if self.head is not None and (height, width) == (self.image_size, self.image_size):
            return self.head
        if (height, width) not in self._other_heads:
            self._other_heads[(height, width)] = AnomalyMapHead(
                [(height // s, width // s) for s in FEATURE_STRIDES], (height, width))
        return self._other_heads[(height, width)]

    def forward(self, images: paddle.Tensor):
        """Training: (teacher features, student features). Eval: (maps [N, H, W], scores [N])."""
        teacher_feats, student_feats = self.features(images)
        if self.training:
            return teacher_feats, student_feats
        return self.head_for(images.shape[-2], images.shape[-1])(teacher_feats, student_feats)


def build_rd4ad(arch: str = "wide_resnet50_2", teacher_weights: str = "imagenet",
                image_size: int | None = None, conv_backend: str = "auto") -> RD4AD:
    """Build the model; `teacher_weights` is "imagenet", "none" or a .pdparams path;
    `image_size` the size its anomaly-map head is built (and exported) for; `conv_backend`
    what runs its 1x1, 3x3 and transposed convolutions in the dynamic graph on the CPU
    (model/onednn.py)."""
    return prepared(RD4AD(arch, image_size), teacher_weights, conv_backend)
