"""PyTorch's ResNet image classifiers on the CPU through ggml, exact to PyTorch in f32, without PyTorch.

    import pyggml_resnet
    model = pyggml_resnet.load("resnet101.gguf")
    for p in model.classify("dog.jpg"):
        print(p.label, p.prob)
"""

from .errors import Error, InputError, ModelFormatError
from .hub import DownloadError, from_pretrained
from .model import Model, Prediction, load
from .transforms import load_image, preprocess

__version__ = "0.1.0"

__all__ = ["Error", "InputError", "ModelFormatError", "DownloadError", "Model", "Prediction", "load",
           "from_pretrained", "load_image", "preprocess", "__version__"]
