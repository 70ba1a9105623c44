"""Run the reference RD4AD (PyTorch) on deterministic weights and save its outputs.

    pip install torch numpy scipy
    python tests/make_parity_fixture.py --reference_dir PATH/TO/hq-deng/RD4AD

The reference's model code (resnet.py, de_resnet.py) and its loss and anomaly-map
functions (main.py `loss_fucntion`, test.py `cal_anomaly_map`) are imported from a
checkout the user supplies; nothing of it is copied here. The output,
tests/fixtures/parity_resnet18.npz, holds only numbers, which tests/test_parity.py
compares with this project's Paddle model, so CI needs neither torch nor the reference.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_weights import deterministic_images, deterministic_state_dicts  # noqa: E402

IMAGE_SIZE = 64
BATCH = 2
TRAIN_STEPS = 3
# resnet18: full features, then three float64 Adam steps. wide_resnet50_2 (the default
# arch, other block types): inference plus one train-mode forward, in float32, storing the
# first channels of each feature map only, to keep the fixture small.
SETTINGS = {
    "resnet18": {"channels": None, "train_steps": TRAIN_STEPS,
                 "buffers": ("bn.bn1.running_var", "bn.bn_layer.0.bn1.running_mean",
                             "decoder.layer3.1.bn2.running_var",
                             "decoder.layer1.0.upsample.1.running_mean")},
    "wide_resnet50_2": {"channels": 8, "train_steps": 0,
                        "buffers": ("bn.bn_layer.0.bn2.running_var",
                                    "decoder.layer2.0.bn2.running_var",
                                    "decoder.layer3.2.bn3.running_mean")},
}


def _load_function(path: str, name: str, namespace: dict):
    """Exec one top-level function of a reference file (its module imports need not work)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference_dir", required=True)
    p.add_argument("--arch", default="resnet18", choices=sorted(SETTINGS))
    p.add_argument("--out", help="default: tests/fixtures/parity_ARCH.npz")
    a = p.parse_args()
    arch, settings = a.arch, SETTINGS[a.arch]
    out_path = a.out or os.path.join(os.path.dirname(__file__), "fixtures", f"parity_{arch}.npz")
    channels = settings["channels"]

    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    sys.path.insert(0, a.reference_dir)
    import de_resnet  # noqa: E402  (reference)
    import resnet  # noqa: E402  (reference)

    ns = {"torch": torch, "F": F, "np": np}
    loss_fn = _load_function(os.path.join(a.reference_dir, "main.py"), "loss_fucntion", ns)
    cal_anomaly_map = _load_function(os.path.join(a.reference_dir, "test.py"), "cal_anomaly_map", ns)

    torch.manual_seed(0)
    encoder, bn = getattr(resnet, arch)(pretrained=False)
    decoder = getattr(de_resnet, "de_" + arch)(pretrained=False)
    weights = deterministic_state_dicts(arch)
    for module, part in ((encoder, "encoder"), (bn, "bn"), (decoder, "decoder")):
        module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights[part].items()})
    del weights
    images = torch.from_numpy(deterministic_images(BATCH, IMAGE_SIZE))
    out: dict[str, np.ndarray] = {"image_size": np.array(IMAGE_SIZE),
                                  "channels": np.array(channels or 0)}

    def eval_pass(prefix: str) -> None:
        encoder.eval(); bn.eval(); decoder.eval()
        with torch.no_grad():
            inputs = encoder(images)
            outputs = decoder(bn(inputs))
            out[prefix + "loss"] = np.array(loss_fn(inputs, outputs).item())
            maps = []
            for i in range(BATCH):
                amap, _ = cal_anomaly_map([o[i:i + 1] for o in inputs], [o[i:i + 1] for o in outputs],
                                          IMAGE_SIZE, amap_mode="a")
                maps.append(gaussian_filter(amap, sigma=4))
            out[prefix + "anomaly_map"] = np.stack(maps).astype(np.float64)
            for i, (t, s) in enumerate(zip(inputs, outputs)):
                if prefix == "eval_":  # the teacher is frozen: its features never change
                    out[f"teacher_{i}"] = t[:, :channels].numpy()
                out[f"{prefix}student_{i}"] = s[:, :channels].numpy()

    def store_buffers() -> None:
        states = {"bn": bn.state_dict(), "decoder": decoder.state_dict()}
        for name in settings["buffers"]:
            part, key = name.split(".", 1)
            out["buffer:" + name] = states[part][key].numpy()

    eval_pass("eval_")
    encoder.eval(); bn.train(); decoder.train()

    if settings["train_steps"] == 0:
        # One forward in train mode: batch statistics and torch's running-statistics update.
        with torch.no_grad():
            inputs = encoder(images)
            out["train_mode_loss"] = np.array(loss_fn(inputs, decoder(bn(inputs))).item())
        store_buffers()
    else:
        # Training as the reference's main.py: encoder eval, bn + decoder train, Adam(0.5,
        # 0.999). In float64: in float32 a pre-activation within rounding noise of 0 can flip
        # a ReLU and Adam's first steps (about lr * sign(grad)) amplify that into 1e-3
        # differences, which would hide a real mismatch.
        for module in (encoder, bn, decoder):
            module.double()
        images = images.double()
        optimizer = torch.optim.Adam(list(decoder.parameters()) + list(bn.parameters()),
                                     lr=0.005, betas=(0.5, 0.999))
        losses = []
        for step in range(settings["train_steps"]):
            batch = images if step % 2 == 0 else images.flip(-1)
            inputs = encoder(batch)
            loss = loss_fn(inputs, decoder(bn(inputs)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        out["train_losses"] = np.array(losses)
        store_buffers()
        eval_pass("trained_")

    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


if __name__ == "__main__":
    main()
