"""Serving a model over HTTP: the Open Inference Protocol (KServe v2 REST, what Triton, KServe and MLServer
speak, so `tritonclient` works against it) and a plain `/classify` endpoint, with dynamic batching.

    serve.protocol   the protocol's messages <-> arrays (no web framework)
    serve.batcher    requests arriving together -> one forward pass, in one worker thread
    serve.app        the Starlette application (`create_app(model)`)
    serve.cli        `pyggml-resnet serve --model ...` on uvicorn
    serve.ray_serve  the same application as Ray Serve replicas

Needs the `[serve]` extra (`pip install 'pyggml-resnet[serve]'`); docs/serving.md has the guide.
"""
