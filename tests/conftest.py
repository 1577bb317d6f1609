"""Shared fixtures: seeded reference ResNets and their converted GGUF files, made once per test session."""

import pytest
import torch

from pyggml_resnet import convert

from reference_resnet import make_model


class ModelFiles:
    """Builds (reference torch model, .pth path, .gguf path) per (depth, num_classes, groups, width), once."""

    def __init__(self, root):
        self.root = root
        self.cache = {}

    def __call__(self, depth: int, num_classes: int = 1000, dtype: str = "f32", *, groups: int = 1,
                 width_per_group: int = 64):
        key = depth, num_classes, groups, width_per_group
        stem = f"resnet{depth}-{num_classes}" + ("" if key[2:] == (1, 64) else f"-{groups}x{width_per_group}")
        if key not in self.cache:  # the model and its checkpoint serve every dtype
            ref = make_model(depth, seed=depth, num_classes=num_classes, groups=groups,
                             width_per_group=width_per_group)
            pth = self.root / f"{stem}.pth"
            torch.save(ref.state_dict(), pth)
            self.cache[key] = (ref, pth)
        ref, pth = self.cache[key]
        gguf_path = self.root / f"{stem}-{dtype}.gguf"
        if not gguf_path.exists():
            convert.convert(pth, gguf_path, dtype=dtype, progress=False)
        return ref, pth, gguf_path


@pytest.fixture(scope="session")
def model_files(tmp_path_factory):
    return ModelFiles(tmp_path_factory.mktemp("models"))
