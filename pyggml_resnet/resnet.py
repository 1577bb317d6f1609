"""The ResNet forward pass as one ggml graph, and the weight arrangement that graph reads.

The graph follows torchvision's resnet.py: stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), four stages of
basic or bottleneck blocks (stride on the first 3x3 conv, a 1x1 downsample on the shortcut where the shape
changes), global average pool, fc. BatchNorm is either folded into each convolution ("folded", the fast
default) or written out element-wise over `batch_repeat`ed vectors ("explicit", the design document's
method with PyTorch's eps). Both are exact to f32 rounding.
"""

from __future__ import annotations

import numpy as np

from . import arch, layers
from .arch import Conv, ResNetConfig, convolutions
from .errors import InputError, ModelFormatError
from .ggml import Graph, Tensor, Type, Weights, pack_matrix, packed_shape
from .loader import ModelFile

BATCHNORM_MODES = ("folded", "explicit")
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def check_batchnorm(mode) -> None:
    """InputError unless `mode` is one of BATCHNORM_MODES."""
    if mode not in BATCHNORM_MODES:
        raise InputError(f"batchnorm must be one of {BATCHNORM_MODES}, got {mode!r}")


def _matrix_type(wtype: Type, k: int) -> Type:
    # A row length that does not fill whole blocks cannot be stored quantized: keep those weights f32.
    return wtype if k % wtype.block_size == 0 else Type.F32


def layouts(cfg: ResNetConfig, wtype: Type, winograd: bool | None, gemm: str | None,
            fc_shape: tuple[int, int]) -> dict[str, str]:
    """Each conv's and the fc's weight layout (`layers.matrix_layout`) under the model's options, by
    weight name."""
    out = {conv.name: layers.matrix_layout(conv.shape, conv.stride, conv.padding, wtype, winograd=winograd, gemm=gemm,
                                           groups=conv.groups)
           for conv in convolutions(cfg)}
    out["fc.weight"] = layers.matrix_layout(fc_shape, 1, 0, wtype, winograd=False, gemm=gemm)
    return out


def upload_weights(backend, mf: ModelFile, batchnorm: str, wtype: Type, layout: dict[str, str]) -> Weights:
    """The model's tensors arranged for `build` in the given `layouts`, rounded to `wtype` where reduced,
    in one backend buffer.

    Tensors stream from the file one convolution at a time, so loading holds one model-sized copy: ggml's.
    """
    plan: dict[str, tuple[Type, tuple[int, ...]]] = {}  # name -> (type, host shape), in upload order
    for conv in convolutions(mf.config):
        host_shape = layers.conv_weight_shape(mf.infos[conv.name].shape, layout[conv.name])
        plan[conv.name] = (_matrix_type(wtype, host_shape[-1]), host_shape)
        vectors = ("folded_bias",) if batchnorm == "folded" else ("weight", "bias", "running_mean", "running_var")
        for p in vectors:
            plan[f"{conv.bn}.{p}"] = (Type.F32, (conv.out_ch,))
    fc = mf.infos["fc.weight"].shape
    packed_fc = layout["fc.weight"] != layers.PLAIN
    fc_type = _matrix_type(wtype, fc[1])
    plan["fc.weight"] = (fc_type, packed_shape(*fc, fc_type) if packed_fc else fc)
    plan["fc.bias"] = (Type.F32, (fc[0],))

    weights = Weights(backend, {name: (ty, tuple(reversed(shape))) for name, (ty, shape) in plan.items()})

    def put(name: str, make, folded: tuple[str, np.ndarray] | None = None) -> None:
        """Stores a conv's or the fc's matrix, make(out=None). Packed f32 weights are packed straight into
        the weights' memory, make(out=...): no host copy to make, fault in and copy again. `folded`: the
        name and bias of a BatchNorm folded into it, refused (ModelFormatError) where folding overflowed."""
        ttype, shape = plan[name]

        def checked(m: np.ndarray) -> np.ndarray:
            if folded is not None and not (np.isfinite(m).all() and np.isfinite(folded[1]).all()):
                raise ModelFormatError(f"{mf.path}: folding {folded[0]} into {name} overflows float32")
            return m
        if ttype == Type.F32 and layout[name] not in (layers.PLAIN, layers.WINOGRAD):
            weights.fill(name, lambda a: checked(make(out=a.reshape(shape))))
        else:
            weights.set(name, ttype.encode(checked(make())))

    # Every matrix is read into this one buffer, each in turn, and used before the next read.
    scratch = np.empty(max(info.n_bytes for info in mf.infos.values()), np.uint8)
    weights.prefault()  # every byte of it is written below
    try:
        for conv in convolutions(mf.config):
            bn_values = {p: mf.tensor(f"{conv.bn}.{p}") for p in ("weight", "bias", "running_mean", "running_var")}
            scale = folded = None
            if batchnorm == "folded":
                with np.errstate(over="ignore"):  # an overflow is refused by `put`, as a bad file
                    scale, bias = layers.batchnorm_scale_bias(bn_values["weight"], bn_values["bias"],
                                                              bn_values["running_mean"], bn_values["running_var"],
                                                              mf.eps)
                weights.set(f"{conv.bn}.folded_bias", bias)
                folded = conv.bn, bias
            else:
                for p, v in bn_values.items():
                    weights.set(f"{conv.bn}.{p}", v)
            w = mf.tensor(conv.name, scratch)
            put(conv.name, lambda out=None: layers.conv_weight(w, layout[conv.name], scale, out=out), folded)
        fc_weight = mf.tensor("fc.weight", scratch)
        put("fc.weight", lambda out=None: pack_matrix(fc_weight, fc_type, out=out) if packed_fc else fc_weight)
        weights.set("fc.bias", mf.tensor("fc.bias"))
    except BaseException:
        weights.close()
        raise
    return weights


