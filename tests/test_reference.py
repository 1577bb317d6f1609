"""The reference ResNet (tests/reference_resnet.py) has torchvision's state_dict, and so does pyggml_resnet.arch.

The ResNet-101 key list printed in the design document is the outside witness: both the reference model and
arch.expected_tensors must reproduce it, key for key and shape for shape, in order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pyggml_resnet import arch
from reference_resnet import VARIANTS, make_model, resnet, stages, variant

DOC_KEYS = Path(__file__).parent / "data" / "resnet101_state_dict_keys.txt"
LINE = re.compile(r"^(\S+) with shape: \(([\d, ]*)\)$")
DEPTHS = sorted(arch.CONFIGS)


def doc_keys() -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    for line in DOC_KEYS.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        m = LINE.match(line)
        assert m, f"unparsable line {line!r}"
        entries.append((m[1], tuple(int(d) for d in m[2].replace(" ", "").split(",") if d)))
    return entries


def shapes_of(depth: int, num_classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    # On the meta device: shapes without allocating or initializing anything.
    with torch.device("meta"):
        model = resnet(depth, num_classes)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """What tensor.squeeze() does to a shape: the design document's converter squeezed every tensor."""
    return tuple(d for d in shape if d != 1)


def without_counters(entries):
    return [(n, s) for n, s in entries if not n.endswith(".num_batches_tracked")]


def test_doc_key_list_has_626_entries():
    entries = doc_keys()
    assert len(entries) == 626
    assert entries[0] == ("conv1.weight", (64, 3, 7, 7))
    assert entries[-1] == ("fc.bias", (1000,))
    assert len({n for n, _ in entries}) == 626


def test_reference_resnet101_matches_doc_keys():
    ref = [(name, squeezed(shape)) for name, shape in shapes_of(101)]
    assert ref == doc_keys()


def test_arch_resnet101_matches_doc_keys():
    doc = without_counters(doc_keys())
    expected = arch.expected_tensors(arch.CONFIGS[101], 1000)
    assert [(n, squeezed(s)) for n, s in expected.items()] == doc
    # The doc only shows squeezed shapes; the unsqueezed ones come from the reference model.
    assert list(expected.items()) == without_counters(shapes_of(101))


@pytest.mark.parametrize("num_classes", [1000, 10])
@pytest.mark.parametrize("depth", DEPTHS)
def test_arch_matches_reference(depth, num_classes):
    ref = shapes_of(depth, num_classes)
    cfg = arch.CONFIGS[depth]
    assert list(arch.expected_tensors(cfg, num_classes).items()) == without_counters(ref)
    assert arch.infer_config(dict(ref)) == (cfg, num_classes)


@pytest.mark.parametrize("name", VARIANTS)
def test_arch_matches_reference_variants(name):
    """Wide ResNets and ResNeXts: arch's config by name has the reference's keys and shapes, and the config
    is recognised from shapes alone (groups and width from the first block's 3x3 conv)."""
    with torch.device("meta"):
        ref = [(n, tuple(t.shape)) for n, t in variant(name, 10).state_dict().items()]
    cfg = arch.BY_NAME[name]
    assert cfg.name == name and (cfg.depth, cfg.groups, cfg.width_per_group) == VARIANTS[name]
    assert list(arch.expected_tensors(cfg, 10).items()) == without_counters(ref)
    assert arch.infer_config(dict(ref)) == (cfg, 10)


def test_make_model_is_seeded_and_calibrated():
    a, b = make_model(18, seed=3, num_classes=10), make_model(18, seed=3, num_classes=10)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert not torch.equal(a.fc.weight, make_model(18, seed=4, num_classes=10).fc.weight)
    assert not a.training
    # Running statistics were measured, not left at a fresh model's 0 / 1.
    bn = a.layer1[0].bn1
    assert bn.running_mean.abs().max() > 0.01 and (bn.running_var - 1).abs().max() > 0.01
    assert a.layer1[0].bn2.weight.max() < 0.5  # the block's last BatchNorm got a small gain
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = stages(a, x)
        assert torch.equal(a(x), out["logits"])
    assert list(out) == ["stem", "layer1", "layer2", "layer3", "layer4", "features", "logits"]
    assert out["stem"].shape == (1, 64, 56, 56) and out["layer4"].shape == (1, 512, 7, 7)
    assert out["features"].shape == (1, 512) and out["logits"].shape == (1, 10)


@pytest.mark.parametrize("depth", [50, 101])
def test_make_model_has_realistic_activations(depth):
    """Every stage stays O(1) at 224x224, though calibration ran at 64x64: nothing blew up or vanished."""
    model = make_model(depth)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = stages(model, x)
    assert out["layer4"].shape == (1, 2048, 7, 7) and out["logits"].shape == (1, 1000)
    for name, t in out.items():
        assert torch.isfinite(t).all(), name
        assert 0.05 < float(t.abs().mean()) < 10, (name, float(t.abs().mean()))


# torchvision's ResNet*_Weights meta["num_params"] (torchvision/models/resnet.py): an outside witness for
# the widths and groups of every builder, torchvision's own and its Wide ResNet / ResNeXt variants.
TORCHVISION_NUM_PARAMS = {
    "resnet18": 11689512, "resnet34": 21797672, "resnet50": 25557032, "resnet101": 44549160,
    "resnet152": 60192808, "resnext50_32x4d": 25028904, "resnext101_32x8d": 88791336,
    "resnext101_64x4d": 83455272, "wide_resnet50_2": 68883240, "wide_resnet101_2": 126886696,
}


@pytest.mark.parametrize("name", TORCHVISION_NUM_PARAMS)
def test_reference_has_torchvisions_parameter_count(name):
    with torch.device("meta"):
        model = variant(name) if name in VARIANTS else resnet(int(name[len("resnet"):]))
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_NUM_PARAMS[name]


def test_reference_variants_have_torchvisions_widths_and_groups():
    """The bottleneck width is int(planes * width_per_group / 64) * groups, and only conv2 is grouped."""
    with torch.device("meta"):
        resnext, wide = variant("resnext50_32x4d"), variant("wide_resnet50_2")
    shapes = {n: tuple(t.shape) for n, t in resnext.state_dict().items()}
    assert shapes["layer1.0.conv1.weight"] == (128, 64, 1, 1)
    assert shapes["layer1.0.conv2.weight"] == (128, 4, 3, 3) and resnext.layer1[0].conv2.groups == 32
    assert shapes["layer4.2.conv2.weight"] == (1024, 32, 3, 3)
    assert shapes["layer4.2.conv3.weight"] == (2048, 1024, 1, 1)
    assert shapes["layer2.0.downsample.0.weight"] == (512, 256, 1, 1)
    wide_shapes = {n: tuple(t.shape) for n, t in wide.state_dict().items()}
    assert wide_shapes["layer4.2.conv2.weight"] == (1024, 1024, 3, 3) and wide.layer4[2].conv2.groups == 1
    assert list(wide_shapes) == list(shapes)  # the same keys, in the same order, as every bottleneck ResNet
    with pytest.raises(ValueError, match="BasicBlock"):
        resnet(18, groups=2)
