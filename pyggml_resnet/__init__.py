"""PyTorch's ResNet image classifiers on the CPU through ggml, exact to PyTorch in f32, without PyTorch.

    import pyggml_resnet
    model = pyggml_resnet.load("resnet101.gguf")
    for p in model.classify("dog.jpg"):
        print(p.label, p.prob)
"""


def _check_extension() -> None:
    """ImportError in one line, saying what to do, when the compiled `_ggml` is not beside this file: most
    often Python runs from the repository's root after a non-editable install, so the source folder (which
    has no `_ggml`) shadows the installed package."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec(f"{__name__}._ggml") is not None:
        return
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").is_file():
        raise ImportError(f"pyggml_resnet was imported from its source folder {here}, which has no compiled "
                          "extension (_ggml) and hides the installed package: run from another directory, or "
                          "install in place with `pip install -e .`")
    raise ImportError(f"pyggml_resnet's compiled extension (_ggml) is missing from {here}: reinstall the package "
                      "(`pip install .` from its source)")


_check_extension()

from .errors import Error, InputError, ModelFormatError
from .model import Model, Prediction, load

__version__ = "0.1.0"

__all__ = ["Error", "InputError", "ModelFormatError", "DownloadError", "Model", "Prediction", "load",
           "from_pretrained", "load_image", "preprocess", "__version__"]


# Names from modules that import much (hub: hashing, temporary files, URLs; transforms: Pillow), loaded on
# first use: a cold start that runs a local model file on arrays pays for neither.
_LAZY = {"DownloadError": "hub", "from_pretrained": "hub", "load_image": "transforms", "preprocess": "transforms"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
