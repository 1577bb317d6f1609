"""The HTTP application: the Open Inference Protocol's REST endpoints for one model, and `/classify` for
people with curl. A Starlette ASGI app, served by uvicorn (`pyggml-resnet serve`) or by Ray Serve replicas
(`pyggml_resnet.serve.ray_serve`); the same app in both.

    GET  /v2/health/live, /v2/health/ready        200 when live / ready
    GET  /v2                                      server metadata
    GET  /v2/models/NAME[/versions/1]             model metadata: inputs, outputs, datatypes, shapes
    GET  /v2/models/NAME[/versions/1]/ready       200 when the model can answer
    POST /v2/models/NAME[/versions/1]/infer       inference (serve.protocol)
    POST /classify?top_k=5                        an image file as the body -> top-k JSON

Errors come back as JSON {"error": "..."}: 400 for a bad request (InputError: not an image, a wrong shape or
datatype, a decompression bomb...), 404 for another model's name, 413 for a body over the limit. Parsing,
decoding and preprocessing run in worker threads and forward passes in the batcher's one thread, so the
event loop keeps answering health checks while the model computes.
"""

from __future__ import annotations

import contextlib

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import numpy as np

from ..errors import InputError
from ..model import top_predictions
from . import protocol
from .batcher import MAX_BATCH, MAX_WAIT, Batcher



class _Refused(Exception):
    """A request refused with an HTTP status other than 400."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Server:
    """What the routes share: the model, its name, the batcher and the limits."""

    def __init__(self, model, name: str | None, batcher: Batcher, max_body: int, max_images: int):
        self.model, self.batcher = model, batcher
        self.name = name or model.config.name
        self.max_body, self.max_images = max_body, max_images

    def check_name(self, request: Request) -> None:
        name, version = request.path_params["name"], request.path_params.get("version", protocol.VERSION)
        if name != self.name or version != protocol.VERSION:
            raise _Refused(404, f"no model {name!r} version {version!r} here: this server serves {self.name!r} "
                                f"version {protocol.VERSION}")

    async def body(self, request: Request) -> bytes:
        """The request's body, refused (413) as soon as it is known to exceed the limit."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise _Refused(413, f"the body of {int(declared)} bytes is over this server's limit of "
                                f"{self.max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise _Refused(413, f"the body is over this server's limit of {self.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def images(self, files: list[bytes]) -> np.ndarray:
        """Encoded image files -> the float32 NCHW batch `model.preprocess` makes, decoded off the loop."""
        def preprocess():
            crop = self.model.preprocessing.crop
            arrays = [self.model.preprocess(f) for f in files]
            return np.stack(arrays) if arrays else np.zeros((0, 3, crop, crop), np.float32)
        return await run_in_threadpool(preprocess)

    async def compute(self, x: np.ndarray, outputs: frozenset[str]) -> dict[str, np.ndarray]:
        if len(x) == 0:  # nothing to batch: the empty arrays, of the right widths
            return {name: np.zeros((0, self.model.feature_dim if name == "features" else self.model.num_classes),
                                   np.float32) for name in outputs}
        return await self.batcher.compute(x, outputs)

    # -- routes ------------------------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        if "name" in request.path_params:
            self.check_name(request)
        ready = not self.model.closed
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(protocol.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        self.check_name(request)
        return JSONResponse(protocol.model_metadata(self.name, self.model))

    async def infer(self, request: Request) -> Response:
        self.check_name(request)
        body = await self.body(request)
        header_length = request.headers.get(protocol.HEADER_LENGTH)
        req = await run_in_threadpool(protocol.parse_infer, body, header_length,
                                      num_classes=self.model.num_classes, max_images=self.max_images)
        x = req.tensor if req.images is None else await self.images(req.images)
        results = await self.compute(x, req.model_outputs)
        content, json_length = await run_in_threadpool(protocol.encode_infer, self.name, req, results,
                                                       self.model.labels)
        if json_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={protocol.HEADER_LENGTH: str(json_length)})

    async def classify(self, request: Request) -> Response:
        top_k = request.query_params.get("top_k", "5")
        if not top_k.isdigit() or not 1 <= int(top_k) <= self.model.num_classes:
            raise InputError(f"top_k must be an integer from 1 to {self.model.num_classes}, got {top_k!r}")
        body = await self.body(request)
        if not body:
            raise InputError("send an image file as the request's body (curl --data-binary @photo.jpg ...)")
        probs = (await self.compute(await self.images([body]), frozenset({"probs"})))["probs"][0]
        top = top_predictions(probs, int(top_k), self.model.labels)
        return JSONResponse({"model": self.name,
                             "predictions": [{"label": p.label, "index": p.index, "prob": p.prob} for p in top]})


def create_app(model, *, name: str | None = None, max_batch: int = MAX_BATCH, max_wait: float = MAX_WAIT,
               max_body: int = protocol.MAX_BODY, max_images: int = protocol.MAX_IMAGES,
               close_model: bool = False) -> Starlette:
    """The ASGI application serving `model` (a loaded `pyggml_resnet.Model`) as `name` (default: the model
    file's architecture name). max_batch, max_wait: dynamic batching (serve.batcher). max_body: the largest
    request body, in bytes. close_model: close the model when the application shuts down."""
    check_options(max_batch, max_wait, max_body, max_images)
    server = _Server(model, name, Batcher(model, max_batch=max_batch, max_wait=max_wait), max_body, max_images)
    model_paths = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
    routes = [Route("/v2/health/live", server.live), Route("/v2/health/ready", server.ready),
              Route("/v2", server.server_metadata), Route("/classify", server.classify, methods=["POST"])]
    for path in model_paths:
        routes += [Route(path, server.model_metadata), Route(path + "/ready", server.ready),
                   Route(path + "/infer", server.infer, methods=["POST"])]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.batcher.close()
        if close_model:
            model.close()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        InputError: lambda request, e: _error(400, e),
        _Refused: lambda request, e: _error(e.status, e),
        HTTPException: lambda request, e: _error(e.status_code, e.detail),
        Exception: lambda request, e: _error(500, f"internal error: {type(e).__name__}: {e}"),
    })
    app.state.server = server  # for tests and the Ray Serve wrapper: the batcher's counters
    return app


def check_options(max_batch: int, max_wait: float, max_body: int = 1, max_images: int = 1) -> None:
    """create_app's options, or InputError."""
    for what, value in (("max_batch", max_batch), ("max_body", max_body), ("max_images", max_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{what} must be a positive integer, got {value!r}")
    if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) or not 0 <= max_wait <= 1:
        raise InputError(f"max_wait must be 0 to 1 second, got {max_wait!r}")


def _error(status: int, message) -> JSONResponse:
    return JSONResponse({"error": str(message)}, status_code=status)
