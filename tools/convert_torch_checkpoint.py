"""Convert PyTorch weights (torchvision backbone and/or a reference RD4AD or RD++ checkpoint) to Paddle.

    # teacher only (torchvision wide_resnet50_2-32ee1156.pth) -> a --teacher_weights file
    python tools/convert_torch_checkpoint.py --arch wide_resnet50_2 \
        --backbone wide_resnet50_2-32ee1156.pth --out wres50_teacher.pdparams

    # a reference checkpoint ({'bn': ..., 'decoder': ...}) -> this project's class checkpoint
    python tools/convert_torch_checkpoint.py --arch wide_resnet50_2 --image_size 256 \
        --reference wres50_bottle.pth --cls bottle --out output/bottle/model.pdparams

    # a reference RD++ checkpoint ({'proj': ..., 'bn': ..., 'decoder': ...}) -> an RD++ one
    python tools/convert_torch_checkpoint.py --arch wide_resnet50_2 --image_size 256 \
        --reference wres50_bottle.pth --cls bottle --out output/bottle/model.pdparams

Every weight of the file is converted or the file is refused: a key the tool does not know
(a part other than 'bn', 'decoder' and RD++'s 'proj', or a weight the model does not have)
is an error, never dropped.

Give both to also write the teacher next to the checkpoint (--teacher_out). torch is needed
here only (pip install torch); the rest of the project never imports it.
"""
from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.checkpoint import save_checkpoint  # noqa: E402
from model import ARCHS, build_rd4ad, convert_reference_state_dicts  # noqa: E402
from model.onednn import use_conv_backend  # noqa: E402
from model.rdpp import RDPP  # noqa: E402
from utils.cli import OneLineArgumentParser, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import NotARegularFile, check_regular  # noqa: E402
from utils.io import atomic_write  # noqa: E402
from utils.names import check_class_name  # noqa: E402


class ConvertError(UserError):
    """A file that cannot be converted: one line, exit 2."""


