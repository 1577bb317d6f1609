"""The server's application (serve.app) as Ray Serve replicas: past one machine, or one model per group of
cores on a large one. Ray Serve routes each HTTP request to a replica; each replica is a Ray actor that loads
its own copy of the model (from a path every node can read, or a registry name each node downloads into its
cache) with as many threads as the CPUs Ray assigned it (`cpus`, at least 1), and batches what reaches it as
`pyggml-resnet serve` does. Same endpoints, same answers. Needs `pip install 'pyggml-resnet[ray-serve]'`.

From Python:

    from ray import serve
    from pyggml_resnet.serve.ray_serve import deployment

    serve.run(deployment("/models/resnet50.gguf", replicas=2, cpus=2), route_prefix="/")

From the command line (a Ray Serve application builder; arguments as key=value):

    serve run pyggml_resnet.serve.ray_serve:build model=/models/resnet50.gguf replicas=2 cpus=2
"""

from __future__ import annotations

import os

from ray import serve

from ..errors import InputError
from ..hub import open_model
from ..ray import _assigned_cpus
from .app import check_options, create_app
from .batcher import MAX_BATCH, MAX_WAIT


@serve.ingress()
class Replica:
    """One replica: a model loaded in the actor, then the ASGI app around it (built by Ray Serve through
    `__serve_build_asgi_app__` once the constructor has run)."""

    def __init__(self, model: str, name: str | None, dtype: str | None, max_batch: int, max_wait: float):
        self._model = open_model(model, threads=_assigned_cpus(), dtype=dtype)
        self._options = {"name": name, "max_batch": max_batch, "max_wait": max_wait}

    def __serve_build_asgi_app__(self):
        return create_app(self._model, close_model=True, **self._options)


def deployment(model: str | os.PathLike, *, name: str | None = None, replicas: int = 1, cpus: float = 1,
               dtype: str | None = None, max_batch: int = MAX_BATCH, max_wait: float = MAX_WAIT):
    """A Ray Serve application serving `model` (a GGUF path, made absolute, or a registry name) as `name`
    from `replicas` replicas of `cpus` CPUs each; max_batch and max_wait as for `pyggml-resnet serve`."""
    model = os.fspath(model)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InputError(f"replicas must be a positive integer, got {replicas!r}")
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not cpus > 0:
        raise InputError(f"cpus must be a positive number, got {cpus!r}")
    check_options(max_batch, max_wait)  # here, not in a replica that would fail and be restarted
    model = os.path.abspath(model) if os.path.exists(model) else model  # replicas do not run in this directory
    replica = serve.deployment(Replica, name="pyggml-resnet", num_replicas=replicas,
                               ray_actor_options={"num_cpus": cpus})
    return replica.bind(model, name, dtype, max_batch, max_wait)


BUILD_ARGS = ("model", "name", "replicas", "cpus", "dtype", "max_batch", "max_wait_ms")


def build(args: dict[str, str]):
    """`serve run pyggml_resnet.serve.ray_serve:build model=PATH_OR_NAME [name=] [replicas=1] [cpus=1]
    [dtype=] [max_batch=4] [max_wait_ms=2]`: Ray Serve's application builder, arguments as strings."""
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown or "model" not in args:
        raise InputError(f"serve run pyggml_resnet.serve.ray_serve:build takes model=PATH_OR_NAME and "
                         f"optionally {', '.join(BUILD_ARGS[1:])}; got {sorted(args)}")
    try:
        numbers = {"replicas": int(args.get("replicas", 1)), "cpus": float(args.get("cpus", 1)),
                   "max_batch": int(args.get("max_batch", MAX_BATCH)),
                   "max_wait": float(args.get("max_wait_ms", MAX_WAIT * 1000)) / 1000}
    except ValueError as e:
        raise InputError(f"serve run pyggml_resnet.serve.ray_serve:build: {e}") from None
    return deployment(args["model"], name=args.get("name"), dtype=args.get("dtype"), **numbers)
