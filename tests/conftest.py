"""Shared fixtures: seeded reference ResNets and their converted GGUF files, made once per test session."""

import pytest
import torch

from pyggml_resnet import convert

from reference_resnet import make_model


class ModelFiles:
    """Builds (reference torch model, .pth path, .gguf path) per (depth, num_classes), once."""

    def __init__(self, root):
        self.root = root
        self.cache = {}

    def __call__(self, depth: int, num_classes: int = 1000, dtype: str = "f32"):
        key = (depth, num_classes, dtype)
        if key not in self.cache:
            ref = make_model(depth, seed=depth, num_classes=num_classes)
            pth = self.root / f"resnet{depth}-{num_classes}.pth"
            if not pth.exists():
                torch.save(ref.state_dict(), pth)
            gguf_path = self.root / f"resnet{depth}-{num_classes}-{dtype}.gguf"
            convert.convert(pth, gguf_path, dtype=dtype, progress=False)
            self.cache[key] = (ref, pth, gguf_path)
        return self.cache[key]


@pytest.fixture(scope="session")
def model_files(tmp_path_factory):
    return ModelFiles(tmp_path_factory.mktemp("models"))
