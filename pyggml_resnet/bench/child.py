"""The benchmark's child processes: the engine workers, the cold starts and the one-off PyTorch/ONNX
preparation, with the PyTorch ResNet they run.

This file is run on its own (`procs._LAUNCH` loads it by path), not through the `pyggml_resnet` package, so
the torch and ONNX Runtime processes carry nothing of ours but its standard-library imports: its top level
imports only the standard library, and everything else is imported where it is used.

Workers talk JSON lines over stdin/stdout: after start-up a worker prints {"ready": ...}; then it answers
{"cmd": "time", "batch": B, "iters": K} with {"times": [seconds, ...]}, {"cmd": "logits"} with
{"logits": [...]}, and {"cmd": "exit"} with {"maxrss_kib": N}; a failure is {"error": "..."}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

ENGINES = ("ggml", "torch", "onnxruntime")
INPUT_SEED = 1000  # + batch size: the timed inputs, identical in every engine
REFERENCE_SEED = 1  # the one image whose logits every engine must agree on


# --------------------------------------------------------------------------------------------------------
# The PyTorch model: torchvision's ResNet, module for module, so state dicts load strictly and the
# arithmetic (conv, BatchNorm in eval mode, in-place ReLU, adaptive average pool, linear) is the same.


def torch_resnet(block: str, layers, num_classes: int, groups: int = 1, width_per_group: int = 64):
    """An nn.Module identical to torchvision's ResNet with `block` ("basic"/"bottleneck") blocks per stage
    as `layers`, and torchvision's `groups` and `width_per_group` (Wide ResNet, ResNeXt), on the meta device:
    fill it with `load_state_dict(state, assign=True)`. The parent passes the config (from arch) on the
    command line: this process must not import the package."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    bottleneck = block == "bottleneck"
    expansion = 4 if bottleneck else 1

    class Block(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            cout = planes * expansion
            if bottleneck:  # torchvision (V1.5) puts the stride on the 3x3 conv, the grouped one
                width = int(planes * (width_per_group / 64.0)) * groups
                spec = [(cin, width, 1, 1, 1), (width, width, 3, stride, groups), (width, cout, 1, 1, 1)]
            else:
                spec = [(cin, planes, 3, stride, 1), (planes, planes, 3, 1, 1)]
            for i, (a, b, k, s, g) in enumerate(spec, start=1):
                setattr(self, f"conv{i}", nn.Conv2d(a, b, k, s, padding=k // 2, groups=g, bias=False))
                setattr(self, f"bn{i}", nn.BatchNorm2d(b))
            self.n = len(spec)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = x
            for i in range(1, self.n + 1):
                y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
                if i < self.n:
                    y = F.relu(y, inplace=True)
            shortcut = x if self.downsample is None else self.downsample(x)
            return F.relu(y + shortcut, inplace=True)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for stage, n in enumerate(layers, start=1):
                width = 64 * 2 ** (stage - 1)
                blocks = []
                for b in range(n):
                    blocks.append(Block(cin, width, 2 if stage > 1 and b == 0 else 1))
                    cin = width * expansion
                setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    with torch.device("meta"):  # no random init: every tensor comes from the state dict
        return ResNet().eval()


# --------------------------------------------------------------------------------------------------------
# The three kinds of child


def _engine_import(engine: str):
    """Imports what an engine needs (the "import" phase of a cold start)."""
    import numpy  # noqa: F401  (each engine imports it anyway; done here so no later phase pays for it)

    if engine == "ggml":
        import pyggml_resnet
        return pyggml_resnet
    if engine == "torch":
        import torch
        return torch
    import onnxruntime
    return onnxruntime


def _engine_load(engine: str, mod, a):
    """Loads the model (the "load" phase); returns run(x: NCHW float32 array) -> logits array."""
    path, threads = a.path, a.threads
    if engine == "ggml":
        model = mod.load(path, threads=threads, dtype=a.dtype, gemm=a.gemm)
        return model.logits
    if engine == "torch":
        torch = mod
        torch.set_num_threads(threads)
        # mmap + assign: no copy of the weights and no random init, PyTorch's cheapest standard way in.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        model = torch_resnet(a.block, a.layers, a.classes, a.groups, a.width_per_group)
        model.load_state_dict(state, assign=True)

        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()
        return run
    ort = mod
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _input(batch: int, size: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), np.float32)


def iterations(k: int, batch: int) -> int:
    """K iterations at batch 1, fewer for bigger batches (about K images' worth, at least one)."""
    return max(1, math.ceil(k / batch))


def _protocol_stream():
    """A private copy of stdout for JSON lines; fd 1 then points at stderr, so whatever a library prints
    cannot corrupt the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def _worker(a, proto) -> int:
    import resource

    mod = _engine_import(a.engine)
    t = time.perf_counter()
    run = _engine_load(a.engine, mod, a)
    load_s = time.perf_counter() - t
    inputs = {b: _input(b, a.size, INPUT_SEED + b) for b in a.batches}
    per_iter = {}
    for b in a.batches:  # warm-up: graphs, arenas, caches, lazy initialisation
        for _ in range(iterations(2, b)):
            t = time.perf_counter()
            run(inputs[b])
            per_iter[b] = time.perf_counter() - t
    proto.write(json.dumps({"ready": True, "load_s": load_s, "warmup_s": per_iter}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "time":
            x, times = inputs[msg["batch"]], []
            for _ in range(msg["iters"]):
                t = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - t)
            reply = {"times": times}
        elif msg["cmd"] == "logits":
            reply = {"logits": [float(v) for v in run(_input(1, a.size, REFERENCE_SEED))[0]]}
        elif msg["cmd"] == "exit":
            proto.write(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}) + "\n")
            return 0
        else:
            reply = {"error": f"unknown command {msg['cmd']!r}"}
        proto.write(json.dumps(reply) + "\n")
    return 0  # the parent went away


def _cold(a, proto) -> int:
    # time.monotonic is CLOCK_MONOTONIC on Linux: one clock for the whole machine, so the parent can
    # subtract the moment it started this process.
    mod = _engine_import(a.engine)
    t_import = time.monotonic()
    run = _engine_load(a.engine, mod, a)
    t_load = time.monotonic()
    run(_input(1, a.size, REFERENCE_SEED))
    t_first = time.monotonic()
    proto.write(json.dumps({"import_end": t_import, "load_end": t_load, "first_end": t_first}) + "\n")
    return 0


def _prepare(a, proto) -> int:
    """From the GGUF file: the .pth state dict PyTorch loads, and (with --onnx) the ONNX model."""
    import torch

    from pyggml_resnet import loader

    tensors = loader.read(a.path).tensors()  # float32 arrays in PyTorch's shapes
    state = {k: torch.from_numpy(v) for k, v in tensors.items()}
    for name in tensors:  # torchvision's BatchNorm has a step counter that inference never reads
        if name.endswith(".running_var"):
            state[name[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    model = torch_resnet(a.block, a.layers, a.classes, a.groups, a.width_per_group)
    model.load_state_dict(state, assign=True)  # strict: the module is torchvision's, name for name
    torch.save(model.state_dict(), os.path.join(a.out, "model.pth"))
    if a.onnx:
        x = torch.from_numpy(_input(1, a.size, REFERENCE_SEED))
        path = os.path.join(a.out, "model.onnx")
        # The TorchScript exporter is quick and writes one self-contained file; the dynamo one is the
        # fallback for torch versions that have dropped it.
        try:
            torch.onnx.export(model, (x,), path, input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                              dynamo=False)
        except Exception:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(model, (x,), path, input_names=["image"], output_names=["logits"],
                              dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False)
    proto.write(json.dumps({"done": True}) + "\n")
    return 0


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="pyggml_resnet.bench.child")
    p.add_argument("mode", choices=["worker", "cold", "prepare"])
    p.add_argument("--engine", choices=ENGINES, default="ggml")
    p.add_argument("--path", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="f32")
    p.add_argument("--gemm", default=None)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1])
    p.add_argument("--out", default=".")
    p.add_argument("--onnx", action="store_true")
    p.add_argument("--block", required=True)  # the model's config, for the torch engine
    p.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], required=True)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--width-per-group", type=int, default=64)
    p.add_argument("--classes", type=int, required=True)
    a = p.parse_args(argv)
    proto = _protocol_stream()
    try:
        return {"worker": _worker, "cold": _cold, "prepare": _prepare}[a.mode](a, proto)
    except Exception as e:
        traceback.print_exc()
        proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1
