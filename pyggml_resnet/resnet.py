"""The ResNet forward pass as one ggml graph, and the weight arrangement that graph reads.

The graph follows torchvision's resnet.py: stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), four stages of
basic or bottleneck blocks (stride on the first 3x3 conv, a 1x1 downsample on the shortcut where the shape
changes), global average pool, fc. BatchNorm is either folded into each convolution ("folded", the fast
default) or written out element-wise over `batch_repeat`ed vectors ("explicit", the design document's
method with PyTorch's eps). Both are exact to f32 rounding.
"""

from __future__ import annotations

import numpy as np

from . import arch, dtypes, int8, layers
from .arch import Conv, InputQuant, ResNetConfig, convolutions
from .errors import InputError, ModelFormatError
from .ggml import Graph, Tensor, Type, Weights
from .loader import ModelFile
from .plan import Layout, MatrixPlan, ModelPlan

BATCHNORM_MODES = ("folded", "explicit")
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def check_batchnorm(mode) -> None:
    """InputError unless `mode` is one of BATCHNORM_MODES."""
    if mode not in BATCHNORM_MODES:
        raise InputError(f"batchnorm must be one of {BATCHNORM_MODES}, got {mode!r}")


_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def upload_weights(backend, mf: ModelFile, plan: ModelPlan) -> Weights:
    """The model's tensors arranged for `build` as `plan` says, in one backend buffer.

    Tensors stream from the file one convolution at a time, so loading holds one model-sized copy: ggml's.
    """
    specs: dict[str, tuple[Type, tuple[int, ...]]] = {}  # name -> (type, host shape), in upload order
    vectors = ("folded_bias",) if plan.batchnorm == "folded" else _BN_PARAMS
    for m in plan.matrices.values():
        specs[m.name] = (m.weight_type, m.stored_shape)
        if m.layout is Layout.INT8:
            specs[f"{m.name}_scale"] = specs[f"{m.name}_colsums"] = (Type.F32, (m.shape[0],))
        for p in vectors if m.conv else ():
            specs[f"{m.conv.bn}.{p}"] = (Type.F32, (m.conv.out_ch,))
    specs["fc.bias"] = (Type.F32, (plan.fc.shape[0],))

    weights = Weights(backend, {name: (ty, tuple(reversed(shape))) for name, (ty, shape) in specs.items()})

    def put(m: MatrixPlan, w: np.ndarray, folded: tuple[str, np.ndarray, np.ndarray] | None) -> None:
        """Stores a conv's or the fc's weights `w` as its plan `m` says. Packed f32 weights are packed straight
        into the weights' memory: no host copy to make, fault in and copy again. `folded`: the name, scale
        and bias of a BatchNorm folded into it, refused (ModelFormatError) where folding overflowed."""
        scale = None if folded is None else folded[1]

        def checked(a: np.ndarray) -> np.ndarray:
            finite = dtypes.bf16_finite(a) if a.dtype == np.uint16 else np.isfinite(a).all()  # uint16: bf16 bits
            if folded is not None and not (finite and np.isfinite(folded[2]).all()):
                raise ModelFormatError(f"{mf.path}: folding {folded[0]} into {m.name} overflows float32")
            if not finite:  # bf16 packed in place: rounded without `encode`'s range check
                raise InputError(f"{m.name}: values do not fit BF16")
            return a
        if m.layout is Layout.INT8:
            _put_int8(weights, m, w)
        elif m.weight_type in (Type.F32, Type.BF16) and m.layout is Layout.PACKED:
            weights.fill(m.name, lambda a: checked(layers.arrange_weight(w, m, scale, out=a.reshape(m.stored_shape))))
        else:
            weights.set(m.name, m.weight_type.encode(checked(layers.arrange_weight(w, m, scale))))

    # Every matrix is read into this one buffer, each in turn, and used before the next read.
    scratch = np.empty(max(info.n_bytes for info in mf.infos.values()), np.uint8)
    weights.prefault()  # every byte of it is written below
    try:
        for m in plan.matrices.values():
            folded = _upload_batchnorm(weights, mf, m, plan) if m.conv is not None else None
            put(m, _values(mf, m.name, plan, scratch), folded)
        weights.set("fc.bias", mf.tensor("fc.bias"))
    except BaseException:
        weights.close()
        raise
    return weights