# The stem and stages 1..PER_IMAGE_STAGES run image by image, then the later stages over the whole batch:
# early activations are large and their weights small, so one image's stay in cache where a batch's would
# not; later weights are large, so a batch reads them once instead of once per image. Results are the same
# (every op is batch-invariant). Batches above PER_IMAGE_MAX_BATCH (only `Model.stages` makes them) run whole.
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


def build(g: Graph, w: Weights, cfg: ResNetConfig, eps: float, batchnorm: str,
          batch: int, height: int, width: int, layout: dict[str, str], winograd: bool | None,
          stages: bool = False) -> dict[str, Tensor]:
    """Adds the forward pass to `g`, for weights uploaded with these `layout`s; `winograd` as for
    `layers.packed_winograd` (convs with other layouts are as `layout` says). Returns the input ("image",
    ggml [3, W, H, N]: NumPy NHWC) and the outputs: "features" ([F, N]), "logits" and "probs" ([classes, N]),
    "layer3" and "layer4" ([C, W, H, N]), and with `stages` also "stem", "layer1" and "layer2" (else they
    may exist only image by image, see PER_IMAGE_STAGES)."""
    def conv_bn(x: Tensor, conv: Conv, relu: bool, residual: Tensor | None = None) -> Tensor:
        bn = conv.bn
        wino = layers.packed_winograd(layout[conv.name], conv.shape, conv.stride, conv.padding, w[conv.name].type,
                                      winograd, (x.ne[1], x.ne[2]))
        args = dict(kernel=conv.kernel, stride=conv.stride, padding=conv.padding, layout=layout[conv.name],
                    channels=conv.out_ch, groups=conv.groups, winograd=wino)
        if batchnorm == "folded":
            # BatchNorm's bias, the residual and the ReLU: fused into a packed GEMM, else ops after the conv.
            return layers.conv2d(g, x, w[conv.name], **args, bias=w[f"{bn}.folded_bias"], residual=residual,
                                 relu=relu)
        y = layers.conv2d(g, x, w[conv.name], **args)
        y = layers.batchnorm(g, y, w[f"{bn}.running_mean"], w[f"{bn}.running_var"], w[f"{bn}.weight"],
                             w[f"{bn}.bias"], eps)
        return layers.epilogue(g, y, residual=residual, relu=relu)

    def stage(x: Tensor, number: int) -> Tensor:
        for block in arch.block_names(cfg):
            if block.stage != number:
                continue
            main, down_conv = arch.block_convs(cfg, block)
            # The shortcut comes first, so the main path's last conv can add it (and apply the ReLU) as it writes.
            shortcut = conv_bn(x, down_conv, relu=False) if down_conv else x
            for i, conv in enumerate(main):
                x = conv_bn(x, conv, relu=True, residual=shortcut if i == len(main) - 1 else None)
        return x

    out: dict[str, Tensor] = {}
    image = g.input("image", (3, width, height, batch))  # channel-fastest: NumPy NHWC
    out["image"] = image
    early = STAGES[:PER_IMAGE_STAGES + 1]
    split = _per_image(batch)
    per_image: dict[str, list[Tensor]] = {name: [] for name in early}
    for x in [g.batch_slice(image, i) for i in range(batch)] if split else [image]:
        x = conv_bn(x, arch.STEM, relu=True)
        per_image["stem"].append(layers.max_pool(g, x, kernel=3, stride=2, padding=1))
        for number in range(1, PER_IMAGE_STAGES + 1):
            per_image[f"layer{number}"].append(stage(per_image[STAGES[number - 1]][-1], number))
    for name in early:
        if stages or name == early[-1]:
            out[name] = g.stack_batch(per_image[name]) if split else per_image[name][0]
    x = out[early[-1]]
    for number in range(PER_IMAGE_STAGES + 1, len(cfg.layers) + 1):
        x = out[f"layer{number}"] = stage(x, number)
    out["features"] = layers.global_avg_pool(g, x)
    out["logits"] = layers.linear(g, out["features"], w["fc.weight"], w["fc.bias"], layout["fc.weight"])
    out["probs"] = g.softmax(out["logits"])
    return out
