"""Training loss: cosine distance between teacher and student features."""
from __future__ import annotations

import paddle
import paddle.nn.functional as F


def cosine_distillation_loss(teacher_feats: list[paddle.Tensor],
                             student_feats: list[paddle.Tensor]) -> paddle.Tensor:
    """Sum over scales of mean over the batch of 1 - cos(flattened teacher, flattened student).

    Each sample's whole feature map (C*H*W) is one vector, as the reference's
    `loss_fucntion` (torch CosineSimilarity, eps 1e-8). Its inputs are always float32 or
    float64 (train.py widens --amp's float16 student features and the float16 feature
    cache), where |t|^2 |s|^2 cannot overflow: the anomaly map's float16-safe cosine
    (anomaly_map.cosine_similarity) would only slow training down here.
    """
    terms = [paddle.mean(1.0 - F.cosine_similarity(t.flatten(1), s.flatten(1), axis=1, eps=1e-8))
             for t, s in zip(teacher_feats, student_feats)]
    return paddle.add_n(terms)