def _values(mf: ModelFile, name: str, plan: ModelPlan, scratch: np.ndarray) -> np.ndarray:
    """A conv's or the fc's weights as float32, as the model's dtype holds them: a model computed in a wider
    type than its dtype (bf16 widened to f32) gets the values of its dtype, rounded here where the file
    stores a wider type (an f32 file loaded with dtype="bf16"), so it computes what the stored bf16 file would."""
    w, dtype = mf.tensor(name, scratch, _decode), plan.weight_type
    if dtype == plan.compute_type or mf.infos[name].kind == dtype.name.lower():
        return w
    return dtype.decode(dtype.encode(w).view(np.uint8).reshape(-1)).reshape(w.shape)


def _decode(kind: str, raw: np.ndarray) -> np.ndarray:
    """A stored weight's bytes -> float32, by ggml's conversions where they are faster than NumPy's."""
    return Type.parse(kind).decode(raw)


def _put_int8(weights: Weights, m: MatrixPlan, q: np.ndarray) -> None:
    """Stores a conv's s8 weights as read from an int8 file (PyTorch's [OC, IC, KH, KW]) packed for the int8
    GEMM (K in (ky, kx, c) order), with their column sums; the scales follow from the file."""
    rows = q.transpose(0, 2, 3, 1).reshape(len(q), -1)
    weights.set(m.name, int8.words(int8.pack(rows)).reshape(m.stored_shape))
    weights.set(f"{m.name}_colsums", int8.words(rows.sum(axis=1, dtype=np.int32)))


def _upload_batchnorm(weights: Weights, mf: ModelFile, m: MatrixPlan,
                      plan: ModelPlan) -> tuple[str, np.ndarray, np.ndarray] | None:
    """Stores the BatchNorm after `m`'s conv: its four vectors ("explicit"), or the bias of it folded into the
    conv ("folded"), then returned with its name and scale for the conv's weights (may overflow: see `put`).
    An int8 file holds the folded bias (and an int8 conv its weights' scales): stored as they are."""
    conv, batchnorm = m.conv, plan.batchnorm
    if plan.int8:
        prefix = arch.conv_prefix(conv)
        weights.set(f"{conv.bn}.folded_bias", mf.tensor(f"{prefix}.bias"))
        if m.layout is Layout.INT8:
            weights.set(f"{m.name}_scale", mf.tensor(f"{prefix}.weight_scale"))
        return None
    values = {p: mf.tensor(f"{conv.bn}.{p}") for p in _BN_PARAMS}
    if batchnorm != "folded":
        for p, v in values.items():
            weights.set(f"{conv.bn}.{p}", v)
        return None
    with np.errstate(over="ignore"):  # an overflow is refused by `put`, as a bad file
        scale, bias = layers.batchnorm_scale_bias(values["weight"], values["bias"], values["running_mean"],
                                                  values["running_var"], mf.eps)
    weights.set(f"{conv.bn}.folded_bias", bias)
    return conv.bn, scale, bias


def _int8_chain(m: MatrixPlan, then: MatrixPlan) -> InputQuant | None:
    """How an int8 conv's result is quantized when the only reader is the next int8 conv of its block: as that
    conv's input, so it is stored as that conv's u8 bytes (a quarter of f32's) and not quantized again there."""
    return then.input_quant if m.layout is Layout.INT8 and then.layout is Layout.INT8 else None


def _u8_successor(plan: ModelPlan, main: list[Conv],
                  following: tuple[list[Conv], Conv | None] | None) -> Conv | None:
    """The conv whose input quantization a block's output takes, handed on as u8 (a quarter of f32's bytes,
    and quantized once, as the peers' int8 models do): the first of the `following` block (main convs and
    downsample), where this block's last conv, which writes the output, and every reader of it are int8 and
    quantize it alike: the following block's first conv, and its downsample (which must share that conv's
    input quantization, as calibration gives them) or else its last conv (which adds the output as its
    residual). None where the output stays f32: the last block of the net (read by pooling), and f32 models."""
    if following is None:
        return None
    then, down = following
    readers = (then[0], down) if down is not None else (then[0], then[-1])
    if any(plan[c.name].layout is not Layout.INT8 for c in (main[-1], *readers)):
        return None
    if down is not None and plan[down.name].input_quant != plan[then[0].name].input_quant:
        return None
    return then[0]


