"""pyggml_resnet.serve: the Open Inference Protocol server, driven by tritonclient (Triton's own client, which we
did not write) and by plain HTTP, on a real uvicorn listening on a free port. Every result is compared exactly
with the same model called in this process: batching, JSON and binary transport must not change a bit.
"""

import asyncio
import importlib.util
import base64
import http.client
import io
import json
import re
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
if importlib.util.find_spec("tritonclient") is None:  # not imported here: see triton() below
    pytest.skip("needs tritonclient[http]", allow_module_level=True)

import pyggml_resnet  # noqa: E402
from pyggml_resnet.errors import InputError  # noqa: E402
from pyggml_resnet.serve.app import create_app  # noqa: E402
from pyggml_resnet.serve.batcher import Batcher  # noqa: E402
from test_reliability import _encoded, _png_header_only  # noqa: E402  (the bad files tried there)

CLASSES = 10


def triton():
    """tritonclient.http, imported when a test first uses it, not when pytest collects this module: it imports
    ml_dtypes, which teaches NumPy the name 'bfloat16' for the rest of the process, and test_convert checks
    what reading a bfloat16 safetensors file does without that (the converter's message differs)."""
    import tritonclient.http

    return tritonclient.http


class Server:
    """uvicorn serving `app` in a thread, on a port the OS picked."""

    def __init__(self, app):
        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()

    def request(self, method, path, body=None, headers=None):
        """(status, headers, body) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def json(self, method, path, message=None, **kw):
        status, _, body = self.request(method, path, None if message is None else json.dumps(message).encode(), **kw)
        return status, json.loads(body)


@pytest.fixture(scope="module")
def model(model_files):
    with pyggml_resnet.load(model_files(18, CLASSES)[2], threads=2) as m:
        yield m


@pytest.fixture(scope="module")
def server(model):
    with Server(create_app(model, max_batch=4)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = triton().InferenceServerClient(server.url, network_timeout=120)
    yield c
    c.close()


def photo(seed: int, size=(90, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def batch(model, n: int, seed: int = 0) -> np.ndarray:
    return np.stack([model.preprocess(photo(seed + i)) for i in range(n)])


def infer(client, model_name, x=None, files=None, outputs=(), binary=True, classes=0, wait=True):
    """tritonclient's infer with an FP32 batch `x` or encoded image `files`, asking for `outputs`; with
    wait=False, its async_infer (gevent's concurrency, in this thread), whose get_result() waits."""
    if x is not None:
        inp = triton().InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
    else:
        inp = triton().InferInput("image", [len(files)], "BYTES")
        inp.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=binary)
    wanted = [triton().InferRequestedOutput(o, binary_data=binary, class_count=classes) for o in outputs]
    return (client.infer if wait else client.async_infer)(model_name, [inp], outputs=wanted or None)


# -- tritonclient ----------------------------------------------------------------------------------------------

def test_tritonclient_sees_a_ready_server_and_the_models_metadata(client, model):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("resnet18") and not client.is_model_ready("resnet50")
    meta = client.get_model_metadata("resnet18")
    assert meta["name"] == "resnet18" and meta["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "input": ("FP32", [-1, 3, -1, -1]), "image": ("BYTES", [-1])}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "probabilities": ("FP32", [-1, CLASSES]), "logits": ("FP32", [-1, CLASSES]),
        "features": ("FP32", [-1, model.feature_dim])}
    assert meta["parameters"] == {"threads": model.threads, "dtype": model.dtype, "compute_dtype": model.compute_dtype,
                                  "gemm": model.gemm}
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "pyggml-resnet" and "binary_tensor_data" in server_meta["extensions"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_equals_the_model(client, model, binary):
    x = batch(model, 3)
    result = infer(client, "resnet18", x, outputs=("logits", "probabilities", "features"), binary=binary)
    np.testing.assert_array_equal(result.as_numpy("logits"), model.logits(x))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), model.probabilities(x))
    np.testing.assert_array_equal(result.as_numpy("features"), model.features(x))
    # with no outputs named, the probabilities
    default = infer(client, "resnet18", x[:1], binary=binary)
    assert [o["name"] for o in default.get_response()["outputs"]] == ["probabilities"]
    np.testing.assert_array_equal(default.as_numpy("probabilities"), model.probabilities(x[:1]))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_images_and_classification_equal_classify(client, model, binary):
    images = [photo(1), photo(2, (300, 200)), photo(3).convert("L")]
    files = [_encoded(images[0], "JPEG", quality=90), _encoded(images[1], "PNG"), _encoded(images[2], "PNG")]
    if not binary:  # JSON cannot carry bytes: each file goes as base64 (docs/serving.md)
        files = [base64.b64encode(f) for f in files]
    result = infer(client, "resnet18", files=files, outputs=("probabilities",), binary=binary, classes=3)
    want = model.classify([Image.open(io.BytesIO(f if binary else base64.b64decode(f))) for f in files], top_k=3)
    got = result.as_numpy("probabilities")
    assert got.shape == (3, 3)
    for row, predictions in zip(got, want):
        fields = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in row]
        assert [(float(v), int(i), label) for v, i, label in fields] == [(p.prob, p.index, p.label)
                                                                          for p in predictions]
    logits = infer(client, "resnet18", files=files, outputs=("logits",), binary=binary).as_numpy("logits")
    raw = [f if binary else base64.b64decode(f) for f in files]
    np.testing.assert_array_equal(logits, model.logits(np.stack([model.preprocess(f) for f in raw])))


