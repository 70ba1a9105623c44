"""Teacher-feature cache: the frozen teacher's features of each training image, once.

The teacher never changes and the engine feeds it the training images as decoded (a
model's training-time transform may add inputs, e.g. RD++'s noisy copies, but may not
change inputs["images"]: engine/train.py checks), so its features of a training image are
the same every epoch. Computing them once per class removes the teacher's forward from
every step; only model.teacher_features is cached (model/base.py). Stored as float16 (about 3.6 MB per 256 px image with
wide_resnet50_2), in memory, or in a memory-mapped file when larger than a budget.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import paddle
from paddle.io import DataLoader, Sampler
from tqdm import tqdm


class EpochBatchSampler(Sampler):
    """Shuffled index batches, a fresh seeded permutation per epoch (no drop_last).

    Both the image loader and the feature cache draw batches from it, so training with
    and without the cache sees the same images in the same order.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        order = self.rng.permutation(self.num_samples)
        for start in range(0, self.num_samples, self.batch_size):
            yield order[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.num_samples + self.batch_size - 1) // self.batch_size


class TeacherFeatureCache:
    """float16 teacher features [N, C_k, H_k, W_k] for k = 1..3, indexable by batch."""

    def __init__(self, scales: list[np.ndarray], files: list[str]) -> None:
        self.scales = scales
        self._files = files

    @classmethod
    @paddle.no_grad()
    def build(cls, teacher: Callable[[paddle.Tensor], list], loader: DataLoader, num_samples: int,
              budget_mb: float, spill_dir: str, desc: str = "teacher features",
              dtype: str = "float16") -> "TeacherFeatureCache":
        """Run the teacher (a model's teacher_features, or the teacher Layer itself, put
        in eval mode) once over `loader` (unshuffled, yields images first)."""
        dtype = np.dtype(dtype)
        if isinstance(teacher, paddle.nn.Layer):
            teacher.eval()
        scales: list[np.ndarray] = []
        files: list[str] = []
        i = 0
        for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
            feats = teacher(batch[0])
            if not scales:
                shapes = [(num_samples, *f.shape[1:]) for f in feats]
                total_mb = sum(int(np.prod(s)) for s in shapes) * dtype.itemsize / 2**20
                if total_mb <= budget_mb:
                    scales = [np.empty(s, dtype=dtype) for s in shapes]
                else:  # too big for memory: one memory-mapped file per scale
                    os.makedirs(spill_dir, exist_ok=True)
                    for s in shapes:
                        fd, path = tempfile.mkstemp(prefix=".feature_cache_", suffix=".bin", dir=spill_dir)
                        os.close(fd)
                        files.append(path)
                        scales.append(np.memmap(path, dtype=dtype, mode="w+", shape=s))
            n = feats[0].shape[0]
            for store, f in zip(scales, feats):
                store[i:i + n] = f.numpy().astype(dtype)
            i += n
        return cls(scales, files)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.scales)

    @property
    def on_disk(self) -> bool:
        return bool(self._files)

    def batch(self, indices: list[int]) -> list[paddle.Tensor]:
        # float16 crosses to the device, then widens there: half the host-to-GPU traffic
        return [paddle.to_tensor(s[indices]).astype("float32") for s in self.scales]

    def close(self) -> None:
        """Drop the arrays and remove spill files."""
        self.scales = []
        for path in self._files:
            if os.path.exists(path):
                os.remove(path)
        self._files = []
