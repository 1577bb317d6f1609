"""The Open Inference Protocol's (KServe v2) REST messages for one ResNet: request bodies in, arrays out, and
back. With Triton's two extensions that its client uses by default: binary tensor data (a JSON header, then
raw tensors, its length in the `Inference-Header-Content-Length` header) and classification (an output
asked for with `"parameters": {"classification": k}` comes back as k "value:index:label" strings per image).

No web framework here: `serve.app` routes requests and calls these functions; everything a client sends is
checked here and refused with InputError (HTTP 400) and a message that says what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..errors import InputError
from ..model import MAX_SIDE, top_predictions

HEADER_LENGTH = "inference-header-content-length"  # Triton's binary extension: the JSON part's length
INPUT = "input"  # FP32 [N, 3, H, W]: images already preprocessed
IMAGE = "image"  # BYTES [N]: encoded image files (JPEG, PNG, ...), preprocessed as the model file says
OUTPUTS = {"probabilities": "probs", "logits": "logits", "features": "features"}  # protocol name -> Model's
DEFAULT_OUTPUTS = ("probabilities",)
EXTENSIONS = ("binary_tensor_data", "classification")
VERSION = "1"  # one model, one version: the protocol's paths may name it
MAX_BODY = 32 << 20  # bytes: 16 images of 224x224 as binary FP32 take 9.6 MB, as JSON text ~30 MB
MAX_IMAGES = 64  # per request: more would hold the worker (and every other request) for seconds


@dataclass(frozen=True)
class Output:
    """An output a request asked for: its name, whether it comes back as binary data, and k for top-k."""

    name: str
    binary: bool = False
    classes: int = 0  # 0: the tensor itself; k: the classification extension's top-k strings


@dataclass(frozen=True)
class InferRequest:
    """A checked infer request: exactly one of `tensor` (float32 NCHW) and `images` (encoded files)."""

    id: str | None
    tensor: np.ndarray | None
    images: list[bytes] | None
    outputs: tuple[Output, ...]

    @property
    def model_outputs(self) -> frozenset[str]:
        """The Model outputs ("probs", "logits", "features") that answer this request."""
        return frozenset(OUTPUTS[o.name] for o in self.outputs)


def server_metadata() -> dict:
    return {"name": "pyggml-resnet", "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, model) -> dict:
    """The model's inputs and outputs, -1 for a size the request chooses."""
    return {
        "name": name,
        "versions": [VERSION],
        "platform": "pyggml_resnet",
        "parameters": {"threads": model.threads, "dtype": model.dtype, "compute_dtype": model.compute_dtype,
                       "gemm": model.gemm},
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, 3, -1, -1]},
                   {"name": IMAGE, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, model.num_classes]},
                    {"name": "logits", "datatype": "FP32", "shape": [-1, model.num_classes]},
                    {"name": "features", "datatype": "FP32", "shape": [-1, model.feature_dim]}],
    }


# -- requests ------------------------------------------------------------------------------------------------

def parse_infer(body: bytes, header_length: str | None, *, num_classes: int, max_images: int) -> InferRequest:
    """An infer request's body (and its Inference-Header-Content-Length header, if any) -> InferRequest."""
    header, binary = _split(body, header_length)
    try:
        message = json.loads(header)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"the request is not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise InputError("the request must be a JSON object with an 'inputs' list")
    inputs = message.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError(f"'inputs' must list exactly one tensor: '{INPUT}' (FP32 [N, 3, H, W]) or "
                         f"'{IMAGE}' (BYTES [N], encoded image files)")
    spec = inputs[0]
    shape = _shape(spec)
    data = _data(spec, binary)
    if shape[0] > max_images:
        raise InputError(f"at most {max_images} images per request, got {shape[0]}")
    name, datatype = spec.get("name"), spec.get("datatype")
    if name == INPUT and datatype == "FP32":
        tensor, images = _fp32(shape, data), None
    elif name == IMAGE and datatype == "BYTES":
        tensor, images = None, _images(shape, data)
    else:
        raise InputError(f"input {name!r} of datatype {datatype!r}: give '{INPUT}' as FP32 (preprocessed "
                         f"images) or '{IMAGE}' as BYTES (image files)")
    request_id = message.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InputError("'id' must be a string")
    return InferRequest(request_id, tensor, images, _outputs(message, num_classes))


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a body: all JSON without the binary extension's header."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise InputError(f"Inference-Header-Content-Length must be a byte count from 0 to the body's "
                         f"{len(body)}, got {header_length!r}")
    return body[:n], body[n:]


