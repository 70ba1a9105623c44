"""RD4AD: frozen teacher -> one-class bottleneck -> student decoder -> anomaly-map head.

The model owns its head, the anomalib way: in training mode it returns the teacher's and
the student's features (what the loss compares); in eval mode the anomaly maps and image
scores. Evaluation, export and the tests all run this one forward.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn

from utils.runtime import eager_threads

from .anomaly_map import AnomalyMapHead
from .arch import FEATURE_STRIDES, get_arch
from .bottleneck import build_bottleneck
from .onednn import use_conv_backend
from .student import build_student
from .teacher import Teacher, load_teacher_weights


class RD4AD(nn.Layer):
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

    def features(self, images: paddle.Tensor) -> tuple[list[paddle.Tensor], list[paddle.Tensor]]:
        teacher_feats = self.teacher_features(images)
        return teacher_feats, self.student_features(teacher_feats)

    def student_branch(self) -> nn.Layer:
        """Bottleneck + student as one Layer (teacher features -> student features), the
        part that trains: what paddle.DataParallel wraps."""
        return StudentBranch(self.bottleneck, self.student)

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


class StudentBranch(nn.Layer):
    def __init__(self, bottleneck: nn.Layer, student: nn.Layer) -> None:
        super().__init__()
        self.bottleneck, self.student = bottleneck, student

    def forward(self, teacher_feats: list[paddle.Tensor]) -> list[paddle.Tensor]:
        return self.student(self.bottleneck(teacher_feats))


def build_rd4ad(arch: str = "wide_resnet50_2", teacher_weights: str = "imagenet",
                image_size: int | None = None, conv_backend: str = "auto") -> RD4AD:
    """Build the model; `teacher_weights` is "imagenet", "none" or a .pdparams path;
    `image_size` the size its anomaly-map head is built (and exported) for; `conv_backend`
    what runs its 3x3 and transposed convolutions in the dynamic graph on the CPU (model/onednn.py)."""
    net = RD4AD(arch, image_size)
    load_teacher_weights(net.teacher, teacher_weights)
    net.conv_backend = use_conv_backend(net, conv_backend, eager_threads())
    return net
