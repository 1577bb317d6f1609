"""The benchmark's child processes: the engine workers, the cold starts and the one-off preparation of the
peers' models (PyTorch's state dict, the ONNX export and its int8 quantization), with the PyTorch ResNet they
run and the ONNX Runtime and OpenVINO sessions.

This file is run on its own (`procs._LAUNCH` loads it by path), not through the `pyggml_resnet` package, so
the torch, ONNX Runtime and OpenVINO processes carry nothing of ours but its standard-library imports: its top
level imports only the standard library, and everything else is imported where it is used.

Workers talk JSON lines over stdin/stdout: after start-up a worker prints {"ready": ...}; then it answers
{"cmd": "time", "batch": B, "iters": K} with {"first": seconds, "times": [seconds, ...]} (one untimed
forward first, "first": what another engine's turn left to redo), {"cmd": "logits", "path": P} with
{"logits": [[...], ...]} (one list per image of the .npy file P, each run at batch 1), and {"cmd": "exit"}
with {"maxrss_kib": N}; a failure is {"error": "..."}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

RUNTIMES = ("ggml", "torch", "onnxruntime", "openvino")  # what a worker process runs
# The bench's engines: name -> (runtime, precision). ggml's rows are one per stored type (--dtype); the int8
# engines run ONNX Runtime's static quantization of the f32 ONNX model (quantize_int8).
ENGINES = {"ggml": ("ggml", None), "torch": ("torch", "f32"), "onnxruntime": ("onnxruntime", "f32"),
           "onnxruntime-int8": ("onnxruntime", "int8"), "openvino": ("openvino", "f32"),
           "openvino-bf16": ("openvino", "bf16"), "openvino-int8": ("openvino", "int8")}
INPUT_SEED = 1000  # + batch size: the timed inputs, identical in every engine
COLD_SEED = 1  # the image of a cold start's first inference


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

    Block = _torch_block(block, groups, width_per_group)
    expansion = Block.expansion

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


def _torch_block(block: str, groups: int, width_per_group: int):
    """torchvision's BasicBlock ("basic") or Bottleneck ("bottleneck") as one nn.Module class."""
    from torch import nn
    from torch.nn import functional as F

    bottleneck = block == "bottleneck"

    class Block(nn.Module):
        expansion = 4 if bottleneck else 1

        def __init__(self, cin, planes, stride):
            super().__init__()
            cout = planes * self.expansion
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

    return Block


# --------------------------------------------------------------------------------------------------------
# The three kinds of child


def _engine_import(runtime: str):
    """Imports what a runtime needs (the "import" phase of a cold start)."""
    import numpy  # noqa: F401  (each engine imports it anyway; done here so no later phase pays for it)

    if runtime == "ggml":
        import pyggml_resnet
        return pyggml_resnet
    if runtime == "torch":
        import torch
        return torch
    if runtime == "openvino":
        import openvino
        return openvino
    import onnxruntime
    return onnxruntime


def _engine_load(runtime: str, mod, a):
    """Loads the model (the "load" phase); returns run(x: NCHW float32 array) -> logits array."""
    path, threads = a.path, a.threads
    if runtime == "ggml":
        model = mod.load(path, threads=threads, dtype=a.dtype, gemm=a.gemm)
        return model.logits
    if runtime == "torch":
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
    if runtime == "openvino":
        # An int8 model's precision is in its QDQ nodes: the rest runs in f32, as ONNX Runtime runs it.
        return openvino_session(path, threads, "bf16" if a.dtype == "bf16" else "f32")
    return onnxruntime_session(path, threads)


