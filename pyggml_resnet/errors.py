"""The exceptions pyggml_resnet raises instead of letting ggml abort the process."""

import contextlib
import sys


class Error(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFormatError(Error, ValueError):
    """A model file or checkpoint is malformed, truncated, or not a ResNet this package knows."""


class InputError(Error, ValueError):
    """An image, array or argument given to the library cannot be used."""


@contextlib.contextmanager
def in_file(path):
    """Names `path` in any ModelFormatError raised inside, once: messages that name it already are kept."""
    try:
        yield
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None


def print_error(e: BaseException) -> int:
    """What every command line does with an expected error: one `error: ...` line on stderr, whatever the
    message, and exit status 1."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 1
