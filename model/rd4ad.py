"""RD4AD: frozen teacher -> one-class bottleneck -> student decoder."""
from __future__ import annotations

import paddle
import paddle.nn as nn

from .bottleneck import build_bottleneck
from .student import build_student
from .teacher import Teacher, load_teacher_weights


class RD4AD(nn.Layer):
    def __init__(self, arch: str = "wide_resnet50_2") -> None:
        super().__init__()
        self.arch = arch
        self.teacher = Teacher(arch)
        self.bottleneck = build_bottleneck(arch)
        self.student = build_student(arch)

    def train(self) -> "RD4AD":
        # The teacher is frozen: its BatchNorm must keep ImageNet statistics.
        super().train()
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[paddle.Tensor]:
        """Bottleneck + student parameters (what the optimizer updates)."""
        return [p for p in self.bottleneck.parameters() + self.student.parameters()
                if not p.stop_gradient]

    @paddle.no_grad()
    def teacher_features(self, images: paddle.Tensor) -> list[paddle.Tensor]:
        return self.teacher(images)

    def student_features(self, teacher_feats: list[paddle.Tensor]) -> list[paddle.Tensor]:
        """Bottleneck + student: what training updates, from (possibly cached) teacher features."""
        return self.student(self.bottleneck(teacher_feats))

    def student_branch(self) -> nn.Layer:
        """Bottleneck + student as one Layer (teacher features -> student features), the
        part that trains: what paddle.DataParallel wraps."""
        return StudentBranch(self.bottleneck, self.student)

    def forward(self, images: paddle.Tensor) -> tuple[list[paddle.Tensor], list[paddle.Tensor]]:
        teacher_feats = self.teacher_features(images)
        return teacher_feats, self.student_features(teacher_feats)


class StudentBranch(nn.Layer):
    def __init__(self, bottleneck: nn.Layer, student: nn.Layer) -> None:
        super().__init__()
        self.bottleneck, self.student = bottleneck, student

    def forward(self, teacher_feats: list[paddle.Tensor]) -> list[paddle.Tensor]:
        return self.student(self.bottleneck(teacher_feats))


def build_rd4ad(arch: str = "wide_resnet50_2", teacher_weights: str = "imagenet") -> RD4AD:
    """Build the model; `teacher_weights` is "imagenet", "none" or a .pdparams path."""
    net = RD4AD(arch)
    load_teacher_weights(net.teacher, teacher_weights)
    return net