def export_onnx(model, path: str, size: int) -> str:
    """Writes the PyTorch module `model` (eval mode) as one self-contained ONNX file with a dynamic batch:
    input "image" (batch, 3, size, size), output "logits"."""
    import warnings

    import torch

    x = torch.zeros((1, 3, size, size))
    # The TorchScript exporter is quick and writes one file (chosen knowingly: its deprecation warning is
    # silenced); the dynamo one is the fallback for torch versions that have dropped it.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (x,), path, input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                              dynamo=False)
    except Exception:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(model, (x,), path, input_names=["image"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False)
    return path


def quantize_int8(f32_path: str, out_path: str, calibration) -> str:
    """ONNX Runtime's static quantization of the ONNX model at `f32_path`, as its documentation recommends for
    CNNs on CPUs: its pre-processing (shape inference, graph optimisation), then QDQ nodes with s8 weights per
    output channel and u8 activations whose ranges are the min and max seen over `calibration` (N, 3, H, W),
    fed one image at a time."""
    import tempfile

    import numpy as np
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name):
            self.feeds = iter([{name: x[None]} for x in np.asarray(calibration, np.float32)])

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(prefix="pyggml-quantize-") as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(f32_path, pre)
        name = onnx.load(pre, load_external_data=False).graph.input[0].name
        quantize_static(pre, out_path, Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return out_path


def onnxruntime_session(path: str, threads: int):
    """ONNX Runtime on the CPU with every graph optimisation, `threads` threads inside each op and one op at
    a time: run(x: NCHW float32 array) -> logits array."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_session(path: str, threads: int, precision: str = "f32"):
    """OpenVINO on the CPU tuned for one request at a time (PERFORMANCE_HINT=LATENCY) with `threads` threads,
    computing in `precision` ("f32" or "bf16"; its default would be bf16 on CPUs with native bf16):
    run(x: NCHW float32 array) -> logits array."""
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                     "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    # The output lives in the request's buffer, which the next inference overwrites: hand out a copy.
    return lambda x: request.infer({0: x}, share_inputs=True)[0].copy()


def _input(batch: int, size: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), np.float32)


def iterations(k: int, batch: int) -> int:
    """K iterations at batch 1, fewer for bigger batches (about K images' worth, at least one)."""
    return max(1, math.ceil(k / batch))


def peak_rss_kib() -> int:
    """This process's own peak resident memory, KiB. On Linux that is VmHWM: getrusage's ru_maxrss carries
    over fork and exec (and a vfork'd child, as Python's subprocess makes on Linux, takes the parent's
    peak), so every worker would report at least the bench parent's peak. Elsewhere ru_maxrss (macOS: bytes)."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak


def _protocol_stream():
    """A private copy of stdout for JSON lines; fd 1 then points at stderr, so whatever a library prints
    cannot corrupt the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def _worker(a, proto) -> int:
    import numpy

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
    ready = {"ready": True, "load_s": load_s, "warmup_s": per_iter}
    if a.engine == "ggml":  # what runs (repr: the path, and "bf16 (computed as f32)"): --gemm alone does not say
        ready["model"] = repr(run.__self__)  # run is the model's bound `logits`
    proto.write(json.dumps(ready) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "time":
            x, times = inputs[msg["batch"]], []
            for _ in range(1 + msg["iters"]):
                t = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - t)
            reply = {"first": times[0], "times": times[1:]}
        elif msg["cmd"] == "logits":  # of the test images in an .npy file, one at a time
            reply = {"logits": [[float(v) for v in run(x[None])[0]] for x in numpy.load(msg["path"])]}
        elif msg["cmd"] == "exit":
            proto.write(json.dumps({"maxrss_kib": peak_rss_kib()}) + "\n")
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
    run(_input(1, a.size, COLD_SEED))
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
        export_onnx(model, os.path.join(a.out, "model.onnx"), a.size)
    proto.write(json.dumps({"done": True}) + "\n")
    return 0


def _quantize(a, proto) -> int:
    """ONNX Runtime's static int8 quantization of the ONNX model at --path, calibrated on the images of the .npy
    file --calibration: model-int8.onnx in --out."""
    import numpy

    quantize_int8(a.path, os.path.join(a.out, "model-int8.onnx"), numpy.load(a.calibration))
    proto.write(json.dumps({"done": True}) + "\n")
    return 0


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="pyggml_resnet.bench.child")
    p.add_argument("mode", choices=["worker", "cold", "prepare", "quantize"])
    p.add_argument("--engine", choices=RUNTIMES, default="ggml")
    p.add_argument("--path", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="f32")
    p.add_argument("--gemm", default=None)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1])
    p.add_argument("--out", default=".")
    p.add_argument("--onnx", action="store_true")
    p.add_argument("--calibration", default=None)  # quantize: an .npy file of images
    p.add_argument("--block", required=True)  # the model's config, for the torch engine
    p.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], required=True)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--width-per-group", type=int, default=64)
    p.add_argument("--classes", type=int, required=True)
    a = p.parse_args(argv)
    proto = _protocol_stream()
    try:
        return {"worker": _worker, "cold": _cold, "prepare": _prepare, "quantize": _quantize}[a.mode](a, proto)
    except Exception as e:
        traceback.print_exc()
        proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1
