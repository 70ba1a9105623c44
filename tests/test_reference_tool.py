"""tools/reference.py: the reference RD4AD read from a checkout at run time, for the
benchmark. A stand-in checkout (tiny torch models, the reference's function names, and
top-level imports of packages that are not installed) shows what is imported and run."""

import numpy as np
import pytest

from tools.reference import Reference
from utils.errors import UserError

ENCODERS = '''
import torch.nn as nn
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
    def forward(self, x):
        return [self.conv(x)]
class Bottleneck(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
    def forward(self, feats):
        return self.conv(feats[0])
def tiny(pretrained=False):
    assert not pretrained, "the benchmark never downloads"
    return Encoder(), Bottleneck()
'''
DECODERS = '''
import torch.nn as nn
class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
    def forward(self, x):
        return [self.conv(x)]
def de_tiny(pretrained=False):
    return Decoder()
'''
MAIN = '''
import torchvision_is_not_installed
open("MARKER", "w").write("the file's top level ran")
def loss_fucntion(a, b):
    return sum(torch.mean(1 - F.cosine_similarity(x.flatten(1), y.flatten(1))) for x, y in zip(a, b))
'''
TEST = '''
import cv2_is_not_installed
def cal_anomaly_map(fs_list, ft_list, out_size=224, amap_mode='mul'):
    total = np.zeros([out_size, out_size])
    for fs, ft in zip(fs_list, ft_list):
        a_map = torch.unsqueeze(1 - F.cosine_similarity(fs, ft), dim=1)
        total += F.interpolate(a_map, size=out_size, mode='bilinear', align_corners=True)[0, 0].numpy()
    return total, []
'''


def checkout(folder, **files):
    contents = {"resnet.py": ENCODERS, "de_resnet.py": DECODERS, "main.py": MAIN, "test.py": TEST, **files}
    folder.mkdir(exist_ok=True)
    for name, text in contents.items():
        if text is not None:
            (folder / name).write_text(text)
    return str(folder)


def test_reference_steps_run_from_the_checkout_without_its_top_level_imports(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")  # optional: only --reference uses it
    monkeypatch.chdir(tmp_path)
    ref = Reference(checkout(tmp_path / "RD4AD"))
    images = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    encoder, bottleneck, decoder = ref.build("tiny")
    step = ref.training_step("tiny", images)
    step()
    run = ref.inference("tiny", images[:1])
    smoothed = run()
    assert smoothed.shape == (16, 16) and np.isfinite(smoothed).all() and smoothed.min() >= 0
    assert not (tmp_path / "MARKER").exists()  # only the named function of main.py was compiled
    assert isinstance(ref.loss(encoder(torch.zeros(1, 3, 8, 8)), encoder(torch.ones(1, 3, 8, 8))), torch.Tensor)


def test_a_training_step_changes_the_student_and_not_the_teacher(tmp_path):
    torch = pytest.importorskip("torch")
    ref = Reference(checkout(tmp_path / "RD4AD"))
    built = []
    original = ref.build
    ref.build = lambda arch: built.append(original(arch)) or built[-1]
    step = ref.training_step("tiny", np.ones((2, 3, 8, 8), np.float32))
    encoder, bottleneck, decoder = built[0]
    before = [p.detach().clone() for p in (encoder.conv.weight, decoder.conv.weight)]
    step()
    assert torch.equal(before[0], encoder.conv.weight)  # not in the optimizer, as in the reference
    assert not torch.equal(before[1], decoder.conv.weight)


@pytest.mark.parametrize("missing", ["resnet.py", "test.py"])
def test_a_folder_that_is_not_a_checkout_is_one_clear_line(tmp_path, missing):
    pytest.importorskip("torch")
    folder = checkout(tmp_path / "RD4AD", **{missing: None})
    with pytest.raises(UserError, match=f"no {missing} there"):
        Reference(folder)


def test_a_checkout_without_the_function_or_the_arch_is_named(tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(UserError, match=r"main.py: no function loss_fucntion\(\)"):
        Reference(checkout(tmp_path / "a", **{"main.py": "def other(): pass\n"}))
    ref = Reference(checkout(tmp_path / "b"))
    with pytest.raises(UserError, match="the reference has no wide_resnet50_2"):
        ref.build("wide_resnet50_2")


def test_without_torch_the_flag_says_so(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(UserError, match="PyTorch is not installed"):
        Reference(checkout(tmp_path / "RD4AD"))

