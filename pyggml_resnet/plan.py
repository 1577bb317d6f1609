"""How each convolution and the fc layer of a model runs, decided once when it loads.

`plan_model` reads the architecture (arch.py), the model's options (dtype, gemm, winograd, batchnorm) and the
CPU (which packed GEMM paths it runs, and which is fastest for the weights' type: `packed_paths`), and gives
the type the products compute in and one `MatrixPlan` per weight matrix: its `Layout`, the packed GEMM path,
the type and shape it is stored in, and its Winograd rule. f16 and bf16 weights that compute in f32 are
widened at load (exactly) and planned as f32 weights are. The weight upload arranges each matrix as its plan
says (resnet.upload_weights, layers.arrange_weight), and the graph builder multiplies it as its plan says
(resnet.build, layers.conv2d and layers.linear): nothing else decides.

A new kind of weight (a new layout, or a new packed type with its path in packing.GEMM_PATHS) is one more
case here, in `_layout` and `_stored_shape`, and one more branch where the weights are arranged and multiplied.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from . import cpu, int8
from .arch import Conv, InputQuant, ResNetConfig, convolutions
from .errors import InputError
from .ggml import GEMM_INT8_PATHS, Type, gemm_int8_paths, gemm_path_supported
from .packing import GEMM_PATHS, packed_shape

# ggml's fast matmul path (llamafile sgemm) wants K to be a multiple of 16 (f32) or 32 (bf16, q8_0).
K_ALIGN = 32
# load(gemm=...): our packed GEMM on the CPU's widest path, ggml's mul_mat, or a packed path by name.
GEMM_CHOICES = ("packed", "ggml", *GEMM_PATHS, *GEMM_INT8_PATHS)
# Weight types an f32 path multiplies widened to f32 at load: exactly, as every f16 and bf16 value is an f32 one.
WIDENED_TO_F32 = (Type.F16, Type.BF16)
# Below this many 2x2 output tiles per image (ResNet-101's layer4 at 7x7 has 16) the 16 products are too
# short to beat the direct product at batch 1: each transformed weight serves too few pixels (measured,
# docs/benchmarks.md).
WINOGRAD_MIN_TILES = 32


class Layout(enum.Enum):
    """How a weight matrix is stored and multiplied."""

    PLAIN = "plain"  # an [OC, K] matrix for ggml's mul_mat (K padded to K_ALIGN above 1x1)
    WINOGRAD = "winograd"  # F(2x2,3x3): the 16 transformed [OC, IC] matrices, each a ggml mul_mat
    PACKED = "packed"  # panels for the packed GEMM (packing.pack_matrix) on the plan's path
    INT8 = "int8"  # s8 panels for the packed GEMM's int8 path (int8.pack, as f32 words), u8 inputs


class Winograd(enum.Enum):
    """When a conv runs as Winograd F(2x2,3x3) (16 multiplies per 2x2 outputs instead of 36). The rule never
    depends on the batch, so an image's logits do not either."""

    NEVER = "never"
    ALWAYS = "always"
    LARGE_IMAGES = "large images"  # images of WINOGRAD_MIN_TILES 2x2 output tiles or more

    def runs(self, width: int, height: int) -> bool:
        """Whether it runs for an input of width x height."""
        if self is Winograd.LARGE_IMAGES:
            return -(-width // 2) * -(-height // 2) >= WINOGRAD_MIN_TILES
        return self is Winograd.ALWAYS


@dataclass(frozen=True)
class MatrixPlan:
    """How one conv's or the fc layer's weights are stored and multiplied."""

    name: str  # the weight's tensor name, e.g. "layer1.0.conv2.weight"
    shape: tuple[int, ...]  # PyTorch's: [OC, IC / groups, KH, KW], or the fc's [OUT, IN]
    conv: Conv | None  # the convolution; None for the fc layer
    layout: Layout
    path: str | None  # the packed GEMM's path (a key of packing.GEMM_PATHS) for Layout.PACKED, else None
    weight_type: Type  # the type the weights are stored in
    stored_shape: tuple[int, ...]  # the NumPy shape they are stored in
    winograd: Winograd  # Layout.WINOGRAD: always; Layout.PACKED: from the packed weights, by this rule
    input_quant: InputQuant | None = None  # Layout.INT8: how its input is quantized (from the file)
    output_quant: InputQuant | None = None  # a Layout.INT8 downsample's output as u8 (from the file), or None: f32


@dataclass(frozen=True)
class ModelPlan:
    """Every weight matrix's plan, and the model-wide options they came from."""

    weight_type: Type  # the model's dtype (a matrix whose rows do not fill whole blocks is stored f32)
    compute_type: Type  # what the products multiply: weight_type, or F32 for f16 and bf16 weights widened at load
    gemm: str  # what runs the matrix products, as `Model.gemm` shows it: a packed path, or "ggml"
    batchnorm: str  # "folded" or "explicit" (resnet.BATCHNORM_MODES)
    matrices: dict[str, MatrixPlan]  # by weight name: the convs in graph order, then "fc.weight"
    int8: bool = False  # an int8 file's model: ungrouped convs Layout.INT8, `gemm` their int8 path

    def __getitem__(self, name: str) -> MatrixPlan:
        return self.matrices[name]

    @property
    def fc(self) -> MatrixPlan:
        return self.matrices["fc.weight"]


def check_gemm(gemm) -> None:
    """InputError unless `gemm` is one of GEMM_CHOICES or None."""
    if gemm is not None and gemm not in GEMM_CHOICES:
        raise InputError(f"gemm must be one of {GEMM_CHOICES} or None, got {gemm!r}")


def gemm_type(path: str) -> Type:
    """The type of the weights and pixels the packed GEMM's `path` multiplies."""
    return Type.parse(GEMM_PATHS[path])


def gemm_paths(wtype: Type | str = Type.F32) -> tuple[str, ...]:
    """The packed GEMM's paths for `wtype` weights this CPU (and this build) runs, widest first; empty where
    none does."""
    wtype = Type.parse(wtype)
    return tuple(path for path in GEMM_PATHS if gemm_type(path) == wtype and gemm_path_supported(path))


def packed_paths(wtype: Type | str) -> tuple[str, ...]:
    """The packed GEMM's paths that multiply `wtype` weights on this CPU, the default (fastest) first: the
    paths of their own type (`gemm_paths`), and for f16 and bf16 the f32 paths, over the weights widened to f32
    at load. bf16's own path comes first only where the CPU's bf16 dot product beats its f32 FMAs
    (`cpu.bf16_dot_is_fast`: AMD's Zen 4 yes, Intel's no); empty where none runs (q8_0, or an old CPU)."""
    wtype = Type.parse(wtype)
    own, widened = gemm_paths(wtype), gemm_paths(Type.F32) if wtype in WIDENED_TO_F32 else ()
    return own + widened if own and cpu.bf16_dot_is_fast() else widened + own


def gemm_path(gemm: str | None, wtype: Type) -> str | None:
    """The packed GEMM path a model of `wtype` weights with load option `gemm` uses, or None for ggml's mul_mat
    (see `model.load`): the first of `packed_paths` by default, or the one named."""
    check_gemm(gemm)
    paths, name = packed_paths(wtype), wtype.name.lower()
    if gemm == "ggml" or (gemm is None and not paths):
        return None
    if wtype not in (Type.F32, *WIDENED_TO_F32):
        raise InputError(f"the packed GEMM takes f32 weights, and f16 and bf16 widened to f32: use gemm='ggml' "
                         f"for {name} weights")
    if gemm in (None, "packed"):
        if not paths:
            raise InputError(f"this CPU has no packed GEMM path for {name} weights (it needs AVX2 and FMA"
                             f"{', or AVX512-BF16' if wtype == Type.BF16 else ''}): use gemm='ggml'")
        return paths[0]
    if gemm not in paths:
        raise InputError(f"this CPU cannot run the packed GEMM's {gemm} path for {name} weights; "
                         f"it runs: {', '.join(paths) or 'none'}")
    return gemm


def winograd_applies(shape: tuple[int, ...], stride: int, padding: int, wtype: Type) -> bool:
    """Whether a conv can run as Winograd F(2x2,3x3): 3x3, stride 1, padding 1, f32 weights
    (reduced-precision weights keep the direct path)."""
    return len(shape) == 4 and (shape[2], shape[3], stride, padding) == (3, 3, 1, 1) and wtype == Type.F32


def _layout(shape: tuple[int, ...], stride: int, padding: int, groups: int, wtype: Type, path: str | None,
            winograd: bool | None) -> Layout:
    """The packed GEMM on `path` for weights of its type (which runs Winograd from the same weights, see
    `_winograd`), else Winograd where asked for and it applies, else plain. A grouped conv is always plain:
    ggml's mul_mat broadcasts it over the groups."""
    if groups > 1:
        return Layout.PLAIN
    if path is not None and wtype == gemm_type(path):
        return Layout.PACKED
    if winograd and winograd_applies(shape, stride, padding, wtype):
        return Layout.WINOGRAD
    return Layout.PLAIN


def _stored_shape(shape: tuple[int, ...], layout: Layout, path: str | None) -> tuple[int, ...]:
    """The NumPy shape a PyTorch weight of `shape` is stored in (see `layers.arrange_weight`)."""
    m, k = shape[0], math.prod(shape[1:])
    if layout is Layout.PACKED:
        return packed_shape(m, k, GEMM_PATHS[path])
    if layout is Layout.WINOGRAD:
        return 16, m, shape[1]
    if len(shape) == 4 and shape[2] * shape[3] > 1 and k % K_ALIGN:
        k += K_ALIGN - k % K_ALIGN
    return m, k


def _winograd(layout: Layout, shape, stride: int, padding: int, wtype: Type, winograd: bool | None) -> Winograd:
    """Layout.WINOGRAD always runs it; packed 3x3 stride-1 f32 weights run it from the packed weights where
    `winograd` is True, never where False, and by default (None) on large images."""
    if layout is Layout.WINOGRAD:
        return Winograd.ALWAYS
    if layout is not Layout.PACKED or winograd is False or not winograd_applies(shape, stride, padding, wtype):
        return Winograd.NEVER
    return Winograd.ALWAYS if winograd else Winograd.LARGE_IMAGES


def matrix_plan(name: str, shape: tuple[int, ...], wtype: Type, path: str | None, winograd: bool | None,
                conv: Conv | None = None) -> MatrixPlan:
    """The plan of one weight matrix of PyTorch `shape`: of `conv`, or without one the fc layer's (which
    never runs Winograd), for `wtype` weights, the packed GEMM's `path` (None: ggml's mul_mat) and the
    model's `winograd` option (see `model.load`)."""
    stride, padding, groups = (conv.stride, conv.padding, conv.groups) if conv else (1, 0, 1)
    layout = _layout(shape, stride, padding, groups, wtype, path, winograd)
    stored = _stored_shape(shape, layout, path)
    # A row length that does not fill whole blocks cannot be stored quantized: keep those weights f32.
    stored_type = wtype if stored[-1] % wtype.block_size == 0 else Type.F32
    return MatrixPlan(name, tuple(shape), conv, layout, path if layout is Layout.PACKED else None, stored_type,
                      stored, _winograd(layout, shape, stride, padding, stored_type, winograd))


def int8_path(gemm: str | None) -> str:
    """The int8 GEMM path an int8 model with load option `gemm` uses: None or "packed" the CPU's widest."""
    check_gemm(gemm)
    paths = gemm_int8_paths()
    if gemm in (None, "packed"):
        return paths[0]
    if gemm not in GEMM_INT8_PATHS:
        raise InputError(f"an int8 model runs on the packed GEMM's int8 paths: gemm must be None, 'packed' or "
                         f"one of {', '.join(paths)}, got {gemm!r}")
    if gemm not in paths:
        raise InputError(f"this CPU cannot run the packed GEMM's {gemm} path; it runs: {', '.join(paths)}")
    return gemm


def _int8_plan(cfg: ResNetConfig, num_classes: int, gemm: str | None, input_quants: dict[str, InputQuant],
               shortcut_quants: dict[str, InputQuant] | None) -> ModelPlan:
    """An int8 file's model: each ungrouped conv Layout.INT8 with its input's quantization (and a downsample
    its output's, where the file has `shortcut_quants`); grouped convs (ResNeXt's) and the fc stay f32 on the
    f32 packed GEMM (or ggml's mul_mat where the CPU has no path), their BatchNorm folded at conversion."""
    path, f32_path = int8_path(gemm), gemm_path(None, Type.F32)
    matrices = {}
    for conv in convolutions(cfg):
        if conv.groups > 1:
            matrices[conv.name] = matrix_plan(conv.name, conv.shape, Type.F32, f32_path, False, conv)
            continue
        stored = int8.packed_shape(conv.out_ch, math.prod(conv.shape[1:]))[:3]  # the words' (P, K/4, 16)
        matrices[conv.name] = MatrixPlan(conv.name, conv.shape, conv, Layout.INT8, path, Type.F32, stored,
                                         Winograd.NEVER, input_quants[conv.name],
                                         (shortcut_quants or {}).get(conv.name))
    matrices["fc.weight"] = matrix_plan("fc.weight", (num_classes, cfg.feature_dim), Type.F32, f32_path, False)
    return ModelPlan(Type.F32, Type.F32, path, "folded", matrices, int8=True)


def plan_model(cfg: ResNetConfig, num_classes: int, *, dtype: Type, gemm: str | None, winograd: bool | None,
               batchnorm: str, input_quants: dict[str, InputQuant] | None = None,
               shortcut_quants: dict[str, InputQuant] | None = None) -> ModelPlan:
    """Every matrix's plan for a model of `cfg` with these options (as `model.load` takes them; `dtype` is
    the weight type, already parsed): InputError where the options ask for what this CPU cannot run.
    `input_quants` and `shortcut_quants` (an int8 file's, by conv weight name): the int8 plan (`_int8_plan`),
    which ignores `dtype` and `winograd` (the caller refuses what an int8 file cannot do)."""
    if input_quants is not None:
        return _int8_plan(cfg, num_classes, gemm, input_quants, shortcut_quants)
    path = gemm_path(gemm, dtype)
    compute = gemm_type(path) if path else dtype  # f32 on an f32 path: f16 and bf16 weights widened at load
    matrices = {conv.name: matrix_plan(conv.name, conv.shape, compute, path, winograd, conv)
                for conv in convolutions(cfg)}
    matrices["fc.weight"] = matrix_plan("fc.weight", (num_classes, cfg.feature_dim), compute, path, False)
    return ModelPlan(dtype, compute, path or "ggml", batchnorm, matrices)
