"""argparse types shared by the command lines (`pyggml-resnet`, its `bench`)."""

import argparse


def positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
