"""The torchvision ResNet family: one config per depth (and per Wide ResNet / ResNeXt variant), its tensor
names and shapes, and our GGUF keys.

Both ends of the data flow use this module: the converter checks a checkpoint against `expected_tensors`
before writing a GGUF file, and the loader checks the file against it again before building a graph.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import reprlib
import struct
from dataclasses import dataclass

from .errors import ModelFormatError

GGUF_ARCH = "resnet"  # general.architecture
# The resize filters `transforms.preprocess` implements: Pillow's, as torchvision's Resize uses them on PIL images.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
UNALIASED = ("bilinear", "bicubic")  # the filters torch's interpolate (antialias=False) runs
MAX_IMAGE_SIZE = 8192  # the largest resize or crop a model file may record


class Key:
    """GGUF metadata keys written by the converter and read by the loader."""

    ARCH = "general.architecture"
    NAME = "general.name"
    DEPTH = "resnet.depth"
    BLOCK = "resnet.block"  # "basic" or "bottleneck"
    LAYERS = "resnet.layers"  # blocks per stage, e.g. [3, 4, 23, 3]
    WIDTH = "resnet.width_per_group"  # torchvision's width_per_group: 64, 128 (Wide ResNet), 4 or 8 (ResNeXt)
    GROUPS = "resnet.groups"  # of each bottleneck's 3x3 conv: 1, or 32 / 64 (ResNeXt)
    NUM_CLASSES = "resnet.num_classes"
    BN_EPS = "resnet.batchnorm_eps"
    LABELS = "resnet.class_labels"
    WEIGHTS = "resnet.weights"  # e.g. "IMAGENET1K_V2", or "custom"
    RESIZE = "resnet.preprocess.resize"  # N (shorter side), [H, W] (exact size) or "none"
    CROP = "resnet.preprocess.crop"  # N (square), [H, W] or "none"
    MEAN = "resnet.preprocess.mean"
    STD = "resnet.preprocess.std"
    INTERPOLATION = "resnet.preprocess.interpolation"
    ANTIALIAS = "resnet.preprocess.antialias"  # optional, default true (PIL's resize, what older files meant)
    # int8 files (docs/gguf.md): one entry per int8 convolution (every ungrouped one), in graph order.
    INPUT_SCALE = "resnet.int8.input_scale"  # float32: the u8 step of the conv's input
    INPUT_ZERO = "resnet.int8.input_zero_point"  # 0..255: the u8 value of an input of 0.0
    # Optional in int8 files: one entry per downsample conv, in graph order, for its output (the shortcut its
    # block's last conv adds), stored as u8 where they are given and f32 where not (files converted before).
    SHORTCUT_SCALE = "resnet.int8.shortcut_scale"
    SHORTCUT_ZERO = "resnet.int8.shortcut_zero_point"


@dataclass(frozen=True)
class InputQuant:
    """How an int8 conv's f32 input is quantized to u8: q = clamp(rint(x / scale) + zero, 0, 255)."""

    scale: float  # finite, > 0
    zero: int  # 0..255


