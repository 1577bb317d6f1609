"""The reference ResNet (tests/reference_resnet.py) has torchvision's state_dict: the ResNet-101 key list
printed in the design document is the outside witness (tests/test_arch.py holds arch's side of it).
"""

from __future__ import annotations

import pytest
import torch

from reference_resnet import VARIANTS, make_model, resnet, stages, variant
from test_arch import TORCHVISION_NUM_PARAMS, doc_keys, shapes_of, squeezed

def test_reference_resnet101_matches_doc_keys():
    ref = [(name, squeezed(shape)) for name, shape in shapes_of(101)]
    assert ref == doc_keys()


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