def test_classify_endpoint_for_curl(server, model):
    image = photo(7)
    status, _, raw = server.request("POST", "/classify?top_k=4", _encoded(image, "JPEG", quality=95))
    assert status == 200
    answer = json.loads(raw)
    want = model.classify(Image.open(io.BytesIO(_encoded(image, "JPEG", quality=95))), top_k=4)
    assert answer["model"] == "resnet18"
    assert answer["predictions"] == [{"label": p.label, "index": p.index, "prob": p.prob} for p in want]


# -- batching --------------------------------------------------------------------------------------------------

def test_requests_arriving_together_share_a_pass_with_results_unchanged(model):
    """8 one-image requests sent at once to a server that waits for company: fewer passes than requests,
    and every response exactly the response the same request gets alone."""
    x = batch(model, 8, seed=20)
    with Server(create_app(model, max_batch=4, max_wait=0.3)) as s:
        with triton().InferenceServerClient(s.url, concurrency=8, network_timeout=120) as c:
            def one(i, wait=True):
                return infer(c, "resnet18", x[i:i + 1], outputs=("logits", "probabilities"), wait=wait)
            pending = [one(i, wait=False) for i in range(8)]
            together = [p.get_result().as_numpy("logits") for p in pending]
            batcher = s.app.state.server.batcher
            assert batcher.images == 8 and batcher.passes < 8  # some requests shared a pass
            shared = batcher.passes
            alone = [one(i).as_numpy("logits") for i in range(8)]  # one at a time: each in a pass of its own
            assert batcher.passes == shared + 8
    for i in range(8):
        np.testing.assert_array_equal(together[i], alone[i])
        np.testing.assert_array_equal(alone[i], model.logits(x[i:i + 1]))


class _Model:
    """A stand-in for Model.outputs that fails any batch holding a negative value, and counts its calls."""

    def __init__(self):
        self.calls = []

    def outputs(self, x, names):
        self.calls.append(len(x))
        if (x < 0).any():
            raise InputError("negative")
        return {name: x.reshape(len(x), -1)[:, :2] * (2 if name == "logits" else 1) for name in names}


def test_batcher_groups_by_size_and_one_failure_fails_one_request():
    fake = _Model()
    batcher = Batcher(fake, max_batch=3, max_wait=0.05)
    small, big = np.ones((1, 3, 4, 4), np.float32), np.ones((1, 3, 8, 8), np.float32)

    async def main():
        jobs = [batcher.compute(small * i, frozenset({"logits"})) for i in range(1, 4)]
        jobs += [batcher.compute(big, frozenset({"probs"})), batcher.compute(-small, frozenset({"probs"}))]
        return await asyncio.gather(*jobs, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    assert [r["logits"][0, 0] for r in results[:3]] == [2, 4, 6]
    assert results[3]["probs"][0, 0] == 1 and set(results[3]) == {"probs"}
    assert isinstance(results[4], InputError)
    # small x3 in one pass (max_batch 3), then big alone (another size), then the negative one, which fails
    assert fake.calls == [3, 1, 1]


# -- bad requests ------------------------------------------------------------------------------------------------

def fp32_message(shape, data=None, datatype="FP32", name="input"):
    data = [0.5] * int(np.prod(shape)) if data is None else data
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


def image_message(*files):
    return {"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES",
                        "data": [base64.b64encode(f).decode() for f in files]}]}


BAD_REQUESTS = {
    "not-json": (b"{not json", "not valid JSON"),
    "no-inputs": ({"outputs": []}, "exactly one tensor"),
    "two-inputs": ({"inputs": [fp32_message([1, 3, 4, 4])["inputs"][0]] * 2}, "exactly one tensor"),
    "wrong-rank": (fp32_message([3, 4, 4]), r"shape \[N, 3, H, W\]"),
    "four-channels": (fp32_message([1, 4, 4, 4]), r"shape \[N, 3, H, W\]"),
    "too-few-values": (fp32_message([1, 3, 4, 4], [0.5] * 47), "needs 48 values"),
    "strings": (fp32_message([1, 3, 1, 1], ["a", "b", "c"]), "numbers only"),
    "fp64": (fp32_message([1, 3, 4, 4], datatype="FP64"), "give 'input' as FP32"),
    "uint8-pixels": (fp32_message([1, 3, 4, 4], [1] * 48, datatype="UINT8"), "give 'input' as FP32"),
    "nan": (fp32_message([1, 3, 1, 1], [0.5, "NaN", 0.5]), "numbers only|NaN"),
    "huge-side": (fp32_message([1, 3, 1, 5000], []), "1..4096"),
    "negative-shape": (fp32_message([-1, 3, 4, 4], []), "non-negative"),
    "too-many-images": (fp32_message([65, 3, 1, 1]), "at most 64 images"),
    "unknown-output": ({**fp32_message([1, 3, 4, 4]), "outputs": [{"name": "softmax"}]}, "unknown output"),
    "classify-features": ({**fp32_message([1, 3, 4, 4]),
                           "outputs": [{"name": "features", "parameters": {"classification": 2}}]}, "class scores"),
    "too-many-classes": ({**fp32_message([1, 3, 4, 4]),
                          "outputs": [{"name": "logits", "parameters": {"classification": 11}}]}, "from 1 to 10"),
    "bad-base64": ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}, "base64"),
    "not-an-image": (image_message(b"this is not an image"), "not an image format"),
    "empty-image": (image_message(b""), "empty file"),
    "truncated-jpeg": (image_message(_encoded(photo(0), "JPEG")[:700]), "cannot read image"),
    "decompression-bomb": (image_message(_png_header_only(20000, 20000)), "decompression bomb"),
    "bomb-warning-size": (image_message(_png_header_only(10000, 10000)), "decompression bomb"),
}