def _stem_successor(plan: ModelPlan, cfg: ResNetConfig) -> Conv | None:
    """The conv whose input quantization the stem's output takes, handed on as u8 (`_u8_successor`; the pool
    of those bytes is the bytes of the f32 pool, since quantizing is monotonic): layer1's first conv, where
    its block has a downsample that reads the output alike. A basic-block net adds the stem's output as a
    residual, which `Model.stages` keeps f32, so its stem writes f32 (else its logits would differ)."""
    main, down = arch.block_convs(cfg, next(arch.block_names(cfg)))
    return _u8_successor(plan, [arch.STEM], (main, down)) if down is not None else None


def _int8_operands(w: Weights, m: MatrixPlan) -> dict[str, Tensor]:
    """The int8 GEMM's per-channel weight scales and column sums, for a conv of Layout.INT8."""
    if m.layout is not Layout.INT8:
        return {}
    return {"scales": w[f"{m.name}_scale"], "colsums": w[f"{m.name}_colsums"]}


# The stem and the first PER_IMAGE_STAGES stages run image by image, then the later stages over the whole
# batch: early activations are large and their weights small, so one image's stay in cache where a batch's
# would not; later weights are large, so a batch reads them once instead of once per image. Results are the
# same (every op is batch-invariant). Batches above PER_IMAGE_MAX_BATCH (only `Model.stages` makes them) run
# whole. Through layer2, for every type: layer3 over the batch made ResNet-101 at batch 8 0.972-0.985x in
# f32 and 0.955x in bf16 on Zen 5 (int8 0.99-1.00x) once each thread kept its Winograd products (gemm_winograd);
# on Zen 4, when those went through memory 16-fold, f32 had measured layer3 image by image faster.
PER_IMAGE_STAGES = 2
PER_IMAGE_MAX_BATCH = 16


def _per_image(batch: int) -> bool:
    return 1 < batch <= PER_IMAGE_MAX_BATCH


def max_nodes(cfg: ResNetConfig, batch: int = 1) -> int:
    """Graph nodes `build` may need for this batch: at most 18 per convolution (explicit BatchNorm is the
    larger), the early ones once per image when they run image by image, plus the stem, head and stacking."""
    copies = batch if _per_image(batch) else 1
    n_convs = sum(1 for _ in convolutions(cfg))
    early = 1 + sum(len(main) + (down is not None) for main, down in
                    (arch.block_convs(cfg, b) for b in arch.block_names(cfg) if b.stage <= PER_IMAGE_STAGES))
    return 18 * (early * copies + n_convs - early) + 64 + 8 * copies


def _shortcut_quant(plan: ModelPlan, main: list[Conv], down: Conv) -> InputQuant | None:
    """How a downsample's output is stored: as u8 where the file quantizes it (`MatrixPlan.output_quant`) and
    the block's last conv, which adds it as its residual, is int8; else None (f32)."""
    quant = plan[down.name].output_quant
    return quant if quant is not None and plan[main[-1].name].layout is Layout.INT8 else None


def _stage(conv_bn, plan: ModelPlan, cfg: ResNetConfig, x: Tensor, x_quant: InputQuant | None, number: int,
           stages: bool, shortcuts: dict[str, Tensor] | None = None) -> tuple[Tensor, InputQuant | None]:
    """Stage `number` on x (u8 bytes quantized as x_quant says, or f32 where it is None), each conv by `build`'s
    conv_bn; returns its output and how that is quantized (None: f32), as `_u8_successor` decides. `shortcuts`:
    filled with each downsample's output, by weight name."""
    blocks = [arch.block_convs(cfg, block) for block in arch.block_names(cfg) if block.stage == number]
    # The block after each, which reads its output: for the stage's last, the next stage's first (None after
    # the net's last, or where `stages` asks for f32 stage outputs).
    after = None if stages else next((arch.block_convs(cfg, block) for block in arch.block_names(cfg)
                                      if block.stage == number + 1), None)
    for (main, down_conv), following in zip(blocks, blocks[1:] + [after]):
        # The shortcut comes first, so the main path's last conv can add it (and apply the ReLU) as it writes.
        shortcut, shortcut_quant = x, x_quant
        if down_conv:
            shortcut_quant = _shortcut_quant(plan, main, down_conv)
            shortcut = conv_bn(x, down_conv, relu=False, out_quant=shortcut_quant)
            if shortcuts is not None:
                shortcuts[down_conv.name] = shortcut
        then = _u8_successor(plan, main, following)
        for i, conv in enumerate(main):
            last = i == len(main) - 1
            reader = then if last else main[i + 1]
            x = conv_bn(x, conv, relu=True, residual=shortcut if last else None,
                        out_quant=_int8_chain(plan[conv.name], plan[reader.name]) if reader else None,
                        residual_quant=shortcut_quant if last else None)
        x_quant = plan[then.name].input_quant if then else None
    return x, x_quant