@dataclass(frozen=True)
class Preprocessing:
    """What the weights were trained to see: torchvision's eval transforms, in this order,
    ``Resize(resize, interpolation, antialias)``, ``CenterCrop(crop)``, ``ToTensor()``, ``Normalize(mean, std)``.
    The defaults are torchvision's classic ImageNet ones.

    resize: N resizes the shorter side to N (``Resize(N)``); (H, W) resizes to exactly H x W, not keeping the
    aspect ratio (``Resize((H, W))``, timm's crop_mode "squash"); None does not resize.
    crop: N center-crops N x N, (H, W) H x W, None does not crop. Without a crop the resize must be (H, W),
    so that every image gives the network the same shape.
    antialias: True is torchvision's Resize on a PIL image (Pillow's filters, always antialiased); False is
    its Resize on a float tensor after ToTensor with ``antialias=False`` (torch's interpolate), for
    "bilinear" or "bicubic" only.
    """

    resize: int | tuple[int, int] | None = 256
    crop: int | tuple[int, int] | None = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    antialias: bool = True

    def __post_init__(self):
        for name in ("resize", "crop", "mean", "std"):  # lists (as JSON and argparse give them) as tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of every array these settings make: the crop's, else the exact resize's."""
        size = self.crop if self.crop is not None else self.resize
        return (size, size) if isinstance(size, int) else tuple(size)

    def problem(self, *, keys: bool = False) -> str | None:
        """Why these settings cannot be used, or None: resize and crop must be integers in 1..MAX_IMAGE_SIZE,
        or two of them (height, width), or None (not both None unless resize is two integers), mean and std
        3 numbers each, finite as float32 (how a file stores them) and std > 0 there, interpolation one of
        INTERPOLATIONS, antialias a bool (False only with one of UNALIASED).
        The one check the converter, the loader and `transforms.preprocess` apply, each raising its own
        error. `keys` names resize and crop by their metadata keys, for messages about a file."""
        for name, key, value in (("resize", Key.RESIZE, self.resize), ("crop", Key.CROP, self.crop)):
            if value is not None and not _is_size(value):
                what = f"metadata {key!r}" if keys else name
                if isinstance(value, tuple):
                    return f"{what} must be two integers (height, width) in 1..{MAX_IMAGE_SIZE}, got {value!r}"
                return f"{what} must be an integer in 1..{MAX_IMAGE_SIZE}, got {reprlib.repr(value)}"
        if self.crop is None and (self.resize is None or isinstance(self.resize, int)):
            return ("without a crop the resize must be an exact (height, width), else each image's shape "
                    f"differs; got resize {self.resize!r}")
        try:
            mean, std = [_float32(v) for v in self.mean], [_float32(v) for v in self.std]
        except (TypeError, ValueError, OverflowError):
            mean = std = []
        if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            return (f"preprocessing mean/std must be 3 finite numbers (std > 0), got {reprlib.repr(self.mean)}, "
                    f"{reprlib.repr(self.std)}")
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            return (f"unknown interpolation {reprlib.repr(self.interpolation)}; expected one of "
                    + ", ".join(INTERPOLATIONS))
        if not isinstance(self.antialias, bool):
            return f"antialias must be True or False, got {reprlib.repr(self.antialias)}"
        if not self.antialias and self.interpolation not in UNALIASED:
            return (f"antialias=False is torch's interpolate, which has no {self.interpolation!r} filter like "
                    f"Pillow's; use one of " + ", ".join(UNALIASED))
        return None


def _is_size(value) -> bool:
    """An integer in 1..MAX_IMAGE_SIZE, or a tuple of two."""
    items = value if isinstance(value, tuple) and len(value) == 2 else (value,) if not isinstance(value, tuple) else ()
    return bool(items) and all(not isinstance(v, bool) and isinstance(v, int) and 0 < v <= MAX_IMAGE_SIZE
                               for v in items)


def _float32(v) -> float:
    """v rounded to float32 (OverflowError beyond its range)."""
    return struct.unpack("<f", struct.pack("<f", float(v)))[0]


MAX_GROUPS = MAX_WIDTH_PER_GROUP = 1024  # far above any published ResNeXt (up to 64 groups, 48 channels each)


@dataclass(frozen=True)
class ResNetConfig:
    depth: int
    block: str  # "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1)
    layers: tuple[int, int, int, int]
    groups: int = 1  # of each bottleneck's 3x3 conv (ResNeXt's cardinality)
    width_per_group: int = 64  # torchvision's: 128 makes a Wide ResNet, 4 or 8 with groups a ResNeXt

    @property
    def name(self) -> str:
        """torchvision's builder name: resnet50, wide_resnet50_2, resnext50_32x4d, ..."""
        if (self.groups, self.width_per_group) == (1, 64):
            return f"resnet{self.depth}"
        if self.groups == 1 and self.width_per_group % 64 == 0:
            return f"wide_resnet{self.depth}_{self.width_per_group // 64}"
        return f"resnext{self.depth}_{self.groups}x{self.width_per_group}d"

    def width(self, stage: int) -> int:
        """Channels of the inner convs of a block in stage 1..4: torchvision's
        int(planes * width_per_group / 64) * groups, planes = 64 * 2**(stage - 1)."""
        return 64 * 2 ** (stage - 1) * self.width_per_group // 64 * self.groups

    def out_channels(self, stage: int) -> int:
        """Channels a block of stage 1..4 outputs: planes * expansion, whatever the width."""
        return 64 * 2 ** (stage - 1) * self.expansion

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def feature_dim(self) -> int:
        return 512 * self.expansion


