"""The architecture tables (`pyggml_resnet.arch`): configs, tensor names and shapes, and the config a
state_dict describes.

Outside witnesses: the ResNet-101 key list printed in the design document (tests/data/
resnet101_state_dict_keys.txt), torchvision's published parameter counts, and the independent reference
ResNet (tests/reference_resnet.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from pyggml_resnet import arch
from pyggml_resnet.errors import ModelFormatError
from reference_resnet import VARIANTS, resnet, variant

DOC_KEYS = Path(__file__).parent / "data" / "resnet101_state_dict_keys.txt"
LINE = re.compile(r"^(\S+) with shape: \(([\d, ]*)\)$")
DEPTHS = sorted(arch.CONFIGS)
# torchvision's ResNet*_Weights meta["num_params"] (torchvision/models/resnet.py): an outside witness for
# the widths and groups of every builder, torchvision's own and its Wide ResNet / ResNeXt variants.
TORCHVISION_NUM_PARAMS = {
    "resnet18": 11689512, "resnet34": 21797672, "resnet50": 25557032, "resnet101": 44549160,
    "resnet152": 60192808, "resnext50_32x4d": 25028904, "resnext101_32x8d": 88791336,
    "resnext101_64x4d": 83455272, "wide_resnet50_2": 68883240, "wide_resnet101_2": 126886696,
}


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


def test_configs_are_torchvisions():
    assert {d: (c.block, c.layers) for d, c in arch.CONFIGS.items()} == {
        18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
        101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
    assert sorted(arch.BY_NAME) == sorted(TORCHVISION_NUM_PARAMS)
    for name, cfg in arch.BY_NAME.items():
        assert cfg.name == name
        # depth = 2 (stem and fc) + convs per block * blocks
        assert cfg.depth == 2 + (3 if cfg.block == "bottleneck" else 2) * sum(cfg.layers), name


@pytest.mark.parametrize("name", sorted(TORCHVISION_NUM_PARAMS))
def test_expected_tensors_have_torchvisions_parameter_count(name):
    """Every width, group and downsample in the tables, against torchvision's published count."""
    tensors = arch.expected_tensors(arch.BY_NAME[name], 1000)
    learnable = [s for n, s in tensors.items() if not n.endswith((".running_mean", ".running_var"))]
    assert sum(math.prod(s) for s in learnable) == TORCHVISION_NUM_PARAMS[name]


def test_convolutions_and_their_output_sizes():
    convs = list(arch.convolutions(arch.CONFIGS[50]))
    assert len(convs) == 53 and convs[0] == arch.STEM  # 1 stem + 16 blocks * 3 + 4 downsamples
    assert [c.name for c in convs if "downsample" in c.name] == [f"layer{s}.0.downsample.0.weight" for s in range(1, 5)]
    assert arch.STEM.out_size(224) == 112 and arch.STEM.out_size(7) == 4
    strided = [c for c in convs if c.stride == 2]
    assert [c.name for c in strided] == ["conv1.weight"] + [f"layer{s}.0.{k}.weight" for s in (2, 3, 4)
                                                             for k in ("conv2", "downsample.0")]
    grouped = [c for c in arch.convolutions(arch.BY_NAME["resnext50_32x4d"]) if c.groups > 1]
    assert len(grouped) == 16 and all(c.kernel == 3 and c.groups == 32 for c in grouped)


def test_config_for_refuses_what_torchvision_has_not():
    assert arch.config_for("bottleneck", [3, 4, 23, 3], 32, 8) == arch.BY_NAME["resnext101_32x8d"]
    for args, match in [(("basic", [2, 2, 2, 3]), "no torchvision ResNet has basic blocks"),
                        (("bottleneck", [3, 4, 6, 3], 0), "groups must be an integer in 1..1024"),
                        (("bottleneck", [3, 4, 6, 3], 1, 2048), "width_per_group must be an integer in 1..1024"),
                        (("bottleneck", [3, 4, 6, 3], True), "groups must be an integer"),
                        (("basic", [2, 2, 2, 2], 2), "basic blocks .* have groups 1")]:
        with pytest.raises(ModelFormatError, match=match):
            arch.config_for(*args)


def test_infer_config_of_an_incomplete_checkpoint_names_the_nearest():
    shapes = dict(arch.expected_tensors(arch.CONFIGS[101], 10))
    for name in [n for n in shapes if n.startswith("layer3.22.")]:
        del shapes[name]  # 22 blocks in stage 3: no ResNet; resnet101 is the one it falls short of
    assert arch.infer_config(shapes) == (arch.CONFIGS[101], 10)
    with pytest.raises(ModelFormatError, match="tensors do not match resnet101 with 10 classes: missing "
                                               r"\['layer3.22.conv1.weight'"):
        arch.check_tensor_names(arch.CONFIGS[101], 10, list(shapes))
    with pytest.raises(ModelFormatError, match="no 2-D fc.weight"):
        arch.infer_config({k: v for k, v in shapes.items() if not k.startswith("fc.")})


def test_check_tensor_names_names_each_problem():
    names = list(arch.expected_tensors(arch.CONFIGS[18], 10))
    arch.check_tensor_names(arch.CONFIGS[18], 10, names)
    bad = names[1:] + ["extra.weight", "fc.bias"]
    with pytest.raises(ModelFormatError) as info:
        arch.check_tensor_names(arch.CONFIGS[18], 10, bad, ["wrong shape: x"])
    assert str(info.value) == ("tensors do not match resnet18 with 10 classes: missing ['conv1.weight']; "
                               "unexpected ['extra.weight']; listed twice ['fc.bias']; wrong shape: x")


@pytest.mark.parametrize("rename, what", [
    (("conv1.weight", "conv1.0.weight"), "a deep stem"),
    (("layer1.0.bn1.weight", "layer1.0.se.fc1.weight"), "squeeze-and-excitation"),
    (("conv1.weight", "stem.conv.weight"), "a network laid out as stem/stages/head"),
])
def test_unsupported_variants_are_named(rename, what):
    shapes = dict(arch.expected_tensors(arch.CONFIGS[50], 10))
    shapes[rename[1]] = shapes.pop(rename[0])
    with pytest.raises(ModelFormatError, match=f"^unsupported ResNet variant: {what}"):
        arch.infer_config(shapes)


def test_groupnorm_is_an_unsupported_variant():
    shapes = {n: s for n, s in arch.expected_tensors(arch.CONFIGS[50], 10).items()
              if not n.endswith((".running_mean", ".running_var"))}
    assert "GroupNorm" in arch.unsupported_variant(shapes)
    assert arch.unsupported_variant(arch.expected_tensors(arch.CONFIGS[50], 10)) is None


def test_preprocessing_problems():
    assert arch.Preprocessing().problem() is None
    assert dataclasses.asdict(arch.Preprocessing()) == {"resize": 256, "crop": 224, "mean": (0.485, 0.456, 0.406),
                                                        "std": (0.229, 0.224, 0.225), "interpolation": "bilinear",
                                                        "antialias": True}
    assert arch.Preprocessing(crop=0).problem() == "crop must be an integer in 1..8192, got 0"
    assert arch.Preprocessing(resize=9000).problem(keys=True) == ("metadata 'resnet.preprocess.resize' must be an "
                                                                  "integer in 1..8192, got 9000")
    assert "interpolation" in arch.Preprocessing(interpolation="cubic").problem()  # lanczos is Pillow's
    assert "std" in arch.Preprocessing(std=(0.0, 1.0, 1.0)).problem()
