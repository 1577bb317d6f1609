"""The registry of pretrained weights: torchvision's official ResNet checkpoints as one table, and the names
that stand for them.

Names are ``ARCH`` or ``ARCH.WEIGHTS`` (``ARCH:WEIGHTS`` is accepted too), ARCH one of resnet18/34/50/101/152,
wide_resnet50_2, wide_resnet101_2, resnext50_32x4d, resnext101_32x8d or resnext101_64x4d, and WEIGHTS a
torchvision weights name (IMAGENET1K_V1, IMAGENET1K_V2, or DEFAULT), matched without regard to case. A bare
ARCH means torchvision's DEFAULT weights, the row of the table marked ``default``: IMAGENET1K_V2 where they
exist, else IMAGENET1K_V1. `PRETRAINED` lists the 17 official checkpoints with torchvision 0.29.1's URLs and
preprocessing. Downloading and caching them is `pyggml_resnet.hub`'s job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .arch import BY_NAME, Preprocessing
from .errors import InputError

_V1 = Preprocessing(resize=256, crop=224)  # torchvision's ImageClassification(crop_size=224)
_V2 = Preprocessing(resize=232, crop=224)  # ImageClassification(crop_size=224, resize_size=232): the new recipe


@dataclass(frozen=True)
class Pretrained:
    """One official torchvision checkpoint."""

    arch: str  # "resnet101"
    weights: str  # "IMAGENET1K_V2"
    url: str
    preprocessing: Preprocessing
    default: bool = False  # torchvision's *_Weights.DEFAULT for this architecture

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.weights}"


_BASE = "https://download.pytorch.org/models/"
PRETRAINED: dict[str, Pretrained] = {p.name: p for p in (
    # From torchvision 0.29.1, torchvision/models/resnet.py (ResNet*_Weights).
    Pretrained("resnet18", "IMAGENET1K_V1", _BASE + "resnet18-f37072fd.pth", _V1, default=True),
    Pretrained("resnet34", "IMAGENET1K_V1", _BASE + "resnet34-b627a593.pth", _V1, default=True),
    Pretrained("resnet50", "IMAGENET1K_V1", _BASE + "resnet50-0676ba61.pth", _V1),
    Pretrained("resnet50", "IMAGENET1K_V2", _BASE + "resnet50-11ad3fa6.pth", _V2, default=True),
    Pretrained("resnet101", "IMAGENET1K_V1", _BASE + "resnet101-63fe2227.pth", _V1),
    Pretrained("resnet101", "IMAGENET1K_V2", _BASE + "resnet101-cd907fc2.pth", _V2, default=True),
    Pretrained("resnet152", "IMAGENET1K_V1", _BASE + "resnet152-394f9c45.pth", _V1),
    Pretrained("resnet152", "IMAGENET1K_V2", _BASE + "resnet152-f82ba261.pth", _V2, default=True),
    # ResNeXt*_Weights and Wide_ResNet*_Weights, the same file. resnext101_64x4d has only one version,
    # trained with the new recipe, so its IMAGENET1K_V1 takes the V2 preprocessing.
    Pretrained("resnext50_32x4d", "IMAGENET1K_V1", _BASE + "resnext50_32x4d-7cdf4587.pth", _V1),
    Pretrained("resnext50_32x4d", "IMAGENET1K_V2", _BASE + "resnext50_32x4d-1a0047aa.pth", _V2, default=True),
    Pretrained("resnext101_32x8d", "IMAGENET1K_V1", _BASE + "resnext101_32x8d-8ba56ff5.pth", _V1),
    Pretrained("resnext101_32x8d", "IMAGENET1K_V2", _BASE + "resnext101_32x8d-110c445d.pth", _V2, default=True),
    Pretrained("resnext101_64x4d", "IMAGENET1K_V1", _BASE + "resnext101_64x4d-173b62eb.pth", _V2, default=True),
    Pretrained("wide_resnet50_2", "IMAGENET1K_V1", _BASE + "wide_resnet50_2-95faca4d.pth", _V1),
    Pretrained("wide_resnet50_2", "IMAGENET1K_V2", _BASE + "wide_resnet50_2-9ba9bcbe.pth", _V2, default=True),
    Pretrained("wide_resnet101_2", "IMAGENET1K_V1", _BASE + "wide_resnet101_2-32ee1156.pth", _V1),
    Pretrained("wide_resnet101_2", "IMAGENET1K_V2", _BASE + "wide_resnet101_2-d733dc28.pth", _V2, default=True),
)}
DEFAULT_WEIGHTS = {p.arch: p.weights for p in PRETRAINED.values() if p.default}  # arch -> its DEFAULT


@dataclass(frozen=True)
class Source:
    """What a name stands for: the checkpoint to download and how to label the result."""

    arch: str
    weights: str  # recorded in the GGUF as resnet.weights
    url: str
    preprocessing: Preprocessing


def resolve(name: str, url: str | None = None) -> Source:
    """The checkpoint a name stands for (see the module docstring). Raises InputError for unknown names.

    With ``url`` (a mirror, or your own checkpoint) the registry's URL is replaced. A registry name keeps its
    weights name and preprocessing; ``ARCH.NAME`` with any other NAME means your own weights, recorded as
    NAME, with torchvision's classic preprocessing (resize 256, crop 224).
    """
    if not isinstance(name, str):
        raise InputError(f"a pretrained model name must be a string, got {type(name).__name__}")
    if name.lower().endswith(".gguf"):
        raise InputError(f"{name!r} is a file name, not a pretrained model name: use pyggml_resnet.load()")
    arch, sep, weights = re.match(r"([^.:]*)([.:]?)(.*)$", name.strip(), re.S).groups()
    arch, weights = arch.lower(), weights.strip()
    if arch not in BY_NAME:
        raise InputError(f"unknown pretrained model {name!r}: the architecture must be one of "
                         f"{', '.join(BY_NAME)} (e.g. 'resnet50' or 'resnet50.IMAGENET1K_V1'); to load a "
                         "converted file, give its path")
    if sep and not weights:
        raise InputError(f"{name!r}: give a weights name after {sep!r}, e.g. {arch}.{DEFAULT_WEIGHTS[arch]}")
    wanted = DEFAULT_WEIGHTS[arch] if not weights or weights.upper() == "DEFAULT" else weights
    entry = PRETRAINED.get(f"{arch}.{wanted.upper()}")
    if entry is not None:
        return Source(arch, entry.weights, url or entry.url, entry.preprocessing)
    if url is None:
        known = ", ".join(n for n in PRETRAINED if n.startswith(arch + "."))
        raise InputError(f"no pretrained weights {name!r}; {arch} has {known} (or pass url= for your own)")
    return Source(arch, wanted, url, Preprocessing())
