"""The exceptions pyggml_resnet raises instead of letting ggml abort the process."""


class Error(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFormatError(Error, ValueError):
    """A model file or checkpoint is malformed, truncated, or not a ResNet this package knows."""


class InputError(Error, ValueError):
    """An image, array or argument given to the library cannot be used."""