def build(g: Graph, w: Weights, cfg: ResNetConfig, eps: float, plan: ModelPlan, batch: int, height: int,
          width: int, stages: bool = False, taps: dict[str, Tensor] | None = None,
          shortcuts: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Adds the forward pass to `g`, for weights uploaded by `upload_weights` with this `plan`, each matrix
    multiplied as its plan says. Returns the input ("image", ggml [3, W, H, N]: NumPy NHWC) and the outputs:
    "features" ([F, N]), "logits" and "probs" ([classes, N]), "layer3" and "layer4" ([C, W, H, N]; without
    `stages`, an int8 model's "layer3" may be the u8 bytes layer4 reads, see `_u8_successor`), and with
    `stages` also "stem", "layer1" and "layer2" (else they may exist only image by image, see PER_IMAGE_STAGES).
    `taps` and `shortcuts` (batch 1 only): filled with each ungrouped conv's input and each downsample's output,
    by weight name (for int8 calibration)."""
    if (taps is not None or shortcuts is not None) and batch != 1:
        raise InputError("build: conv inputs and shortcuts are tapped one image at a time")

    def conv_bn(x: Tensor, conv: Conv, relu: bool, residual: Tensor | None = None,
                out_quant: InputQuant | None = None, residual_quant: InputQuant | None = None) -> Tensor:
        bn, m = conv.bn, plan[conv.name]
        if taps is not None and conv.groups == 1:
            taps[conv.name] = x
        if plan.batchnorm == "folded":
            # BatchNorm's bias, the residual and the ReLU: fused into a packed GEMM, else ops after the conv.
            return layers.conv2d(g, x, w[conv.name], m, bias=w[f"{bn}.folded_bias"], residual=residual, relu=relu,
                                 out_quant=out_quant,
                                 residual_quant=residual_quant, **_int8_operands(w, m))
        y = layers.conv2d(g, x, w[conv.name], m)
        y = layers.batchnorm(g, y, w[f"{bn}.running_mean"], w[f"{bn}.running_var"], w[f"{bn}.weight"],
                             w[f"{bn}.bias"], eps)
        return layers.epilogue(g, y, residual=residual, relu=relu)

    out: dict[str, Tensor] = {}
    image = g.input("image", (3, width, height, batch))  # channel-fastest: NumPy NHWC
    out["image"] = image
    early = STAGES[:PER_IMAGE_STAGES + 1]
    split = _per_image(batch)
    per_image: dict[str, list[Tensor]] = {name: [] for name in early}
    stem = plan[arch.STEM.name]
    if stem.layout is Layout.INT8:  # quantized once, not once per window that reads a pixel (about 12 times)
        image = g.quantize_u8(image, stem.input_quant.scale, stem.input_quant.zero, path=stem.path)
    then = None if stages else _stem_successor(plan, cfg)
    stem_quant = plan[then.name].input_quant if then else None
    for x in [g.batch_slice(image, i) for i in range(batch)] if split else [image]:
        x = conv_bn(x, arch.STEM, relu=True, out_quant=stem_quant)
        per_image["stem"].append(layers.max_pool(g, x, kernel=3, stride=2, padding=1))
        x_quant = stem_quant
        for number in range(1, PER_IMAGE_STAGES + 1):
            x, x_quant = _stage(conv_bn, plan, cfg, per_image[STAGES[number - 1]][-1], x_quant, number, stages,
                                shortcuts)
            per_image[f"layer{number}"].append(x)
    for name in early:
        if stages or name == early[-1]:
            out[name] = g.stack_batch(per_image[name]) if split else per_image[name][0]
    x = out[early[-1]]
    for number in range(PER_IMAGE_STAGES + 1, len(cfg.layers) + 1):
        x, x_quant = _stage(conv_bn, plan, cfg, x, x_quant, number, stages, shortcuts)
        out[f"layer{number}"] = x
    out["features"] = layers.global_avg_pool(g, x)
    out["logits"] = layers.linear(g, out["features"], w["fc.weight"], w["fc.bias"], plan.fc)
    out["probs"] = g.softmax(out["logits"])
    return out
