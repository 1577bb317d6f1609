"""An independent PyTorch ResNet, written like torchvision's models/resnet.py, for tests to compare against.

torchvision cannot be imported beside the torch we test with, so this is a rewrite with torch.nn of
torchvision's ResNet (v1.5: the stride of a bottleneck sits on its 3x3 conv). Module names and creation
order are torchvision's, so ``state_dict()`` has torchvision's keys, shapes and order. Wide ResNets and
ResNeXts are the same class with torchvision's ``groups`` and ``width_per_group`` (`VARIANTS`). It imports
nothing from pyggml_resnet, so a shared mistake cannot hide.

``make_model`` gives seeded weights whose activations look like a trained network's: BatchNorm running
statistics measured on data (not the identity 0/1 a fresh model has) and small gains on each block's last
BatchNorm, so the residual stream grows slowly as it does in trained ResNets.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CONFIGS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# torchvision's other ResNet builders: name -> (depth, groups, width_per_group).
VARIANTS = {
    "wide_resnet50_2": (50, 1, 128),
    "wide_resnet101_2": (101, 1, 128),
    "resnext50_32x4d": (50, 32, 4),
    "resnext101_32x8d": (101, 32, 8),
    "resnext101_64x4d": (101, 64, 4),
}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        self.inplanes = 64
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        # torchvision's init (zero_init_residual=False); nn.Linear keeps its default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return stages(self, x)["logits"]


def resnet(depth: int, num_classes: int = 1000, *, groups: int = 1, width_per_group: int = 64) -> ResNet:
    """torchvision's resnet{depth}(weights=None, num_classes=num_classes), with its groups and
    width_per_group (e.g. resnext50_32x4d is resnet(50, groups=32, width_per_group=4))."""
    block, layers = CONFIGS[depth]
    return ResNet(BasicBlock if block == "basic" else Bottleneck, list(layers), num_classes, groups, width_per_group)


def variant(name: str, num_classes: int = 1000) -> ResNet:
    """torchvision's {name}(weights=None, num_classes=num_classes), name in VARIANTS."""
    depth, groups, width_per_group = VARIANTS[name]
    return resnet(depth, num_classes, groups=groups, width_per_group=width_per_group)


def stages(model: ResNet, x: Tensor) -> dict[str, Tensor]:
    """Every stage's output, for layer-by-layer comparison: "stem" (after the maxpool), "layer1".."layer4",
    "features" (pooled and flattened) and "logits"."""
    out = {}
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out["stem"] = x
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        out[name] = x
    x = torch.flatten(model.avgpool(x), 1)
    out["features"] = x
    out["logits"] = model.fc(x)
    return out


def _last_bns(model: ResNet) -> list[nn.BatchNorm2d]:
    """Each block's last BatchNorm: the one scaling the residual branch before the sum."""
    last = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for blk in stage:
            last.append(blk.bn3 if isinstance(blk, Bottleneck) else blk.bn2)
    return last


def make_model(depth: int, *, seed: int = 0, num_classes: int = 1000, groups: int = 1, width_per_group: int = 64,
               last_bn_gain: float = 0.2, calib_batches: int = 4, calib_size: int = 64,
               calib_batch_size: int = 8) -> ResNet:
    """A seeded `resnet(depth, num_classes, groups=..., width_per_group=...)` in eval mode with realistic
    activation scales (see the module docstring).

    Calibration runs at calib_size x calib_size, which is enough to estimate per-channel statistics and
    keeps it fast. The global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet(depth, num_classes, groups=groups, width_per_group=width_per_group)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.8, 1.2)
                    m.bias.normal_(0.0, 0.1)
            for bn in _last_bns(model):
                bn.weight.uniform_(0.5 * last_bn_gain, 1.5 * last_bn_gain)
            model.fc.bias.normal_(0.0, 0.1)

        # Running statistics as the cumulative average over the calibration batches (momentum=None).
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        gen = torch.Generator().manual_seed(seed + 1)
        model.train()
        with torch.no_grad():
            for _ in range(calib_batches):
                model(torch.randn(calib_batch_size, 3, calib_size, calib_size, generator=gen))
        for bn in bns:
            bn.momentum = 0.1  # torchvision's, so the model prints and trains like a torchvision one
    return model.eval()
