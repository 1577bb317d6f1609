"""The registry (`pyggml_resnet.pretrained`): torchvision's official checkpoints, their defaults, and the names
that stand for them, against torchvision 0.29.1's own table (copied below from its source)."""

import pytest

from pyggml_resnet import arch, pretrained
from pyggml_resnet.errors import InputError

# torchvision 0.29.1, torchvision/models/resnet.py: every ResNet*_Weights, ResNeXt*_Weights and
# Wide_ResNet*_Weights url.
TORCHVISION_URLS = {
    "resnet18.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet50.IMAGENET1K_V2": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "resnet101.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnet101.IMAGENET1K_V2": "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
    "resnet152.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
    "resnet152.IMAGENET1K_V2": "https://download.pytorch.org/models/resnet152-f82ba261.pth",
    "resnext50_32x4d.IMAGENET1K_V1": "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth",
    "resnext50_32x4d.IMAGENET1K_V2": "https://download.pytorch.org/models/resnext50_32x4d-1a0047aa.pth",
    "resnext101_32x8d.IMAGENET1K_V1": "https://download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth",
    "resnext101_32x8d.IMAGENET1K_V2": "https://download.pytorch.org/models/resnext101_32x8d-110c445d.pth",
    "resnext101_64x4d.IMAGENET1K_V1": "https://download.pytorch.org/models/resnext101_64x4d-173b62eb.pth",
    "wide_resnet50_2.IMAGENET1K_V1": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    "wide_resnet50_2.IMAGENET1K_V2": "https://download.pytorch.org/models/wide_resnet50_2-9ba9bcbe.pth",
    "wide_resnet101_2.IMAGENET1K_V1": "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth",
    "wide_resnet101_2.IMAGENET1K_V2": "https://download.pytorch.org/models/wide_resnet101_2-d733dc28.pth",
}
# The weights torchvision evaluates at resize 232 (ImageClassification(crop_size=224, resize_size=232)): every
# IMAGENET1K_V2, and resnext101_64x4d's only weights, trained with the same new recipe.
RESIZE_232 = {n for n in TORCHVISION_URLS if n.endswith("IMAGENET1K_V2")} | {"resnext101_64x4d.IMAGENET1K_V1"}


def test_registry_is_torchvisions():
    assert {name: p.url for name, p in pretrained.PRETRAINED.items()} == TORCHVISION_URLS
    for name, p in pretrained.PRETRAINED.items():
        assert name == f"{p.arch}.{p.weights}"
        assert (p.preprocessing.resize, p.preprocessing.crop) == ((232, 224) if name in RESIZE_232 else (256, 224))
        assert p.preprocessing.interpolation == "bilinear"
        assert p.preprocessing.mean == (0.485, 0.456, 0.406) and p.preprocessing.std == (0.229, 0.224, 0.225)
    assert sum(p.default for p in pretrained.PRETRAINED.values()) == len(arch.BY_NAME)  # one default each
    assert pretrained.DEFAULT_WEIGHTS == {
        "resnet18": "IMAGENET1K_V1", "resnet34": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V2",
        "resnet101": "IMAGENET1K_V2", "resnet152": "IMAGENET1K_V2", "resnext50_32x4d": "IMAGENET1K_V2",
        "resnext101_32x8d": "IMAGENET1K_V2", "resnext101_64x4d": "IMAGENET1K_V1",
        "wide_resnet50_2": "IMAGENET1K_V2", "wide_resnet101_2": "IMAGENET1K_V2"}


def test_names():
    assert pretrained.resolve("resnet101").url == TORCHVISION_URLS["resnet101.IMAGENET1K_V2"]
    assert pretrained.resolve("resnet18").url == TORCHVISION_URLS["resnet18.IMAGENET1K_V1"]
    v1 = pretrained.resolve("resnet101.IMAGENET1K_V1")
    assert v1 == pretrained.resolve("resnet101:IMAGENET1K_V1") == pretrained.resolve("ResNet101.imagenet1k_v1")
    assert (v1.weights, v1.url, v1.preprocessing.resize) == ("IMAGENET1K_V1",
                                                             TORCHVISION_URLS["resnet101.IMAGENET1K_V1"], 256)
    assert pretrained.resolve("resnet50.DEFAULT") == pretrained.resolve("resnet50")
    # Wide ResNets and ResNeXts: every architecture has torchvision's weights.
    assert set(pretrained.DEFAULT_WEIGHTS) == set(arch.BY_NAME)
    wide = pretrained.resolve("Wide_ResNet50_2.imagenet1k_v1")
    assert (wide.arch, wide.url, wide.preprocessing.resize) == ("wide_resnet50_2",
                                                                TORCHVISION_URLS["wide_resnet50_2.IMAGENET1K_V1"], 256)
    resnext = pretrained.resolve("resnext101_64x4d")
    assert (resnext.weights, resnext.preprocessing.resize) == ("IMAGENET1K_V1", 232)
    # A mirror keeps the registry's weights name and preprocessing; an unknown name needs url= and is custom.
    mirror = pretrained.resolve("resnet50", url="http://mirror/resnet50-11ad3fa6.pth")
    assert (mirror.weights, mirror.preprocessing.resize, mirror.url) == ("IMAGENET1K_V2", 232,
                                                                         "http://mirror/resnet50-11ad3fa6.pth")
    custom = pretrained.resolve("resnet50.my_finetune", url="http://host/ft.pth")
    assert (custom.arch, custom.weights, custom.preprocessing.resize) == ("resnet50", "my_finetune", 256)
    for bad in ("resnet18.IMAGENET1K_V2", "resnet50.my_finetune", "vgg16", "resnet50.", "", "resnet200",
                "resnet50.gguf"):
        with pytest.raises(InputError):
            pretrained.resolve(bad)
