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


def _parse_args(argv):
    default = Preprocessing()
    p = argparse.ArgumentParser(prog="python -m pyggml_resnet.convert",
                                description="Convert a torchvision ResNet checkpoint (.pth/.pt/.ckpt, "
                                            ".safetensors, the legacy ggml .bin, or a GGUF model file to "
                                            "re-encode) into a GGUF model file.")
    p.add_argument("checkpoint", type=Path, help="state_dict .pth/.pt, Lightning .ckpt, .safetensors, legacy "
                                                 ".bin, or .gguf")
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
                   help="name of the weights stored as metadata, e.g. IMAGENET1K_V2 (default: custom, or a "
                        "GGUF input's)")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="class names, one per line (default: ImageNet's for 1000 classes, or a GGUF input's)")
    p.add_argument("--resize", type=int, metavar="N",
                   help=f"shorter image side before the crop (default: {default.resize}, or a GGUF input's)")
    p.add_argument("--crop", type=int, metavar="N",
                   help=f"center crop size fed to the network (default: {default.crop}, or a GGUF input's)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS,
                   help=f"resize filter (default: {default.interpolation}, or a GGUF input's)")
    p.add_argument("--force", action="store_true", help="replace an existing output that is not a GGUF file")
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


def main(argv=None) -> int:
    args = _parse_args(argv)
    changes = {k: getattr(args, k) for k in ("resize", "crop", "interpolation") if getattr(args, k) is not None}
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