CONFIGS = {
    18: ResNetConfig(18, "basic", (2, 2, 2, 2)),
    34: ResNetConfig(34, "basic", (3, 4, 6, 3)),
    50: ResNetConfig(50, "bottleneck", (3, 4, 6, 3)),
    101: ResNetConfig(101, "bottleneck", (3, 4, 23, 3)),
    152: ResNetConfig(152, "bottleneck", (3, 8, 36, 3)),
}
# torchvision's Wide ResNets and ResNeXts: (depth, groups, width_per_group).
VARIANTS = ((50, 1, 128), (101, 1, 128), (50, 32, 4), (101, 32, 8), (101, 64, 4))
BY_NAME = {c.name: c for c in (*CONFIGS.values(), *(dataclasses.replace(CONFIGS[d], groups=g, width_per_group=w)
                                                     for d, g, w in VARIANTS))}


def config_for(block: str, layers, groups: int = 1, width_per_group: int = 64) -> ResNetConfig:
    """The config with this block type, per-stage block counts, groups and width per group, or
    ModelFormatError. Any groups and width_per_group a bottleneck network can have are accepted, as
    torchvision's ResNet class accepts them; basic blocks have neither."""
    layers = tuple(int(n) for n in layers)
    for c in CONFIGS.values():
        if c.block == block and c.layers == layers:
            break
    else:
        raise ModelFormatError(f"no torchvision ResNet has {block} blocks {list(layers)}; known: "
                               + ", ".join(f"{c.name} {c.block} {list(c.layers)}" for c in CONFIGS.values()))
    for what, value, limit in (("groups", groups, MAX_GROUPS), ("width_per_group", width_per_group,
                                                                 MAX_WIDTH_PER_GROUP)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise ModelFormatError(f"{what} must be an integer in 1..{limit}, got {value!r}")
    if block == "basic" and (groups, width_per_group) != (1, 64):
        raise ModelFormatError(f"basic blocks (resnet18/34) have groups 1 and width_per_group 64, got groups "
                               f"{groups} and width_per_group {width_per_group}")
    return dataclasses.replace(c, groups=groups, width_per_group=width_per_group)


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{p}": (channels,) for p in ("weight", "bias", "running_mean", "running_var")}


@dataclass(frozen=True)
class Conv:
    """One bias-free convolution and the BatchNorm after it."""

    name: str  # its weight's state_dict name, e.g. "layer1.0.conv2.weight"
    bn: str  # its BatchNorm's prefix, e.g. "layer1.0.bn2"
    in_ch: int
    out_ch: int
    kernel: int  # square
    stride: int
    padding: int
    groups: int = 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """PyTorch's weight shape: [out_ch, in_ch / groups, kernel, kernel]."""
        return self.out_ch, self.in_ch // self.groups, self.kernel, self.kernel

    def out_size(self, n: int) -> int:
        """The output side for an input side of n."""
        return (n + 2 * self.padding - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class Block:
    """One residual block: its place, its channels and whether its shortcut has a downsample conv."""

    stage: int  # 1..4
    index: int  # within the stage
    prefix: str  # e.g. "layer3.0"
    in_ch: int
    width: int  # channels of the inner convs
    out_ch: int
    stride: int  # of the block's strided conv and its downsample
    downsample: bool


STEM = Conv("conv1.weight", "bn1", 3, 64, 7, 2, 3)


def block_names(cfg: ResNetConfig):
    """Every block of the network, in order, as a `Block`."""
    in_ch = STEM.out_ch
    for stage, n_blocks in enumerate(cfg.layers, start=1):
        width, out_ch = cfg.width(stage), cfg.out_channels(stage)
        for b in range(n_blocks):
            stride = 2 if stage > 1 and b == 0 else 1
            down = b == 0 and (stride != 1 or in_ch != out_ch)
            yield Block(stage, b, f"layer{stage}.{b}", in_ch, width, out_ch, stride, down)
            in_ch = out_ch


def block_convs(cfg: ResNetConfig, block: Block) -> tuple[list[Conv], Conv | None]:
    """The one list of a block's convs: those of its main path in order, and its downsample conv (None
    without one). torchvision (V1.5) puts a bottleneck's stride on its 3x3 conv, which is the grouped one."""
    b = block
    if cfg.block == "bottleneck":
        shapes = [(b.in_ch, b.width, 1, 1, 0), (b.width, b.width, 3, b.stride, 1, cfg.groups),
                  (b.width, b.out_ch, 1, 1, 0)]
    else:
        shapes = [(b.in_ch, b.width, 3, b.stride, 1), (b.width, b.out_ch, 3, 1, 1)]
    main = [Conv(f"{b.prefix}.conv{i}.weight", f"{b.prefix}.bn{i}", *shape) for i, shape in enumerate(shapes, start=1)]
    down = None
    if b.downsample:
        down = Conv(f"{b.prefix}.downsample.0.weight", f"{b.prefix}.downsample.1", b.in_ch, b.out_ch, 1, b.stride, 0)
    return main, down


def convolutions(cfg: ResNetConfig):
    """Every conv, in graph order: the stem, then each block's main path and downsample."""
    yield STEM
    for block in block_names(cfg):
        main, down = block_convs(cfg, block)
        yield from main
        if down:
            yield down


def downsamples(cfg: ResNetConfig) -> list[Conv]:
    """Every downsample conv, in graph order."""
    return [down for down in (block_convs(cfg, block)[1] for block in block_names(cfg)) if down]


def conv_prefix(conv: Conv) -> str:
    """The name a conv's tensors other than its weight start with: "layer1.0.conv2" for "layer1.0.conv2.weight"."""
    return conv.name.removesuffix(".weight")


def expected_tensors(cfg: ResNetConfig, num_classes: int, int8: bool = False) -> dict[str, tuple[int, ...]]:
    """Every inference tensor of torchvision's ResNet state_dict (num_batches_tracked left out), in
    state_dict order, with its PyTorch shape; with `int8`, an int8 file's instead (docs/gguf.md): each conv's
    weight with its BatchNorm folded in, its folded bias `.bias` and, ungrouped (stored s8), its per-channel
    `.weight_scale`."""
    t: dict[str, tuple[int, ...]] = {}
    for conv in convolutions(cfg):
        t[conv.name] = conv.shape
        if not int8:
            t.update(_bn(conv.bn, conv.out_ch))
            continue
        t[f"{conv_prefix(conv)}.bias"] = (conv.out_ch,)
        if conv.groups == 1:
            t[f"{conv_prefix(conv)}.weight_scale"] = (conv.out_ch,)
    t["fc.weight"] = (num_classes, cfg.feature_dim)
    t["fc.bias"] = (num_classes,)
    return t


def check_tensor_names(cfg: ResNetConfig, num_classes: int, names, more_problems=(), int8: bool = False) -> None:
    """ModelFormatError unless `names` (a sequence) are exactly `expected_tensors(cfg, num_classes, int8)`, each
    once, naming the first few missing, unexpected and repeated ones (and any `more_problems` the caller found)."""
    expected = expected_tensors(cfg, num_classes, int8)
    counts = collections.Counter(names)  # in the order names first appear
    lists = (("missing", [n for n in expected if n not in counts]),
             ("unexpected", [n for n in counts if n not in expected]),
             ("listed twice", sorted(n for n, k in counts.items() if k > 1)))
    problems = [f"{what} {names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                for what, names in lists if names] + list(more_problems)
    if problems:
        raise ModelFormatError(f"tensors do not match {cfg.name} with {num_classes} classes: " + "; ".join(problems))


def infer_config(shapes: dict[str, tuple[int, ...]]) -> tuple[ResNetConfig, int]:
    """The (config, num_classes) a state_dict's tensor names and shapes describe: the depth from the block
    counts, and for bottleneck networks the groups and width per group from the first block's 3x3 conv
    (weight (width, width / groups, 3, 3), width = width_per_group * groups). Raises ModelFormatError,
    naming what is unsupported for ResNet variants we cannot run (`unsupported_variant`).

    Blocks are counted by any tensor under their name, so a checkpoint that lacks a few tensors is still
    recognised, and the caller can name what is missing; failing an exact match, the smallest config with at
    least as many blocks in each stage is the one it falls short of."""
    problem = unsupported_variant(shapes)
    if problem:
        raise ModelFormatError(problem)
    block = "bottleneck" if any(re.fullmatch(r"layer\d+\.\d+\.conv3\.weight", n) for n in shapes) else "basic"
    layers = []
    for stage in range(1, 5):
        blocks = [re.match(rf"layer{stage}\.(\d+)\.", n) for n in shapes]
        layers.append(max((int(m.group(1)) + 1 for m in blocks if m), default=0))
    fc = shapes.get("fc.weight")
    if fc is None or len(fc) != 2:
        raise ModelFormatError("the checkpoint has no 2-D fc.weight: is it a torchvision ResNet?")
    groups, width_per_group = 1, 64
    conv2 = shapes.get("layer1.0.conv2.weight", ())
    if block == "bottleneck" and len(conv2) == 4 and conv2[1] > 0 and conv2[0] % conv2[1] == 0:
        groups = conv2[0] // conv2[1]
        width_per_group = conv2[1]  # the first stage's width is width_per_group * groups
    # A width that fits no config falls back to the defaults: check_state then names the misshapen tensors.
    if not (0 < groups <= MAX_GROUPS and 0 < width_per_group <= MAX_WIDTH_PER_GROUP):
        groups, width_per_group = 1, 64
    try:
        return config_for(block, layers, groups, width_per_group), int(fc[0])
    except ModelFormatError:
        larger = [c for c in CONFIGS.values() if c.block == block and all(a >= b for a, b in zip(c.layers, layers))]
        if not larger:
            raise
        nearest = min(larger, key=lambda c: sum(c.layers))
        return dataclasses.replace(nearest, groups=groups, width_per_group=width_per_group), int(fc[0])


# Parts of ResNets outside torchvision's layout (timm's variants, mostly), recognised by state_dict names.
_UNSUPPORTED = (
    (r"conv1\.\d+\.", "a deep stem of three 3x3 convs (conv1.0, conv1.3, ...: ResNet-C/D/S/T, timm's resnet50d, "
                      "resnet26t, ...)"),
    (r"layer\d+\.\d+\.downsample\.2\.", "an average-pool downsample shortcut (downsample.1 conv and downsample.2 "
                                       "BatchNorm after a pool: ResNet-D)"),
    (r".*\.se\.", "squeeze-and-excitation or channel attention (se.*: SE-ResNet, SE-ResNeXt, ECA-ResNet)"),
    (r".*\.(attn|attention)\.", "attention blocks"),
    (r".*\.aa\.", "anti-aliased (blur pool) downsampling (aa.*: timm's resnetblur)"),
    (r"maxpool\.", "a conv stem pool in place of the max pool (maxpool.*)"),
    (r"(stem|stages|head)\.", "a network laid out as stem/stages/head (timm's ResNetV2 or another family), not "
                             "torchvision's conv1/layer1..4/fc"),
)


def unsupported_variant(shapes) -> str | None:
    """Why a state_dict is a ResNet variant we cannot run, naming what is unsupported, or None.

    Only what shows in tensor names and shapes can be recognised: a variant whose extra layers hold no
    weights (timm's resnetaa*, which average-pools in place of strides) looks like a plain ResNet."""
    names = list(shapes)
    found = []
    for pattern, what in _UNSUPPORTED:
        hits = [n for n in names if re.match(pattern, n)]
        if hits:
            found.append(f"{what}, e.g. {hits[0]}")
    # BatchNorm-free normalisation (GroupNorm: timm's resnet50_gn) keeps the bn names but no running statistics.
    norms = [n[: -len(".weight")] for n in names if re.fullmatch(r"(bn1|layer\d+\.\d+\.(bn\d|downsample\.1))\.weight", n)]
    stats_free = [n for n in norms if f"{n}.running_var" not in shapes and f"{n}.running_mean" not in shapes]
    if stats_free and len(stats_free) == len(norms):
        found.append(f"normalisation without running statistics (GroupNorm: timm's resnet50_gn), e.g. "
                     f"{stats_free[0]}")
    if not found:
        return None
    return ("unsupported ResNet variant: " + "; ".join(found) + ". pyggml_resnet runs torchvision's ResNet layout "
            "(7x7 stem, 1x1 conv downsample, basic or bottleneck blocks with BatchNorm; any groups and width)")
