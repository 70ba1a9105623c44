"""The reference RD++ (github.com/tientrandinh/Revisiting-Reverse-Distillation, PyTorch),
loaded from a local checkout at run time: for tests/make_rdpp_fixture.py, the live parity
tests and tools/benchmark.py --reference_rdpp. Nothing of it is copied into this repository.

What is loaded, from the checkout as it is:
- model/resnet.py, model/de_resnet.py (teacher, OCBE, decoder; RD4AD's files);
- utils/utils_train.py (MultiProjectionLayer, Revisit_RDLoss, loss_fucntion), with its one
  `.to('cuda')` (Revisit_RDLoss's target) read as `.to('cpu')` so that it runs on the CPU;
- cal_anomaly_map of utils/utils_test.py (read out of the file: importing it whole needs
  cv2, skimage and pandas, which nothing here uses);
- dataset/noise.py's Simplex_CLASS; when numba is not installed its @njit decorators are
  read as plain Python (the same arithmetic, slower).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.reference import _function, _import  # noqa: E402
from utils.errors import UserError  # noqa: E402

FILES = ("model/resnet.py", "model/de_resnet.py", "utils/utils_train.py", "utils/utils_test.py",
         "dataset/noise.py")
CUDA_TARGET = ".to('cuda')"


class ReferenceRDPP:
    """The reference RD++'s builders, projector, losses, anomaly map and noise generator."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("geomloss") is None:
            raise UserError(f"--reference_rdpp {folder}: needs PyTorch and geomloss (pip install torch geomloss)")
        for name in FILES:
            if not os.path.isfile(os.path.join(folder, name)):
                raise UserError(f"--reference_rdpp {folder}: no {name} there; give a checkout of "
                                f"tientrandinh/Revisiting-Reverse-Distillation")
        import torch
        import torch.nn.functional as F
        self.torch = torch
        self.encoders = _import(os.path.join(folder, "model/resnet.py"), "rdpp_reference_resnet")
        self.decoders = _import(os.path.join(folder, "model/de_resnet.py"), "rdpp_reference_de_resnet")
        self.train_module = _import_on_cpu(os.path.join(folder, "utils/utils_train.py"))
        self.anomaly_map = _function(os.path.join(folder, "utils/utils_test.py"), "cal_anomaly_map",
                                     {"torch": torch, "F": F, "np": np})
        self._noise_path = os.path.join(folder, "dataset/noise.py")
        self._noise_module = None

    @property
    def simplex_class(self) -> type:
        if self._noise_module is None:
            self._noise_module = _import_noise(self._noise_path)
        return self._noise_module.Simplex_CLASS

    def build(self, arch: str) -> tuple:
        """(encoder, bn, decoder, proj) of `arch`, randomly initialised (no download)."""
        make_encoder = getattr(self.encoders, arch, None)
        make_decoder = getattr(self.decoders, "de_" + arch, None)
        if make_encoder is None or make_decoder is None:
            raise UserError(f"--reference_rdpp {self.folder}: the reference has no {arch}")
        encoder, bn = make_encoder(pretrained=False)
        # MultiProjectionLayer(base): widths base*4, base*8, base*16 = the teacher's layer1..3
        base = {"resnet18": 16, "resnet34": 16}.get(arch, 64)
        proj = self.train_module.MultiProjectionLayer(base=base)
        return encoder, bn, make_decoder(pretrained=False), proj

    def loss_terms(self, loss_module, noised_feature, projected_noised, projected_normal) -> dict:
        """Revisit_RDLoss's three terms, computed by its own sub-modules with the arguments
        its forward gives them (forward returns only their weighted sum)."""
        torch = self.torch
        n = projected_normal[0].shape[0]
        flat = [p.view(n, -1) for p in projected_normal]
        perm = torch.randperm(n)
        ssot = sum(loss_module.sinkhorn(torch.softmax(f, -1), torch.softmax(f[perm], -1)) for f in flat)
        reconstruct = sum(loss_module.reconstruct(a, b) for a, b in zip(projected_noised, projected_normal))
        target = -torch.ones(n)
        contrast = sum(loss_module.contrast(t.view(n, -1), f, target=target) for t, f in zip(noised_feature, flat))
        return {"ssot": ssot, "reconstruct": reconstruct, "contrast": contrast}

    def training_step(self, arch: str, images: np.ndarray, noisy: np.ndarray,
                      accumulation: int = 2) -> Callable[[], float]:
        """One of the reference's training iterations (main.py): teacher on both batches (not
        under no_grad), projector, Revisit_RDLoss, OCBE, decoder, loss_fucntion, backward;
        both Adam steps every `accumulation` iterations. Returns the loss."""
        torch = self.torch
        encoder, bn, decoder, proj = self.build(arch)
        encoder.eval()
        bn.train(); decoder.train(); proj.train()  # noqa: E702
        proj_loss = self.train_module.Revisit_RDLoss()
        opt_proj = torch.optim.Adam(list(proj.parameters()), lr=0.001, betas=(0.5, 0.999))
        opt_distill = torch.optim.Adam(list(decoder.parameters()) + list(bn.parameters()), lr=0.005,
                                       betas=(0.5, 0.999))
        img, img_noise = torch.from_numpy(images), torch.from_numpy(noisy)
        counter = [0]

        def step() -> float:
            inputs = encoder(img)
            inputs_noise = encoder(img_noise)
            feature_space_noise, feature_space = proj(inputs, features_noise=inputs_noise)
            l_proj = proj_loss(inputs_noise, feature_space_noise, feature_space)
            outputs = decoder(bn(feature_space))
            loss = self.train_module.loss_fucntion(inputs, outputs) + 0.2 * l_proj
            loss.backward()
            counter[0] += 1
            if counter[0] % accumulation == 0:
                opt_proj.step(); opt_distill.step()  # noqa: E702
                opt_proj.zero_grad(); opt_distill.zero_grad()  # noqa: E702
            return float(loss.detach())
        return step


def _import_on_cpu(path: str) -> types.ModuleType:
    """utils_train.py with Revisit_RDLoss's `.to('cuda')` read as `.to('cpu')`."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    if source.count(CUDA_TARGET) != 1:
        raise UserError(f"{path}: expected one {CUDA_TARGET} (Revisit_RDLoss's target); is this "
                        f"commit 7f2ceb7 of Revisiting-Reverse-Distillation?")
    module = types.ModuleType("rdpp_reference_utils_train")
    module.__file__ = path
    exec(compile(source.replace(CUDA_TARGET, ".to('cpu')"), path, "exec"), module.__dict__)
    return module


def _import_noise(path: str) -> types.ModuleType:
    if importlib.util.find_spec("numba") is None:
        stub = types.ModuleType("numba")

        def njit(*args, **kwargs):
            if args and callable(args[0]):
                return args[0]
            return lambda fn: fn
        stub.njit, stub.prange = njit, range
        sys.modules.setdefault("numba", stub)
    return _import(path, "rdpp_reference_noise")
