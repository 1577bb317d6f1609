"""``python -m pyggml_resnet.convert`` (and ``pyggml-resnet convert``): the converter's command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .. import atomic
from ..arch import BY_NAME, INTERPOLATIONS, Preprocessing
from ..errors import Error, InputError, print_error
from . import calibrate
from .checkpoint import Checkpoint
from .readers import read_checkpoint
from .write import DTYPES, check_output_path, write_gguf


def _size(text: str):
    """argparse type of --resize and --crop: N, H,W (torchvision's (height, width)) or none."""
    if text.lower() == "none":
        return None
    try:
        parts = tuple(int(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N, H,W or none, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _parse_args(argv, prog):
    default = Preprocessing()
    p = argparse.ArgumentParser(prog=prog,
                                description="Convert a torchvision ResNet checkpoint (.pth/.pt/.ckpt, "
                                            ".safetensors, the legacy ggml .bin, a GGUF model file to "
                                            "re-encode, or a timm model directory from the Hugging Face Hub) "
                                            "into a GGUF model file. The preprocessing options record the "
                                            "eval transforms the weights were trained with: torchvision's "
                                            "Resize, CenterCrop and Normalize (docs/usage.md).")
    p.add_argument("checkpoint", type=Path, help="state_dict .pth/.pt, Lightning .ckpt, .safetensors, legacy "
                                                 ".bin, .gguf, or a timm directory (config.json and its weights)")
    p.add_argument("output", type=Path, help="GGUF file to write (an existing GGUF file is replaced atomically)")
    p.add_argument("--arch", choices=list(BY_NAME),
                   help="require this architecture (default: infer it from the checkpoint)")
    p.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="storage type of conv and fc weights (default: f32, exact); int8 needs --calibration")
    p.add_argument("--calibration", nargs="+", metavar="DIR_OR_FILE",
                   help="int8: images (files, or directories of them) the f32 model runs over to measure each "
                        "convolution's input range")
    p.add_argument("--calibration-count", type=int, metavar="N",
                   help="int8: use the first N calibration images (default: all)")
    p.add_argument("--calibration-rule", choices=calibrate.RULES, default=calibrate.DEFAULT_RULE,
                   help=f"int8: how an input's clipping range is chosen (default: {calibrate.DEFAULT_RULE}, "
                        "the most accurate measured, docs/usage.md)")
    p.add_argument("--weights", metavar="NAME",
                   help="name of the weights stored as metadata, e.g. IMAGENET1K_V2 (default: custom, or the "
                        "input's)")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="class names, one per line (default: ImageNet's for 1000 classes, or the input's)")
    inputs = "or what a GGUF input or timm directory records"
    p.add_argument("--resize", type=_size, metavar="N|H,W|none",
                   help=f"Resize: N the shorter side, H,W exactly that size (squash), none (default: "
                        f"{default.resize}, {inputs})")
    p.add_argument("--crop", type=_size, metavar="N|H,W|none",
                   help=f"CenterCrop: N square, H,W, or none, after an H,W resize (default: {default.crop}, "
                        f"{inputs})")
    p.add_argument("--mean", type=float, nargs=3, metavar="M",
                   help=f"Normalize's per-channel mean (default: ImageNet's 0.485 0.456 0.406, {inputs})")
    p.add_argument("--std", type=float, nargs=3, metavar="S",
                   help=f"Normalize's per-channel std (default: ImageNet's 0.229 0.224 0.225, {inputs})")
    p.add_argument("--interpolation", choices=INTERPOLATIONS,
                   help=f"the resize filter, as torchvision applies it to a PIL image (default: "
                        f"{default.interpolation}, {inputs})")
    p.add_argument("--antialias", action=argparse.BooleanOptionalAction,
                   help="--no-antialias: the resize is Resize(antialias=False) of a float tensor after "
                        "ToTensor (torch's interpolate; bilinear or bicubic), not of a PIL image (default: "
                        "antialias)")
    p.add_argument("--force", action="store_true", help="replace an existing output that is not a GGUF file")
    p.set_defaults(**dict.fromkeys(_PREPROCESSING, _UNSET))
    return p.parse_args(argv)


def _read_labels(path: Path) -> list[str]:
    """One class name per line (a final newline, or a Windows one, is not part of any name)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--labels {path}: not UTF-8 text ({e})") from None
    return text.splitlines()


def _summary(out: Path, checkpoint: Checkpoint, dtype: str) -> str:
    mb = out.stat().st_size / 1e6
    return (f"wrote {out}: {checkpoint.config.name}, {checkpoint.num_classes} classes, {len(checkpoint.state)} "
            f"tensors, {checkpoint.parameters:,} parameters, {mb:.1f} MB, {dtype}")


_PREPROCESSING = ("resize", "crop", "mean", "std", "interpolation", "antialias")
_UNSET = object()  # the default of those options: a given "none" (None) replaces the input's size


def main(argv=None, prog: str = "python -m pyggml_resnet.convert") -> int:
    """The command line; `prog` is how it was invoked, for its usage line."""
    args = _parse_args(argv, prog)
    changes = {k: getattr(args, k) for k in _PREPROCESSING if getattr(args, k) is not _UNSET}
    try:
        check_output_path(args.output, source=args.checkpoint, force=args.force)  # before any reading
        labels = _read_labels(args.labels) if args.labels else None
        checkpoint = read_checkpoint(args.checkpoint, args.arch)
        preprocessing = dataclasses.replace(checkpoint.preprocessing or Preprocessing(), **changes)
        out = write_gguf(checkpoint, args.output, dtype=args.dtype, weights=args.weights,
                         preprocessing=preprocessing, labels=labels, force=args.force, calibration=args.calibration,
                         calibration_count=args.calibration_count, calibration_rule=args.calibration_rule)
    except (Error, OSError) as e:
        return print_error(e)
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    except atomic.Terminated as e:
        print("terminated; nothing written", file=sys.stderr)
        return e.code
    print(_summary(out, checkpoint, args.dtype))
    return 0
