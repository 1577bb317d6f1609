"""pyggml_resnet.serve.ray_serve on a local Ray (2 CPUs): the server's application as Ray Serve replicas,
driven by tritonclient through Ray Serve's HTTP proxy, with results equal to the model in this process and
each replica's threads taken from the CPUs it was given. One Ray and one Serve instance for the module."""

import importlib.util
import socket

import numpy as np
import pytest

pytest.importorskip("ray.serve")
if importlib.util.find_spec("tritonclient") is None:  # not imported here: see test_serve.triton
    pytest.skip("needs tritonclient[http]", allow_module_level=True)

import ray  # noqa: E402
from ray import serve  # noqa: E402

import pyggml_resnet  # noqa: E402
from pyggml_resnet.errors import InputError  # noqa: E402
from pyggml_resnet.serve import ray_serve  # noqa: E402
from test_serve import triton  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray(\.|$)")


@pytest.fixture(scope="module")
def model_path(model_files):
    return str(model_files(18, 10)[2])


@pytest.fixture(scope="module")
def port():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    with socket.socket() as s:  # a free port for Serve's proxy (released just before it binds it)
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": free})
    yield free
    serve.shutdown()
    ray.shutdown()


def test_builder_checks_its_arguments(model_path):
    app = ray_serve.build({"model": model_path, "replicas": "2", "cpus": "0.5", "max_wait_ms": "1"})
    assert isinstance(app, serve.Application)
    for args, match in [({}, "model=PATH_OR_NAME"), ({"model": model_path, "replica": "2"}, "got"),
                        ({"model": model_path, "replicas": "two"}, "invalid literal"),
                        ({"model": model_path, "replicas": "0"}, "replicas"),
                        ({"model": model_path, "cpus": "-1"}, "cpus"),
                        ({"model": model_path, "max_batch": "0"}, "max_batch")]:
        with pytest.raises(InputError, match=match):
            ray_serve.build(args)


def test_replicas_serve_the_models_results_with_their_cpus_as_threads(port, model_path):
    """Two 1-CPU replicas: each computes with 1 thread (not the machine's 2, the default outside Ray)."""
    serve.run(ray_serve.build({"model": model_path, "name": "r18", "replicas": "2", "cpus": "1"}),
              name="pyggml", route_prefix="/")
    x = np.random.default_rng(3).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with pyggml_resnet.load(model_path, threads=1) as model, \
            triton().InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120) as client:
        assert client.is_server_ready() and client.is_model_ready("r18")
        meta = client.get_model_metadata("r18")
        assert meta["parameters"]["threads"] == 1
        inp = triton().InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for _ in range(4):  # answered by either replica
            result = client.infer("r18", [inp], outputs=[triton().InferRequestedOutput("logits"),
                                                         triton().InferRequestedOutput("probabilities")])
            np.testing.assert_array_equal(result.as_numpy("logits"), model.logits(x))
            np.testing.assert_array_equal(result.as_numpy("probabilities"), model.probabilities(x))
        with pytest.raises(triton().InferenceServerException, match="shape"):
            client.infer("r18", [triton().InferInput("input", [1, 4, 8, 8], "FP32")
                                 .set_data_from_numpy(np.zeros((1, 4, 8, 8), np.float32))])
    serve.delete("pyggml")
