"""What the benchmark runs: the work per image, and the seeded random model (NumPy only, so a fresh machine
needs no torch and no download)."""

from __future__ import annotations

import math

import numpy as np

from .. import arch

SEED = 0  # of the random model's weights


def products(cfg, height: int = 224, width: int | None = None, batch: int = 1) -> list[tuple[int, int, int]]:
    """(M, K, N) of every convolution's matrix product, in graph order, for `batch` images of this size:
    M output channels, K = kernel area x input channels, N output pixels. `cfg` as for `flops_per_image`."""
    if isinstance(cfg, str):
        cfg = arch.BY_NAME[cfg]
    width = height if width is None else width
    result = []

    def product(conv, size):  # appends one conv's product for an input of `size`; returns its output size
        out = (conv.out_size(size[0]), conv.out_size(size[1]))
        result.append((conv.out_ch, math.prod(conv.shape[1:]), batch * out[0] * out[1]))
        return out

    size = product(arch.STEM, (height, width))
    size = tuple((n - 1) // 2 + 1 for n in size)  # the stem's 3x3/2 max pool, padding 1
    for block in arch.block_names(cfg):
        main, down = arch.block_convs(cfg, block)
        if down:  # the shortcut convolves the block's input
            product(down, size)
        for conv in main:
            size = product(conv, size)
    return result


def flops_per_image(cfg, height: int = 224, width: int | None = None, num_classes: int = 1000) -> int:
    """2 * multiply-accumulates of every convolution and the fc layer for one image of this size.

    `cfg` is an `arch.ResNetConfig` or a name such as "resnet101". BatchNorm, ReLU, the residual adds and
    pooling are left out, as in the usual quoted figures (ResNet-50: 4.1 GMACs, ResNet-101: 7.8)."""
    if isinstance(cfg, str):
        cfg = arch.BY_NAME[cfg]
    return 2 * (sum(m * k * n for m, k, n in products(cfg, height, width)) + cfg.feature_dim * num_classes)


def random_state(cfg, num_classes: int = 1000, seed: int = SEED) -> dict:
    """A torchvision-shaped state dict of seeded random weights whose activations keep a sane scale.

    He (fan-in) convolutions with BatchNorm near identity keep every layer's output around unit scale, and
    each block's last BatchNorm has a small gain, as trained ResNets do, so the residual additions (one per
    block) do not blow the scale up. No value comes near the denormal range, which would slow some engines and not
    others. The fc layer gives logits of order 1, so top-1 is a meaningful comparison."""
    rng = np.random.default_rng(seed)
    last_bn = {arch.block_convs(cfg, block)[0][-1].bn for block in arch.block_names(cfg)}
    state = {}
    for name, shape in arch.expected_tensors(cfg, num_classes).items():
        if len(shape) == 4:  # conv
            state[name] = rng.standard_normal(shape, np.float32) * np.float32(math.sqrt(2 / math.prod(shape[1:])))
        elif name == "fc.weight":
            state[name] = rng.standard_normal(shape, np.float32) * np.float32(1 / math.sqrt(shape[1]))
        elif name == "fc.bias":
            state[name] = rng.standard_normal(shape, np.float32) * np.float32(0.01)
        else:  # BatchNorm
            prefix, param = name.rsplit(".", 1)
            noise = rng.standard_normal(shape, np.float32)
            if param == "weight":
                state[name] = (1 + np.float32(0.1) * noise) * np.float32(0.2 if prefix in last_bn else 1.0)
            elif param == "running_var":
                state[name] = 1 + np.float32(0.1) * np.abs(noise)
            else:  # bias, running_mean
                state[name] = np.float32(0.05) * noise
    return state
