"""ImageNet-1k class names, in the order torchvision's ResNet weights predict them.

``imagenet_classes.txt`` is ``torchvision.models._meta._IMAGENET_CATEGORIES``
from torchvision 0.29.1, one name per line; index ``i`` of the list is the
name of logit ``i``.
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """Return the 1000 ImageNet-1k class names (read from the package once)."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    labels = tuple(line for line in text.splitlines() if line)
    # A wrong count would silently shift every prediction's name, so fail loudly.
    if len(labels) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(labels)} names, expected 1000")
    return labels
