"""Run the reference RD++ (PyTorch + geomloss) on deterministic weights and save its outputs.

    pip install torch geomloss opensimplex numpy scipy
    python tests/make_rdpp_fixture.py --reference_dir PATH/TO/Revisiting-Reverse-Distillation

The reference's model files, projector, losses, anomaly map and noise generator are
imported from a checkout the user supplies (tools/reference_rdpp.py); nothing of it is
copied here. The output, tests/fixtures/parity_rdpp_resnet18.npz, holds only numbers, which
tests/test_rdpp_parity.py compares with this project's RD++, so CI needs neither torch nor
geomloss nor the reference:
- eval (float32): projected features, decoder outputs, anomaly maps and scores as the
  reference's evaluation_multi_proj computes them (cal_anomaly_map, gaussian_filter sigma 4);
- training (float64): six iterations of its main.py loop (gradient accumulation 2: three
  steps of both Adams), each iteration's loss and terms, BatchNorm buffers, and the
  trained model's eval outputs;
- geomloss's Sinkhorn divergence (value and gradients) on a few clouds;
- its pseudo-anomaly draws (Simplex_CLASS seeded from numpy, then per image h, w, top, left
  and the noise patch) for two numpy seeds.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from reference_weights import (deterministic_images, deterministic_noisy, deterministic_projector,  # noqa: E402
                               deterministic_state_dicts, projector_keys)

ARCH = "resnet18"
IMAGE_SIZE = 64
BATCH = 2
ITERATIONS = 6          # 3 optimiser steps with accumulation 2
NOISE_SEEDS = (0, 1)
NOISE_IMAGES = 3
BUFFERS = ("bn.bn1.running_var", "bn.bn_layer.0.bn1.running_mean", "decoder.layer3.1.bn2.running_var",
           "decoder.layer1.0.upsample.1.running_mean")


def sinkhorn_cases(rng) -> list[dict]:
    """Clouds for geomloss: generic batched ones, and the shapes RD++'s two SSOT modes use."""
    def softmax(z, axis=-1):
        e = np.exp(z - z.max(axis, keepdims=True))
        return e / e.sum(axis, keepdims=True)
    flat = softmax(rng.normal(size=(4, 300)))
    pair = softmax(rng.normal(size=(2, 16, 8)))
    return [
        {"x": rng.normal(size=(2, 12, 4)) * 0.4, "y": rng.normal(size=(2, 9, 4)) * 0.4 + 0.3,
         "scaling": 0.5, "diameter": 0.0},
        {"x": rng.normal(size=(3, 16, 8)) * 0.3, "y": rng.normal(size=(3, 16, 8)) * 0.3 + 0.1,
         "scaling": 0.95, "diameter": 1e7},
        {"x": flat, "y": flat[[2, 0, 3, 1]], "scaling": 0.95, "diameter": 1e7},        # as coded
        {"x": pair, "y": pair[[1, 0]], "scaling": 0.95, "diameter": 1e7},               # pairwise
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference_dir", required=True)
    p.add_argument("--out", default=os.path.join(HERE, "fixtures", f"parity_rdpp_{ARCH}.npz"))
    a = p.parse_args()

    import geomloss
    import torch
    from scipy.ndimage import gaussian_filter

    from tools.reference_rdpp import ReferenceRDPP
    ref = ReferenceRDPP(a.reference_dir)
    torch.manual_seed(0)
    encoder, bn, decoder, proj = ref.build(ARCH)
    own_keys = {k: list(v.shape) for k, v in proj.state_dict().items()}
    assert own_keys == projector_keys(ARCH), "reference_weights.projector_keys differs from the reference"
    weights = deterministic_state_dicts(ARCH)
    weights["proj"] = deterministic_projector(ARCH)
    for module, part in ((encoder, "encoder"), (bn, "bn"), (decoder, "decoder"), (proj, "proj")):
        module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights[part].items()})
    images = deterministic_images(BATCH, IMAGE_SIZE)
    noisy = deterministic_noisy(images)
    out: dict[str, np.ndarray] = {"image_size": np.array(IMAGE_SIZE), "noisy": noisy}

    def eval_pass(prefix: str, dtype) -> None:
        for m in (encoder, bn, decoder, proj):
            m.eval()
        with torch.no_grad():   # evaluation_multi_proj, one image at a time as its loader
            maps = []
            for i in range(BATCH):
                img = torch.from_numpy(images[i:i + 1].astype(dtype))
                inputs = encoder(img)
                features = proj(inputs)
                outputs = decoder(bn(features))
                amap, _ = ref.anomaly_map(inputs, outputs, img.shape[-1], amap_mode="a")
                maps.append(gaussian_filter(amap, sigma=4))
                for k in range(3 if prefix == "eval_" else 0):  # features: the untrained model's only
                    out.setdefault(f"{prefix}projected_{k}", []).append(features[k][0].numpy())
                    out.setdefault(f"{prefix}student_{k}", []).append(outputs[k][0].numpy())
            for k in range(3 if prefix == "eval_" else 0):
                out[f"{prefix}projected_{k}"] = np.stack(out[f"{prefix}projected_{k}"])
                out[f"{prefix}student_{k}"] = np.stack(out[f"{prefix}student_{k}"])
            out[prefix + "anomaly_map"] = np.stack(maps).astype(np.float64)
            out[prefix + "scores"] = np.array([m.max() for m in maps])

    eval_pass("eval_", np.float32)

    # Training as main.py, in float64 (see tests/test_parity.py for why float64).
    for m in (encoder, bn, decoder, proj):
        m.double()
    encoder.eval(); bn.train(); decoder.train(); proj.train()  # noqa: E702
    proj_loss = ref.train_module.Revisit_RDLoss()
    opt_proj = torch.optim.Adam(list(proj.parameters()), lr=0.001, betas=(0.5, 0.999))
    opt_distill = torch.optim.Adam(list(decoder.parameters()) + list(bn.parameters()), lr=0.005, betas=(0.5, 0.999))
    records = {k: [] for k in ("loss", "kd", "proj", "ssot", "reconstruct", "contrast")}
    for i in range(ITERATIONS):
        flip = (lambda x: x[..., ::-1].copy()) if i % 2 else (lambda x: x)
        img, img_noise = torch.from_numpy(flip(images).astype(np.float64)), torch.from_numpy(flip(noisy).astype(np.float64))
        inputs, inputs_noise = encoder(img), encoder(img_noise)
        feature_space_noise, feature_space = proj(inputs, features_noise=inputs_noise)
        l_proj = proj_loss(inputs_noise, feature_space_noise, feature_space)
        terms = ref.loss_terms(proj_loss, inputs_noise, feature_space_noise, feature_space)
        again = (terms["ssot"] + 0.01 * terms["reconstruct"] + 0.1 * terms["contrast"]) / 1.11
        assert abs(float(again) - float(l_proj)) < 1e-12, "loss_terms does not add up to Revisit_RDLoss"
        outputs = decoder(bn(feature_space))
        l_distill = ref.train_module.loss_fucntion(inputs, outputs)
        loss = l_distill + 0.2 * l_proj
        loss.backward()
        if (i + 1) % 2 == 0:
            opt_proj.step(); opt_distill.step()  # noqa: E702
            opt_proj.zero_grad(); opt_distill.zero_grad()  # noqa: E702
        for key, value in (("loss", loss), ("kd", l_distill), ("proj", l_proj), *terms.items()):
            records[key].append(float(value))
    for key, values in records.items():
        out["train_" + key] = np.array(values)
    states = {"bn": bn.state_dict(), "decoder": decoder.state_dict()}
    for name in BUFFERS:
        part, key = name.split(".", 1)
        out["buffer:" + name] = states[part][key].numpy()
    eval_pass("trained_", np.float64)

    # Reconstruction and contrast on correlated features, where the contrast's hinge is
    # active (on the deterministic model above, cos(noisy teacher, projected) < 0.5: 0).
    rng = np.random.default_rng(11)
    base = [rng.normal(size=(BATCH, c, s, s)) for c, s in ((8, 6), (16, 3), (32, 2))]
    first = [b + 0.3 * rng.normal(size=b.shape) for b in base]
    second = [torch.tensor(b + 0.6 * rng.normal(size=b.shape), requires_grad=True) for b in base]
    terms = ref.loss_terms(proj_loss, [torch.tensor(f) for f in first], [torch.tensor(f) for f in first], second)
    (terms["reconstruct"] + terms["contrast"]).backward()
    for k in range(3):
        out[f"terms_first_{k}"], out[f"terms_second_{k}"] = first[k], second[k].detach().numpy()
        out[f"terms_grad_second_{k}"] = second[k].grad.numpy()
    out["terms_reconstruct"], out["terms_contrast"] = float(terms["reconstruct"]), float(terms["contrast"])

    rng = np.random.default_rng(7)
    for k, case in enumerate(sinkhorn_cases(rng)):
        loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, diameter=case["diameter"] or None,
                                    scaling=case["scaling"], debias=True, backend="tensorized")
        x = torch.tensor(case["x"], requires_grad=True)
        y = torch.tensor(case["y"], requires_grad=True)
        value = loss(x, y)
        value.sum().backward()
        out.update({f"sinkhorn{k}_x": case["x"], f"sinkhorn{k}_y": case["y"],
                    f"sinkhorn{k}_scaling": np.array(case["scaling"]), f"sinkhorn{k}_diameter": np.array(case["diameter"]),
                    f"sinkhorn{k}_value": value.detach().numpy(), f"sinkhorn{k}_grad_x": x.grad.numpy(),
                    f"sinkhorn{k}_grad_y": y.grad.numpy()})

    size = 256
    for s in NOISE_SEEDS:
        np.random.seed(s)
        simplex = ref.simplex_class()   # draws its seed from numpy, as MVTecDataset_train
        boxes, patches = [], []
        for _ in range(NOISE_IMAGES):  # MVTecDataset_train.__getitem__'s draws, in its order
            h_noise = np.random.randint(10, int(size // 8))
            w_noise = np.random.randint(10, int(size // 8))
            start_h = np.random.randint(1, size - h_noise)
            start_w = np.random.randint(1, size - w_noise)
            patch = 0.2 * simplex.rand_3d_octaves((3, h_noise, w_noise), 6, 0.6)
            boxes.append((h_noise, w_noise, start_h, start_w))
            patches.append(patch.ravel())
        out[f"noise{s}_boxes"] = np.array(boxes)
        out[f"noise{s}_patches"] = np.concatenate(patches)

    np.savez_compressed(a.out, **out)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {np.shape(v)}" for k, v in out.items()))


if __name__ == "__main__":
    main()