@pytest.mark.parametrize("message, match", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_infer_requests_get_400_and_the_server_stays_up(server, message, match):
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    status, _, raw = server.request("POST", "/v2/models/resnet18/infer", body)
    assert status == 400, raw
    assert re.search(match, json.loads(raw)["error"]), raw
    assert server.request("GET", "/v2/health/ready")[0] == 200


def test_bad_binary_requests(server, client):
    x = np.zeros((1, 3, 4, 4), np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(x)}}]}).encode()
    path = "/v2/models/resnet18/infer"
    for body, length, match in [(header + x[:-4], len(header), "does not match"),
                                (header + x, len(header) + 1, "not valid JSON"),
                                (header + x, "many", "byte count"),
                                (header + x, len(header) * 100, "byte count")]:
        status, _, raw = server.request("POST", path, body, {"Inference-Header-Content-Length": str(length)})
        assert status == 400 and match in json.loads(raw)["error"], raw
    status, _, raw = server.request("POST", path, header + x, {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200
    # BYTES elements whose lengths run past the end
    files = b"\x10\x00\x00\x00abc"
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(files)}}]}).encode()
    status, _, raw = server.request("POST", path, header + files, {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "runs past the end" in json.loads(raw)["error"]
    # tritonclient raises the server's message
    with pytest.raises(triton().InferenceServerException, match="shape"):
        infer(client, "resnet18", np.zeros((1, 4, 8, 8), np.float32))


def test_other_refusals(server, model):
    assert server.json("GET", "/v2/models/resnet50")[0] == 404
    assert server.json("GET", "/v2/models/resnet18/versions/2")[0] == 404
    status, answer = server.json("POST", "/v2/models/resnet50/infer", fp32_message([1, 3, 4, 4]))
    assert status == 404 and "serves 'resnet18'" in answer["error"]
    assert server.json("GET", "/nothing/here")[0] == 404
    assert server.json("GET", "/v2/models/resnet18/infer")[0] == 405
    status, answer = server.json("POST", "/classify?top_k=11")
    assert status == 400 and "top_k" in answer["error"]
    status, answer = server.json("POST", "/classify")
    assert status == 400 and "--data-binary" in answer["error"]
    status, _, raw = server.request("POST", "/classify", b"GIF89a not really")
    assert status == 400 and "image data" in json.loads(raw)["error"]
    assert server.request("GET", "/v2/health/live")[0] == 200


def test_bodies_over_the_limit_get_413(model):
    with Server(create_app(model, max_body=1000)) as s:
        status, _, raw = s.request("POST", "/v2/models/resnet18/infer", b"x" * 1001)
        assert status == 413 and "limit of 1000 bytes" in json.loads(raw)["error"]
        # without a Content-Length (chunked), the limit holds as the body streams in
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/classify", body=iter([b"x" * 600] * 3), encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and "over this server's limit" in json.loads(response.read())["error"]
        conn.close()
        assert s.request("GET", "/v2/health/ready")[0] == 200


def test_the_event_loop_answers_while_a_pass_runs(server, model):
    """A health check during a long forward pass (48 images, 29 MB: near the body limit) is answered at once,
    not after the pass."""
    x = batch(model, 2).repeat(24, axis=0)
    done = {}

    def long_infer():
        t = time.perf_counter()
        header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        done["status"] = server.request("POST", "/v2/models/resnet18/infer", header + x.tobytes(),
                                        {"Inference-Header-Content-Length": str(len(header))})[0]
        done["seconds"] = time.perf_counter() - t

    worker = threading.Thread(target=long_infer)
    worker.start()
    batcher = server.app.state.server.batcher
    passes = batcher.passes
    time.sleep(0.3)  # the request is parsed and its pass has begun
    t = time.perf_counter()
    status, _, _ = server.request("GET", "/v2/health/ready")
    health = time.perf_counter() - t
    running = worker.is_alive() and batcher.passes == passes
    worker.join()
    assert status == 200 and done["status"] == 200
    assert running, "the pass ended before the health check: make it longer"
    assert health < done["seconds"] / 4, (health, done)
