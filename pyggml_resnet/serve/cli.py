"""`pyggml-resnet serve --model NAME_OR_PATH ...`: one model behind HTTP (the Open Inference Protocol), on
uvicorn. See docs/serving.md."""

from __future__ import annotations

import argparse
import sys

from ..cli import positive
from ..dtypes import NAMES as DTYPES
from ..errors import Error, print_error
from . import protocol
from .batcher import MAX_BATCH, MAX_WAIT


def build_parser(prog: str = "pyggml-resnet serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--model", required=True, help="a .gguf file, or a pretrained name such as resnet50")
    p.add_argument("--name", help="the model's name in the protocol's paths (default: the file's "
                                  "architecture, e.g. resnet50)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this "
                                                       "machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=positive, default=None,
                   help="ggml threads per forward pass (default: OMP_NUM_THREADS, else every CPU available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight type at load (default: as stored)")
    p.add_argument("--max-batch", type=positive, default=MAX_BATCH,
                   help="the most images that requests arriving together share in one forward pass "
                        "(default %(default)s; more makes the model rebuild graphs, see docs/serving.md)")
    p.add_argument("--max-wait-ms", type=float, default=MAX_WAIT * 1000,
                   help="how long an idle server waits for more requests to batch with the first "
                        "(default %(default)s)")
    p.add_argument("--max-body-mb", type=positive, default=protocol.MAX_BODY >> 20,
                   help="the largest request body in MiB; larger ones get 413 (default %(default)s)")
    p.add_argument("--max-pixels", type=positive, default=None, metavar="N",
                   help="decode images of up to N pixels (default: Pillow's decompression-bomb limit)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv: list[str] | None = None, prog: str = "pyggml-resnet serve") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        import uvicorn

        from . import app as serve_app
    except ImportError:
        return print_error(ImportError("serving needs the [serve] extra: pip install 'pyggml-resnet[serve]'"))
    from PIL import Image

    from .. import hub

    if args.max_pixels:
        Image.MAX_IMAGE_PIXELS = args.max_pixels  # Pillow's guard, which every decode here obeys
    try:
        model = hub.open_model(args.model, threads=args.threads, dtype=args.dtype)
        app = serve_app.create_app(model, name=args.name, max_batch=args.max_batch,
                                   max_wait=args.max_wait_ms / 1000, max_body=args.max_body_mb << 20,
                                   close_model=True)
    except (Error, OSError) as e:
        return print_error(e)
    print(f"serving {model!r} as {app.state.server.name!r} on http://{args.host}:{args.port}", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        model.close()  # the app closes it at shutdown, unless uvicorn never started it
    return 0
