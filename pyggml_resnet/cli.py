"""Command line: `pyggml-resnet classify|bench|convert ...` (also `python -m pyggml_resnet ...`)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

from .dtypes import NAMES as DTYPES
from .errors import Error, InputError, print_error

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _open_model(spec: str, threads: int | None, dtype: str | None):
    """--model takes a GGUF path or the name of a pretrained model (downloaded and converted once).

    Anything that exists, ends in .gguf or contains a path separator is a path, so a mistyped path gets
    "no model file" rather than "unknown pretrained model"."""
    from . import load

    if os.path.exists(spec) or spec.lower().endswith(".gguf") or "/" in spec or os.sep in spec:
        return load(spec, threads=threads, dtype=dtype)
    from . import hub

    return hub.from_pretrained(spec, dtype=dtype or "f32", threads=threads)


def _image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, and the image files under each directory (recursively, sorted)."""
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(p)
    return paths


def _print_stage_shapes(model, shape) -> None:
    """The design document's --verbose print-out: each stage's shape in ggml order (W x H x C x N)."""
    x = np.zeros(shape, np.float32)
    stages = model.stages(x)

    def line(name, nchw):
        ne = tuple(reversed(nchw)) + (1,) * (4 - len(nchw))
        print(f"model.{name:<9} shape: {ne[0]:4d} x {ne[1]:4d} x {ne[2]:4d} x {ne[3]:3d}")

    line("input", shape)
    for name in ("stem", "layer1", "layer2", "layer3", "layer4"):
        line(name if name != "stem" else "maxpool", stages[name].shape)
    line("avgpool", stages["features"].shape)
    line("fc", stages["logits"].shape)


def _classify(args) -> int:
    paths = _image_paths(args.images)
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 1
    model = _open_model(args.model, args.threads, args.dtype)
    try:
        return _classify_paths(model, args, paths)
    finally:
        model.close()


def _classify_paths(model, args, paths: list[Path]) -> int:
    from tqdm import tqdm

    from .model import top_predictions

    pre = model.preprocessing
    if args.top_k > model.num_classes:
        raise InputError(f"--top-k {args.top_k} is more than the model's {model.num_classes} classes")
    if args.verbose:
        print(model)
        _print_stage_shapes(model, (1, 3, pre.crop, pre.crop))

    out = open(args.out, "w", newline="", encoding="utf-8") if args.out else None
    writer = csv.writer(out) if out and not args.out.lower().endswith(".jsonl") else None
    if writer:
        writer.writerow(["path", "labels", "indices", "probs"])
    failures = 0
    bar = tqdm(total=len(paths), unit="img", disable=not args.out, file=sys.stderr)
    try:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start:start + args.batch_size]
            batch, arrays = [], []
            for p in chunk:
                try:
                    arrays.append(model.preprocess(p))
                    batch.append(p)
                except Error as e:
                    failures += 1
                    tqdm.write(f"skipped: {e}", file=sys.stderr)
            probs = model.probabilities(np.stack(arrays)) if arrays else []
            for p, pr in zip(batch, probs):
                _emit(args, writer, out, p, top_predictions(pr, args.top_k, model.labels))
            bar.update(len(chunk))
    finally:
        bar.close()
        if out:
            out.close()
    if failures == len(paths):
        print(f"error: none of the {len(paths)} image file(s) could be read", file=sys.stderr)
        return 1
    if args.out:
        print(f"wrote {len(paths) - failures} results to {args.out}"
              + (f"; skipped {failures} unreadable file(s)" if failures else ""), file=sys.stderr)
    return 0


def _emit(args, writer, out, path, top) -> None:
    row = {"path": str(path), "labels": [t.label for t in top], "indices": [t.index for t in top],
           "probs": [round(t.prob, 6) for t in top]}
    if writer:
        writer.writerow([row["path"], "|".join(row["labels"]), "|".join(map(str, row["indices"])),
                         "|".join(f"{p:.6f}" for p in row["probs"])])
    elif out:
        out.write(json.dumps(row) + "\n")
    elif args.json:
        print(json.dumps(row))
    else:
        print(path)
        for rank, t in enumerate(top):
            print(f"  top[{rank}]={t.prob:.6f} index = {t.index} label = {t.label}")


def positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyggml-resnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("classify", help="classify images, files or folders")
    c.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    c.add_argument("--model", required=True, help="a .gguf file, or a pretrained name such as resnet101")
    c.add_argument("--top-k", type=positive, default=5)
    c.add_argument("--threads", type=positive, default=None, help="default: every CPU available")
    c.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight type at load (default: as stored)")
    c.add_argument("--batch-size", type=positive, default=16)
    c.add_argument("--json", action="store_true", help="print one JSON object per image")
    c.add_argument("--out", help="write results to a .csv or .jsonl file, with a progress bar")
    c.add_argument("--verbose", action="store_true", help="also print each stage's output shape")
    c.set_defaults(run=_classify)

    # These two have parsers of their own (see _DELEGATED); listed here for --help.
    sub.add_parser("bench", help="time ggml against PyTorch (and ONNX Runtime) side by side", add_help=False)
    sub.add_parser("convert", help="convert a PyTorch checkpoint to GGUF (python -m pyggml_resnet.convert)",
                   add_help=False)
    return parser


_DELEGATED = {"bench": "pyggml_resnet.bench", "convert": "pyggml_resnet.convert"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _DELEGATED:
        import importlib

        return importlib.import_module(_DELEGATED[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (Error, OSError) as e:
        return print_error(e)
    except KeyboardInterrupt:
        return 130