def torch_state_to_numpy(path: str) -> dict:
    """Load a .pth with torch and turn every tensor into a numpy array (nested dicts kept)."""
    try:
        import torch
    except ImportError:
        raise ConvertError("reading .pth files needs PyTorch: pip install torch") from None
    try:
        check_regular(path)  # torch.load would block on a FIFO
    except (NotARegularFile, OSError) as err:
        raise ConvertError(f"{path}: cannot read ({getattr(err, 'reason', None) or err.strerror})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConvertError(f"{path}: cannot read as a PyTorch file ({err})") from None

    def to_numpy(x):
        if isinstance(x, dict):
            return {k: to_numpy(v) for k, v in x.items()}
        return x.detach().cpu().numpy() if hasattr(x, "detach") else x
    return to_numpy(obj)


def teacher_state(arch: str, backbone: dict) -> dict:
    """Plain Paddle ResNet state dict (conv1.weight, ...) from a torchvision one, for
    --teacher_weights. layer4/fc are dropped: the teacher does not have them."""
    converted = convert_reference_state_dicts(arch, backbone, None, None)
    return {k[len("teacher."):]: v for k, v in converted.items()
            if not k.startswith(("teacher.layer4.", "teacher.fc."))}


REFERENCE_PARTS = {"rd4ad": ("bn", "decoder"), "rdpp": ("proj", "bn", "decoder")}
OUR_PARTS = {"bn": "bottleneck.", "decoder": "student.", "proj": "projector."}


def reference_model(reference: dict) -> str:
    """"rdpp" for an RD++ checkpoint (it has 'proj'), "rd4ad" for RD4AD's; any other key is
    refused (converting part of a model would write one that scores differently)."""
    if not isinstance(reference, dict):
        raise ConvertError(f"reference checkpoint must be a dict of state dicts (holds {type(reference).__name__})")
    name = "rdpp" if "proj" in reference else "rd4ad"
    parts = REFERENCE_PARTS[name]
    unknown = sorted(str(k) for k in reference if k not in parts)
    missing = [k for k in parts if k not in reference]
    if unknown or missing:
        raise ConvertError(f"reference checkpoint holds {sorted(map(str, reference))}: this tool converts "
                           f"RD4AD's 'bn' + 'decoder' and RD++'s 'proj' + 'bn' + 'decoder' "
                           f"({'unknown ' + repr(unknown[0]) if unknown else repr(missing[0]) + ' missing'})")
    if not all(isinstance(reference[k], dict) for k in parts):
        raise ConvertError("reference checkpoint: 'proj', 'bn' and 'decoder' must be state dicts")
    return name


def convert(arch: str, backbone: dict | None, reference: dict | None, image_size: int,
            cls: str, out: str, teacher_out: str | None) -> list[str]:
    """Write the requested Paddle files; return their paths. Shapes are checked by
    loading everything into a real model first: RD4AD for a reference RD4AD checkpoint,
    RD++ (projector included) for an RD++ one."""
    import paddle

    written = []
    name = reference_model(reference) if reference is not None else "rd4ad"
    if name == "rdpp":
        net = RDPP(arch, None)  # no anomaly-map head needed: the checkpoint names the size
        use_conv_backend(net, "paddle")
    else:
        net = build_rd4ad(arch, teacher_weights="none")
    state = convert_reference_state_dicts(arch, backbone, reference and reference["bn"],
                                          reference and reference["decoder"], reference and reference.get("proj"))
    own = net.state_dict()
    parts = (("teacher.",) if backbone is not None else ()) + (
        tuple(OUR_PARTS[p] for p in REFERENCE_PARTS[name]) if reference is not None else ())
    for key, value in own.items():
        if key.startswith(parts):
            if key not in state:
                raise ConvertError(f"{key} missing: are these {arch} weights?")
            if list(state[key].shape) != list(value.shape):
                raise ConvertError(f"{key} has shape {list(state[key].shape)}, "
                                 f"{arch} needs {list(value.shape)}: are these {arch} weights?")
    # The teacher's layer4 and fc have no place in the model (it stops at layer3): the
    # only keys left out. Anything else not in the model is refused.
    extra = sorted(k for k in state if k not in own and not k.startswith(("teacher.layer4.", "teacher.fc.")))
    if extra:
        raise ConvertError(f"{extra[0]}: not a weight of the {arch} {name} model; nothing was written")
    net.set_state_dict({k: v for k, v in state.items() if k in own})

    if reference is not None:
        save_checkpoint(out, net, arch=arch, image_size=image_size, epoch=0, cls=cls,
                        extra={"converted_from": f"reference {'RD++' if name == 'rdpp' else 'RD4AD'} (PyTorch)"})
        written.append(out)
    if backbone is not None:
        path = teacher_out or (out if reference is None else
                               os.path.join(os.path.dirname(out) or ".", f"{arch}_teacher.pdparams"))
        tstate = {k: paddle.to_tensor(v) for k, v in teacher_state(arch, backbone).items()}
        atomic_write(path, lambda tmp: paddle.save(tstate, tmp))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(argv))


def run(argv: list[str] | None) -> int:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="wide_resnet50_2", choices=ARCHS)
    p.add_argument("--backbone", help="torchvision ResNet .pth (the teacher)")
    p.add_argument("--reference", help="reference checkpoint .pth: RD4AD's ('bn', 'decoder') or RD++'s "
                                       "('proj', 'bn', 'decoder'), converted into the same model")
    p.add_argument("--image_size", type=int, default=256, help="size the reference model was trained at")
    p.add_argument("--cls", default="unknown", help="class name recorded in the checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--teacher_out", help="where the teacher goes when both inputs are given")
    a = p.parse_args(argv)
    if not a.backbone and not a.reference:
        p.error("give --backbone, --reference, or both")
    check_class_name(a.cls)
    backbone = torch_state_to_numpy(a.backbone) if a.backbone else None
    if isinstance(backbone, dict) and "state_dict" in backbone:
        backbone = backbone["state_dict"]
    reference = torch_state_to_numpy(a.reference) if a.reference else None
    for path in convert(a.arch, backbone, reference, a.image_size, a.cls, a.out, a.teacher_out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
