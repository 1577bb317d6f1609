"""Command line: `pyggml-resnet classify|download|cache|bench|convert ...` (also `python -m pyggml_resnet ...`)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

from .argtypes import positive
from .dtypes import NAMES as DTYPES
from .errors import Error, InputError, print_error


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


def _check_classify_args(args) -> None:
    """Refuses options that would otherwise be ignored or misread, before any work starts."""
    from . import atomic, hub, results

    if args.out:
        if args.json:
            raise InputError("--json prints to stdout and --out writes a file: give one of them "
                             "(--out FILE.jsonl writes JSON lines)")
        if not args.out.lower().endswith(tuple(results.FORMATS)):
            raise InputError(f"--out {args.out}: the suffix picks the format, {', '.join(results.FORMATS)}")
        atomic.check_target(args.out, "--out")
        if results.format_of(args.out) == "parquet" and importlib.util.find_spec("pyarrow") is None:
            raise InputError("writing Parquet needs pyarrow: pip install pyarrow (or 'pyggml-resnet[ray]')")
    elif args.ray is not None or args.features:
        raise InputError("--ray and --features write a file: give --out results.parquet (or .csv, .jsonl)")
    if args.actors is not None and args.ray is None:
        raise InputError("--actors needs --ray")
    if hub.is_path(args.model) and not os.path.exists(args.model):
        raise InputError(f"--model {args.model}: no such file; give a .gguf model file (convert a checkpoint with "
                         "pyggml-resnet convert CHECKPOINT MODEL.gguf) or a pretrained name such as resnet50")
    if (args.url or args.sha256) and hub.is_path(args.model):
        raise InputError(f"--url and --sha256 name a pretrained model's checkpoint; --model {args.model} is a "
                         "model file")


def _classify(args) -> int:
    from PIL import Image

    from . import hub
    from .model import MAX_BATCH
    from .transforms import image_paths

    _check_classify_args(args)
    if args.batch_size is None:
        args.batch_size = MAX_BATCH if args.ray is not None else 1
    paths = image_paths(args.images)
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 1
    if args.ray is not None:  # Ray is imported only with --ray
        from .ray import run_cli

        return run_cli(args, paths)
    model = hub.open_model(args.model, threads=args.threads, dtype=args.dtype, url=args.url, sha256=args.sha256)
    limit = Image.MAX_IMAGE_PIXELS
    if args.max_pixels:
        Image.MAX_IMAGE_PIXELS = args.max_pixels  # Pillow's decompression-bomb guard, which transforms obeys
    try:
        return _classify_paths(model, args, paths)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
        model.close()


def _classify_paths(model, args, paths: list[Path]) -> int:
    from .predictor import Predictor  # the rows --ray computes on actors, here in this process
    from .results import write_results

    pre = model.preprocessing
    if args.top_k > model.num_classes:
        raise InputError(f"--top-k {args.top_k} is more than the model's {model.num_classes} classes")
    if args.verbose:
        print(model)
        _print_stage_shapes(model, (1, 3, *pre.input_size))
    predictor = Predictor.around(model, output="features" if args.features else "classify", top_k=args.top_k)
    rows = [str(p) for p in paths]
    batches = (predictor({"path": np.array(rows[i:i + args.batch_size], dtype=object)})
               for i in range(0, len(rows), args.batch_size))
    if args.out:
        return write_results(batches, args.out, len(rows))
    failures = 0
    for batch in batches:
        for path, labels, indices, probs, error in zip(*(batch[c] for c in ("path", "labels", "indices", "probs",
                                                                             "error"))):
            if error is not None:
                failures += 1
                print(f"skipped: {error}", file=sys.stderr)
            elif args.json:
                print(json.dumps({"path": path, "labels": labels, "indices": indices, "probs": probs}))
            else:
                print(path)
                for rank, (label, index, prob) in enumerate(zip(labels, indices, probs)):
                    print(f"  top[{rank}]={prob:.6f} index = {index} label = {label}")
    if failures == len(paths):
        print(f"error: none of the {len(paths)} image file(s) could be read", file=sys.stderr)
        return 1
    return 0


def _download(args) -> int:
    from . import hub

    path = hub.download(args.name, url=args.url, sha256=args.sha256, dtype=args.dtype)
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _cache(args) -> int:
    from . import hub

    root = hub.default_cache_dir()
    sizes = {p: p.stat().st_size for p in hub.cached_files()}
    total = sum(sizes.values()) / 1e6
    if args.action == "clear":
        hub.clear_cache()
        print(f"deleted {len(sizes)} file(s), {total:.1f} MB, from {root}")
        return 0
    for p, size in sizes.items():
        print(f"{size / 1e6:9.1f} MB  {p.name}")
    print(f"{len(sizes)} file(s), {total:.1f} MB, in {root} (set ${hub.ENV_CACHE} to move it)")
    return 0


def _add_pretrained_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="download the checkpoint from here (a mirror, or your own weights) instead "
                                 "of download.pytorch.org")
    p.add_argument("--sha256", metavar="HEX", help="the checkpoint's full SHA-256 (default: check the hash "
                                                   "prefix in the URL's file name, as torch.hub does)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, ggml

    version = f"pyggml-resnet {__version__} (ggml {ggml.version()})"
    parser = argparse.ArgumentParser(prog="pyggml-resnet", description=__doc__)
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_classify, _add_download, _add_cache):  # a subcommand is one function here
        add(sub, version)
    # These two have parsers of their own (see _DELEGATED); listed here for --help.
    sub.add_parser("bench", help="time ggml against PyTorch (and ONNX Runtime) side by side", add_help=False)
    sub.add_parser("convert", help="convert a PyTorch checkpoint to GGUF (python -m pyggml_resnet.convert)",
                   add_help=False)
    sub.add_parser("serve", help="serve a model over HTTP (Open Inference Protocol; needs the [serve] extra)",
                   add_help=False)
    return parser


def _add_classify(sub, version: str) -> None:
    from PIL import Image

    c = sub.add_parser("classify", help="classify images, files or folders")
    c.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    c.add_argument("--model", required=True, help="a .gguf file, or a pretrained name such as resnet101")
    _add_pretrained_source(c)
    c.add_argument("--top-k", type=positive, default=5, metavar="K",
                   help="print (or write) the K most probable classes of each image (default: 5)")
    c.add_argument("--threads", type=positive, default=None, help="default: OMP_NUM_THREADS, else every CPU available")
    c.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight type at load (default: as stored)")
    c.add_argument("--batch-size", type=positive, default=None,
                   help="images per forward pass (default: 1, as ggml is no faster per image in bigger "
                        "batches and --out's progress bar moves once per batch; 16 with --ray, where each "
                        "batch is one task for an actor)")
    c.add_argument("--max-pixels", type=positive, default=None, metavar="N",
                   help="read images of up to N pixels (default: Pillow's decompression-bomb limit, "
                        f"{Image.MAX_IMAGE_PIXELS:,})")
    c.add_argument("--json", action="store_true", help="print one JSON object per image")
    c.add_argument("--out", help="write results to a .csv, .jsonl or .parquet (needs pyarrow) file, with a "
                                 "progress bar; one row per image, unreadable ones with an error")
    c.add_argument("--verbose", action="store_true", help="also print each stage's output shape")
    c.add_argument("--version", action="version", version=version)
    c.add_argument("--features", action="store_true",
                   help="write each image's pooled embedding instead of its classes (needs --out)")
    c.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on Ray actors (pip install pyggml-resnet[ray]): a local Ray, or the cluster at "
                        "ADDRESS (e.g. auto); --out a .parquet, .csv or .jsonl file. See docs/scaling.md")
    c.add_argument("--actors", type=positive, default=None,
                   help="with --ray: actors, each with --threads threads (default 1) and its own model "
                        "(default: the cluster's CPUs // threads)")
    c.set_defaults(run=_classify)


def _add_download(sub, version: str) -> None:
    d = sub.add_parser("download", help="download and convert a pretrained model into the cache ahead of "
                                        "time (for machines without network access)")
    d.add_argument("name", help="a pretrained name such as resnet101 or resnet50.IMAGENET1K_V1")
    d.add_argument("--dtype", choices=DTYPES, default="f32", help="how the cached file stores the weights "
                                                                  "(default: f32, exact)")
    _add_pretrained_source(d)
    d.set_defaults(run=_download)


def _add_cache(sub, version: str) -> None:
    k = sub.add_parser("cache", help="list or clear the pretrained models' cache")
    k.add_argument("action", nargs="?", choices=("list", "clear"), default="list",
                   help="list (default) the cached files, or clear: delete them")
    k.set_defaults(run=_cache)


_DELEGATED = {"bench": "pyggml_resnet.bench", "convert": "pyggml_resnet.convert",
              "serve": "pyggml_resnet.serve.cli"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _DELEGATED:
        return importlib.import_module(_DELEGATED[argv[0]]).main(argv[1:], prog=f"pyggml-resnet {argv[0]}")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (Error, OSError) as e:
        return print_error(e)
    except KeyboardInterrupt:
        return 130