def _shape(spec: dict) -> list[int]:
    shape = spec.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InputError(f"input 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def _data(spec: dict, binary: bytes):
    """The input's data: raw bytes (binary extension) or the JSON 'data' list."""
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise InputError("the body has binary data after its JSON, but no input has 'binary_data_size'")
        if "data" not in spec or not isinstance(spec["data"], list):
            raise InputError("the input needs a 'data' list, or binary data ('binary_data_size')")
        return spec["data"]
    if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
        raise InputError(f"binary_data_size {size!r} does not match the {len(binary)} bytes after the JSON")
    return binary


def _fp32(shape: list[int], data) -> np.ndarray:
    if len(shape) != 4 or shape[1] != 3:
        raise InputError(f"input '{INPUT}' must have shape [N, 3, H, W], got {shape}")
    if not all(1 <= side <= MAX_SIDE for side in shape[2:]):
        raise InputError(f"image height and width must be 1..{MAX_SIDE}, got {shape[2]}x{shape[3]}")
    count = math.prod(shape)
    if isinstance(data, bytes):
        if len(data) != 4 * count:
            raise InputError(f"shape {shape} needs {4 * count} bytes of FP32 data, got {len(data)}")
        x = np.frombuffer(data, "<f4").astype(np.float32)  # a native, writable copy
    else:
        try:
            x = np.array(data, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InputError(f"input '{INPUT}': 'data' must hold numbers only ({e})") from None
        if x.size != count:
            raise InputError(f"shape {shape} needs {count} values, got {x.size}")
    x = x.reshape(shape)
    if not np.isfinite(x).all():  # refused here, so that it cannot fail the other requests of a batch
        raise InputError(f"input '{INPUT}' contains NaN or infinite values")
    return x


def _images(shape: list[int], data) -> list[bytes]:
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InputError(f"input '{IMAGE}' must have shape [N] or [N, 1] (one file per image), got {shape}")
    if isinstance(data, bytes):
        items = _unpack_bytes(data)
    else:  # JSON cannot hold binary: each element is the file in base64
        try:
            items = [base64.b64decode(s, validate=True) for s in data]
        except (TypeError, ValueError, binascii.Error) as e:
            raise InputError(f"input '{IMAGE}': in JSON, each element must be a file in base64 ({e})") from None
    if len(items) != shape[0]:
        raise InputError(f"shape {shape} needs {shape[0]} images, got {len(items)}")
    return items


def _unpack_bytes(data: bytes) -> list[bytes]:
    """Triton's binary BYTES tensor: each element a little-endian uint32 length, then that many bytes."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InputError("binary BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + n > len(data):
            raise InputError(f"binary BYTES data: an element of {n} bytes runs past the end")
        items.append(data[offset:offset + n])
        offset += n
    return items


def _outputs(message: dict, num_classes: int) -> tuple[Output, ...]:
    params = message.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError("'parameters' must be an object")
    all_binary = _flag(params, "binary_data_output")
    specs = message.get("outputs")
    if specs is None:
        return tuple(Output(name, all_binary) for name in DEFAULT_OUTPUTS)
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
        raise InputError("'outputs' must be a non-empty list of objects with a 'name'")
    outputs = []
    for spec in specs:
        name = spec.get("name")
        if name not in OUTPUTS:
            raise InputError(f"unknown output {name!r}: this model has {', '.join(OUTPUTS)}")
        p = spec.get("parameters") or {}
        if not isinstance(p, dict):
            raise InputError(f"output {name!r}: 'parameters' must be an object")
        k = p.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= num_classes:
            raise InputError(f"output {name!r}: classification must be an integer from 1 to {num_classes}, "
                             f"got {k!r}")
        if k and name == "features":
            raise InputError("classification needs class scores: ask it of 'probabilities' or 'logits'")
        outputs.append(Output(name, all_binary or _flag(p, "binary_data"), k))
    return tuple(outputs)


def _flag(params: dict, key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"parameter {key!r} must be true or false, got {value!r}")
    return value


# -- responses -----------------------------------------------------------------------------------------------

def encode_infer(model_name: str, request: InferRequest, results: dict[str, np.ndarray],
                 labels) -> tuple[bytes, int | None]:
    """The response body for `results` (Model output name -> (N, width) float32), and the JSON part's
    length when binary data follows it (None: the body is all JSON)."""
    tensors, chunks = [], []
    for out in request.outputs:
        values = results[OUTPUTS[out.name]]
        if out.classes:
            strings = [[f"{p.prob!r}:{p.index}:{p.label}" for p in top_predictions(row, out.classes, labels)]
                       for row in values]
            tensor = {"name": out.name, "datatype": "BYTES", "shape": [len(values), out.classes]}
            raw = _pack_bytes(s.encode() for row in strings for s in row) if out.binary else None
            data = strings
        else:
            tensor = {"name": out.name, "datatype": "FP32", "shape": list(values.shape)}
            raw = values.astype("<f4").tobytes() if out.binary else None
            data = values.tolist()  # float32 -> float64 -> shortest repr: exact both ways
        if raw is None:
            tensor["data"] = [x for row in data for x in row]  # flat, row-major
        else:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        tensors.append(tensor)
    message = {"model_name": model_name, "model_version": VERSION, "outputs": tensors}
    if request.id is not None:
        message["id"] = request.id
    header = json.dumps(message, separators=(",", ":")).encode()
    return (header, None) if not chunks else (header + b"".join(chunks), len(header))


def _pack_bytes(items) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)
