"""PyTorch's ResNet image classifiers on the CPU through ggml, exact to PyTorch in f32, without PyTorch.

    import pyggml_resnet
    model = pyggml_resnet.load("resnet101.gguf")
    for p in model.classify("dog.jpg"):
        print(p.label, p.prob)
"""

from .errors import Error, InputError, ModelFormatError
from .model import Model, Prediction, load
from .transforms import load_image, preprocess

__version__ = "0.1.0"

__all__ = ["Error", "InputError", "ModelFormatError", "DownloadError", "Model", "Prediction", "load",
           "from_pretrained", "load_image", "preprocess", "__version__"]


def __getattr__(name):
    # The download code and what it imports (hashing, temporary files, URLs) load on first use, not with
    # the package: a cold start that classifies with a local file does not pay for them.
    if name in ("DownloadError", "from_pretrained"):
        from . import hub
        return getattr(hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
