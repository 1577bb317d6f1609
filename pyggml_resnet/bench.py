"""Benchmark: ggml against PyTorch eager (and ONNX Runtime) on the same ResNet weights, same CPU threads.

    pyggml-resnet bench [--model M.gguf | --arch resnet101] [--batch 1 8] [--threads N] [--rounds R]
                        [--iters K] [--dtype f32 bf16 ...] [--engines ggml torch onnxruntime] [--json OUT]

Without --model a seeded random model is made with NumPy and written as GGUF, so a fresh machine needs no
torch and no download; torch and onnxruntime are then optional engines, skipped with a note if missing.

How the numbers are made fair:

* Each engine runs in its own fresh process, so its peak RSS is its own and no engine's import, threads or
  allocator state touches another's. The ggml process never imports torch. Worker processes load this file
  directly (`_LAUNCH`), not through the `pyggml_resnet` package, so the torch and ONNX Runtime processes
  carry nothing of ours but this module's standard-library imports.
* Workers are started and warmed up one after the other, then wait idle while another one runs. The timed
  part is interleaved: each round runs every engine in turn (in rotating order) for every batch size, so
  slow drift of a shared machine (other load, clocks, heat) spreads over all engines instead of biasing
  whichever ran last. Every sample is one full forward of a batch, timed with perf_counter in the worker.
* Correctness is checked in the same run on the same weights: every engine's logits for one fixed image,
  as a relative L2 error against PyTorch.
* Cold start is measured in one more fresh process per engine, from just before `python` starts to the
  first logits of one image, after the timed rounds (so every engine's libraries are in the page cache).
  PyTorch loads a `.pth` state dict the way a careful user would (mmap, meta-device model, assign=True).

Workers talk JSON lines over stdin/stdout: after start-up a worker prints {"ready": ...}; then it answers
{"cmd": "time", "batch": B, "iters": K} with {"times": [seconds, ...]}, {"cmd": "logits"} with
{"logits": [...]}, and {"cmd": "exit"} with {"maxrss_kib": N}; a failure is {"error": "..."}.

This module's top level imports only the standard library (see above); everything else is imported
where it is used.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ENGINES = ("ggml", "torch", "onnxruntime")
SEED = 0  # of the random model's weights
INPUT_SEED = 1000  # + batch size: the timed inputs, identical in every engine
REFERENCE_SEED = 1  # the one image whose logits every engine must agree on
READY_TIMEOUT = 900.0  # s for a worker to import, load and warm up (resnet152 at batch 16 on few cores)
COLD_TIMEOUT = 600.0
PREPARE_TIMEOUT = 900.0
SWITCH_PAUSE = 0.05  # s between engines: lets the last one's spinning worker threads (OpenMP, ORT) go idle

# Runs this file as a standalone module in a child process: `import pyggml_resnet` would otherwise be
# paid for (time and RSS) by the torch and ONNX Runtime processes too. The name differs from
# "pyggml_resnet.bench", but the bytecode cache is shared (it is keyed by the file's path).
_LAUNCH = ("import importlib.util as u; s = u.spec_from_file_location('pyggml_resnet_bench', {path!r}); "
           "m = u.module_from_spec(s); s.loader.exec_module(m); sys.exit(m._child_main(sys.argv[1:]))")


def _python_c(code: str) -> list[str]:
    """`python -c code`, with the directory that holds this package first on sys.path. `-c` puts the working
    directory there, where a source checkout's pyggml_resnet (without its built extension) would shadow the
    installed package the parent runs from."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [sys.executable, "-c", f"import sys; sys.path[0] = {root!r}; {code}"]


# --------------------------------------------------------------------------------------------------------
# Work per image


def flops_per_image(cfg, height: int = 224, width: int | None = None, num_classes: int = 1000) -> int:
    """2 * multiply-accumulates of every convolution and the fc layer for one image of this size.

    `cfg` is an `arch.ResNetConfig` or a name such as "resnet101". BatchNorm, ReLU, the residual adds and
    pooling are left out, as in the usual quoted figures (ResNet-50: 4.1 GMACs, ResNet-101: 7.8)."""
    from pyggml_resnet import arch

    if isinstance(cfg, str):
        cfg = arch.BY_NAME[cfg]
    width = height if width is None else width

    def conv_macs(conv, size):  # (MACs, output size) of one conv on an input of `size`
        out = (conv.out_size(size[0]), conv.out_size(size[1]))
        return math.prod(conv.shape) * out[0] * out[1], out

    macs, size = conv_macs(arch.STEM, (height, width))
    size = tuple((n - 1) // 2 + 1 for n in size)  # the stem's 3x3/2 max pool, padding 1
    for block in arch.block_names(cfg):
        main, down = arch.block_convs(cfg, block)
        if down:  # the shortcut convolves the block's input
            macs += conv_macs(down, size)[0]
        for conv in main:
            m, size = conv_macs(conv, size)
            macs += m
    macs += cfg.feature_dim * num_classes
    return 2 * macs


# --------------------------------------------------------------------------------------------------------
# The random model (NumPy only)


def random_state(cfg, num_classes: int = 1000, seed: int = SEED) -> dict:
    """A torchvision-shaped state dict of seeded random weights whose activations keep a sane scale.

    He (fan-in) convolutions with BatchNorm near identity keep every layer's output around unit scale, and
    each block's last BatchNorm has a small gain, as trained ResNets do, so the residual additions (one per
    block) do not blow the scale up. No value comes near the denormal range, which would slow some engines and not
    others. The fc layer gives logits of order 1, so top-1 is a meaningful comparison."""
    import numpy as np

    from pyggml_resnet import arch

    rng = np.random.default_rng(seed)
    last_bn = {arch.block_convs(cfg, block)[0][-1].bn for block in arch.block_names(cfg)}
    state = {}
    for name, shape in arch.expected_tensors(cfg, num_classes).items():
        if len(shape) == 4:  # conv
            state[name] = rng.standard_normal(shape, np.float32) * np.float32(math.sqrt(2 / math.prod(shape[1:])))
        elif name == "fc.weight":
            state[name] = rng.standard_normal(shape, np.float32) * np.float32(1 / math.sqrt(shape[1]))
        elif name == "fc.bias":
            state[name] = rng.standard_normal(shape, np.float32) * np.float32(0.01)
        else:  # BatchNorm
            prefix, param = name.rsplit(".", 1)
            noise = rng.standard_normal(shape, np.float32)
            if param == "weight":
                state[name] = (1 + np.float32(0.1) * noise) * np.float32(0.2 if prefix in last_bn else 1.0)
            elif param == "running_var":
                state[name] = 1 + np.float32(0.1) * np.abs(noise)
            else:  # bias, running_mean
                state[name] = np.float32(0.05) * noise
    return state


# --------------------------------------------------------------------------------------------------------
# The PyTorch model: torchvision's ResNet, module for module, so state dicts load strictly and the
# arithmetic (conv, BatchNorm in eval mode, in-place ReLU, adaptive average pool, linear) is the same.


def torch_resnet(block: str, layers, num_classes: int):
    """An nn.Module identical to torchvision's ResNet with `block` ("basic"/"bottleneck") blocks per stage
    as `layers`, on the meta device: fill it with `load_state_dict(state, assign=True)`. The parent passes
    the config (from arch) on the command line: this process must not import the package."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    bottleneck = block == "bottleneck"
    expansion = 4 if bottleneck else 1

    class Block(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * expansion
            if bottleneck:  # torchvision (V1.5) puts the stride on the 3x3 conv
                spec = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
            else:
                spec = [(cin, width, 3, stride), (width, width, 3, 1)]
            for i, (a, b, k, s) in enumerate(spec, start=1):
                setattr(self, f"conv{i}", nn.Conv2d(a, b, k, s, padding=k // 2, bias=False))
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
# Child processes: workers, cold starts, and the one-off PyTorch/ONNX preparation


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
        model = mod.load(path, threads=threads, dtype=a.dtype)
        return model.logits
    if engine == "torch":
        torch = mod
        torch.set_num_threads(threads)
        # mmap + assign: no copy of the weights and no random init, PyTorch's cheapest standard way in.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        model = torch_resnet(a.block, a.layers, a.classes)
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


def _iterations(k: int, batch: int) -> int:
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
        for _ in range(_iterations(2, b)):
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
    model = torch_resnet(a.block, a.layers, a.classes)
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


def _child_main(argv) -> int:
    p = argparse.ArgumentParser(prog="pyggml_resnet.bench (child process)")
    p.add_argument("mode", choices=["worker", "cold", "prepare"])
    p.add_argument("--engine", choices=ENGINES, default="ggml")
    p.add_argument("--path", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="f32")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1])
    p.add_argument("--out", default=".")
    p.add_argument("--onnx", action="store_true")
    p.add_argument("--block", required=True)  # the model's config, for the torch engine
    p.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], required=True)
    p.add_argument("--classes", type=int, required=True)
    a = p.parse_args(argv)
    proto = _protocol_stream()
    try:
        return {"worker": _worker, "cold": _cold, "prepare": _prepare}[a.mode](a, proto)
    except Exception as e:
        traceback.print_exc()
        proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1


def _child_command(mode: str, engine: str, path, cfg, num_classes: int, **options) -> list[str]:
    cmd = _python_c(_LAUNCH.format(path=os.path.abspath(__file__)))
    cmd += [mode, "--engine", engine, "--path", str(path), "--block", cfg.block,
            "--layers", ",".join(map(str, cfg.layers)), "--classes", str(num_classes)]
    for key, value in options.items():
        if value is True:
            cmd.append(f"--{key}")
        elif value not in (None, False):
            cmd += [f"--{key}", ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return cmd


# --------------------------------------------------------------------------------------------------------
# The parent's side of a worker


class WorkerError(Exception):
    pass


class Worker:
    """A long-lived engine process and its JSON-lines pipe, with a timeout on every answer."""

    def __init__(self, cmd: list[str], log_path: str):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # A session of its own: Ctrl-C reaches only the parent, which then ends every worker itself.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        self._buf = b""

    def send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerError(self._died()) from None

    def receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"no answer within {timeout:.0f} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise WorkerError(self._died())
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = _decode(line)
        if "error" in msg:
            raise WorkerError(msg["error"])
        return msg

    def request(self, msg: dict, timeout: float) -> dict:
        self.send(msg)
        return self.receive(timeout)

    def _died(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        why = f"exited with status {code}" if code is not None else "closed its output"
        if code is not None and code < 0:
            why = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
        tail = log_tail(self.log_path)
        return why + (f": {tail}" if tail else "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self._log):
            with contextlib.suppress(Exception):
                f.close()


def _decode(line: bytes) -> dict:
    try:
        msg = json.loads(line)
    except ValueError:
        msg = None
    return msg if isinstance(msg, dict) else {"error": f"garbled answer {line[:200]!r}"}


def log_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _run_child(cmd: list[str], log_path: str, timeout: float) -> tuple[dict, float]:
    """Runs a one-shot child to completion: (its JSON answer, the monotonic time just before it started)."""
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WorkerError(f"did not finish within {timeout:.0f} s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = out.strip().splitlines()
    msg = _decode(lines[-1]) if lines else {"error": f"exited with status {proc.returncode}: "
                                                     f"{log_tail(log_path)}"}
    if "error" in msg:
        raise WorkerError(msg["error"])
    return msg, t0


# --------------------------------------------------------------------------------------------------------
# The run


def _progress(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def _parse_args(argv):
    from pyggml_resnet.arch import BY_NAME, DTYPES
    from pyggml_resnet.cli import positive
    from pyggml_resnet.ggml import default_threads

    p = argparse.ArgumentParser(prog="pyggml-resnet bench",
                                description="Time ggml against PyTorch eager and ONNX Runtime on the same "
                                            "ResNet weights, each engine in its own process, and check that "
                                            "they agree.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a GGUF model file (default: a seeded random model of --arch)")
    src.add_argument("--arch", choices=list(BY_NAME), default="resnet101",
                     help="architecture of the random model (default: resnet101)")
    p.add_argument("--batch", type=positive, nargs="+", default=[1], help="batch sizes (default: 1)")
    p.add_argument("--threads", type=positive, default=None, help="CPU threads per engine (default: all available)")
    p.add_argument("--rounds", type=positive, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--iters", type=positive, default=3,
                   help="timed iterations per engine per round at batch 1, about ITERS/BATCH for larger "
                        "batches (default: 3)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["f32"],
                   help="ggml weight types, one engine row each (default: f32)")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                   help="engines to run (default: all; missing ones are skipped)")
    p.add_argument("--json", default="bench-results.json", help="results file (default: bench-results.json)")
    a = p.parse_args(argv)
    a.batch = list(dict.fromkeys(a.batch))
    a.dtype = list(dict.fromkeys(a.dtype))
    a.engines = list(dict.fromkeys(a.engines))
    if a.threads is None:
        a.threads = default_threads()
    return a


def _interrupt(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so the workers are killed and the temporary files removed.
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _bench(args)
    except KeyboardInterrupt:
        _progress("\ninterrupted")
        return 130
    except Exception as e:
        from pyggml_resnet.errors import Error

        if not isinstance(e, (Error, OSError)):
            raise
        _progress(f"error: {e}")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _bench(args) -> int:
    tmp = tempfile.mkdtemp(prefix="pyggml-bench-")
    workers: dict[str, Worker] = {}
    try:
        return _bench_in(args, tmp, workers)
    finally:
        for w in workers.values():
            w.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _bench_in(args, tmp: str, workers: dict) -> int:
    import numpy as np

    from pyggml_resnet import arch, convert, loader
    from pyggml_resnet.ggml import default_threads

    notes: list[str] = []

    def note(text):
        notes.append(text)
        _progress(f"note: {text}")

    # Other work on the machine shows up as spread between min and max; say so up front.
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load_avg is not None and load_avg >= 1:
        note(f"the machine is busy (1-minute load average {load_avg:.1f} on {default_threads()} CPUs before "
             "starting): expect noisy timings; the min columns suffer least")

    # The model: a GGUF file for ggml, and the same weights for the others.
    if args.model:
        mf = loader.read(args.model)  # validates the file before any worker starts
        cfg, num_classes, size, gguf_path = mf.config, mf.num_classes, mf.preprocessing.crop, args.model
        source = f"{os.path.abspath(args.model)} ({mf.weights_name}, stored {mf.dtype})"
        del mf
    else:
        cfg, num_classes, size = arch.BY_NAME[args.arch], 1000, 224
        _progress(f"making a random {cfg.name} (seed {SEED}) ...", end=" ")
        t = time.perf_counter()
        gguf_path = os.path.join(tmp, f"{cfg.name}-random.gguf")
        convert.write_gguf(random_state(cfg, num_classes), gguf_path, dtype="f32", progress=False,
                           weights=f"random-seed-{SEED}")
        _progress(f"{time.perf_counter() - t:.1f} s")
        source = f"random weights (NumPy seed {SEED})"
    flops = flops_per_image(cfg, size, size, num_classes)

    # Which engines can run here.
    want_torch, want_ort = "torch" in args.engines, "onnxruntime" in args.engines
    have_torch = importlib.util.find_spec("torch") is not None
    if (want_torch or want_ort) and not have_torch:
        note("torch is not installed: skipping PyTorch" + (" and ONNX Runtime (the ONNX model is exported "
                                                             "from PyTorch)" if want_ort else ""))
        want_torch = want_ort = False
    if want_ort and importlib.util.find_spec("onnxruntime") is None:
        note("onnxruntime is not installed (pip install onnxruntime onnx): skipping ONNX Runtime")
        want_ort = False
    if want_ort and importlib.util.find_spec("onnx") is None:
        note("onnx is not installed (pip install onnx), torch cannot export: skipping ONNX Runtime")
        want_ort = False

    paths = {}
    if want_torch or want_ort:
        _progress("writing the weights for PyTorch" + (" and exporting ONNX" if want_ort else "") + " ...", end=" ")
        t = time.perf_counter()
        try:
            _run_child(_child_command("prepare", "torch", gguf_path, cfg, num_classes, out=tmp, onnx=want_ort,
                                      size=size),
                       os.path.join(tmp, "prepare.log"), PREPARE_TIMEOUT)
            paths["torch"] = os.path.join(tmp, "model.pth")
            if want_ort:
                paths["onnxruntime"] = os.path.join(tmp, "model.onnx")
            _progress(f"{time.perf_counter() - t:.1f} s")
        except WorkerError as e:
            _progress("failed")
            note(f"preparing the PyTorch/ONNX models failed, skipping them: {e}")
            want_torch = want_ort = False

    # Engine rows: name -> (engine, dtype, model path).
    rows: dict[str, tuple[str, str, str]] = {}
    for engine in args.engines:
        if engine == "ggml":
            for dt in args.dtype:
                rows[f"ggml-{dt}"] = ("ggml", dt, gguf_path)
        elif engine in paths:  # prepared for PyTorch / ONNX Runtime
            rows[engine] = (engine, "f32", paths[engine])

    status = {name: {"engine": e, "dtype": dt, "status": "ok", "error": None} for name, (e, dt, _) in rows.items()}
    est = {}  # name -> {batch: seconds per iteration}, for timeouts

    def fail(name, err, inline=False):
        status[name].update(status="failed", error=str(err))
        _progress(" (failed)" if inline else f"\n{name} failed: {err}", end="" if inline else "\n")
        if name in workers:
            workers.pop(name).stop()

    # Start the workers one by one, each loading and warming up alone.
    for name, (engine, dt, path) in rows.items():
        _progress(f"starting {name} ...", end=" ")
        w = workers[name] = Worker(_child_command("worker", engine, path, cfg, num_classes, threads=args.threads, dtype=dt,
                                                         size=size, batches=args.batch),
                                   os.path.join(tmp, f"{name}.log"))
        try:
            ready = w.receive(READY_TIMEOUT)
            est[name] = {int(b): s for b, s in ready["warmup_s"].items()}
            status[name]["load_s_warm"] = ready["load_s"]
            _progress(f"ready (load {ready['load_s']:.2f} s, " + ", ".join(
                f"batch {b}: {s * 1e3:.0f} ms" for b, s in est[name].items()) + ")")
        except WorkerError as e:
            fail(name, e)

    def timeout(name, batch, iters):
        return 60 + 10 * iters * est.get(name, {}).get(batch, 10.0)

    # Correctness: one fixed image through every engine.
    logits = {}
    for name, w in list(workers.items()):
        try:
            reply = w.request({"cmd": "logits"}, timeout(name, 1, 1))
            logits[name] = np.asarray(reply["logits"], dtype=np.float64)
        except WorkerError as e:
            fail(name, e)
    # The reference is an exact f32 engine where there is one: PyTorch first, as the others imitate it.
    ref = next((n for n in ("torch", "ggml-f32", "onnxruntime") if n in logits), next(iter(logits), None))
    correctness = []
    r = logits.get(ref)
    for name, z in logits.items():
        entry = {"engine": name, "reference": ref,
                 "rel_l2_error": float(np.linalg.norm(z - r) / max(np.linalg.norm(r), 1e-30)),
                 "top1": int(np.argmax(z)), "top1_agrees": bool(np.argmax(z) == np.argmax(r))}
        correctness.append(entry)
        status[name].update(rel_l2_error=entry["rel_l2_error"], top1_agrees=entry["top1_agrees"])

    # The timed rounds.
    samples = {name: {b: [] for b in args.batch} for name in rows}
    for r in range(args.rounds if workers else 0):
        order = list(workers)
        order = order[r % len(order):] + order[:r % len(order)]
        _progress(f"round {r + 1}/{args.rounds}:", end="")
        for b in args.batch:
            iters = _iterations(args.iters, b)
            _progress(f"  batch {b}:", end="")
            for name in order:
                if name not in workers:
                    continue
                time.sleep(SWITCH_PAUSE)
                _progress(f" {name}", end="")
                try:
                    reply = workers[name].request({"cmd": "time", "batch": b, "iters": iters},
                                                  timeout(name, b, iters))
                    samples[name][b] += [t / b for t in reply["times"]]
                except WorkerError as e:
                    fail(name, e, inline=True)  # the error itself is in the report
        _progress("")

    for name in list(workers):
        try:
            status[name]["peak_rss_kib"] = workers[name].request({"cmd": "exit"}, 60)["maxrss_kib"]
        except WorkerError as e:
            fail(name, e)
        if name in workers:
            workers.pop(name).stop()

    # Cold starts, each in a fresh process.
    cold = []
    for name, (engine, dt, path) in rows.items():
        _progress(f"cold start {name} ...", end=" ")
        entry = {"engine": name}
        try:
            msg, t0 = _run_child(_child_command("cold", engine, path, cfg, num_classes, threads=args.threads, dtype=dt, size=size),
                                 os.path.join(tmp, f"{name}-cold.log"), COLD_TIMEOUT)
            entry.update(import_s=msg["import_end"] - t0, load_s=msg["load_end"] - msg["import_end"],
                         first_inference_s=msg["first_end"] - msg["load_end"], total_s=msg["first_end"] - t0)
            _progress(f"{entry['total_s']:.2f} s")
        except WorkerError as e:
            entry["error"] = str(e)
            _progress(f"failed: {e}")
        cold.append(entry)
    torch_cold = next((c for c in cold if c["engine"] == "torch" and "total_s" in c), None)
    for c in cold:
        if torch_cold and "total_s" in c:
            c["ratio_to_torch"] = c["total_s"] / torch_cold["total_s"]
            c["load_ratio_to_torch"] = c["load_s"] / torch_cold["load_s"]

    # Summaries.
    results = []
    for b in args.batch:
        torch_s = samples.get("torch", {}).get(b)
        torch_med = statistics.median(torch_s) if torch_s else None
        for name in rows:
            s = samples[name][b]
            if not s:
                continue
            med = statistics.median(s)
            results.append({"engine": name, "batch": b, "median_ms_per_image": med * 1e3,
                            "min_ms_per_image": min(s) * 1e3, "max_ms_per_image": max(s) * 1e3,
                            "ratio_to_torch": med / torch_med if torch_med else None,
                            "gflops": flops / med / 1e9, "peak_rss_kib": status[name].get("peak_rss_kib"),
                            "samples_ms_per_image": [v * 1e3 for v in s]})

    report = {
        "model": {"arch": cfg.name, "source": source, "num_classes": num_classes, "input": [3, size, size],
                  "flops_per_image": flops},
        "settings": {"batches": args.batch, "threads": args.threads, "rounds": args.rounds,
                     "iters": {str(b): _iterations(args.iters, b) for b in args.batch},
                     "engines": list(rows), "ggml_dtypes": args.dtype},
        "machine": {**machine_info(), "load_average_at_start": load_avg},
        "engines": status,
        "correctness": correctness,
        "results": results,
        "cold_start": cold,
        "notes": notes,
    }
    print(format_report(report))
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    _progress(f"wrote {args.json}")
    ok = bool(rows) and all(s["status"] == "ok" for s in status.values())
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------------------
# The machine and the report


def _dist_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    import numpy as np

    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:  # the first CPU's entries are everyone's
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", info.get("Features", "")).split())  # x86, arm64
    # The instruction sets that decide which kernels the engines can use.
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
                       "asimd", "sve") if f in flags]
    from pyggml_resnet import __version__, ggml

    return {"cpu": cpu, "cpus_total": os.cpu_count(), "cpus_available": ggml.default_threads(), "isa": isa,
            "os": platform.platform(),
            "versions": {"python": platform.python_version(), "numpy": np.__version__,
                         "torch": _dist_version("torch"), "onnxruntime": _dist_version("onnxruntime"),
                         "ggml": ggml.version(), "pyggml-resnet": __version__, "gguf": _dist_version("gguf")}}


def _fmt(value, spec: str, width: int) -> str:
    return (format(value, spec) if value is not None else "-").rjust(width)


def format_report(r: dict) -> str:
    m, s = r["model"], r["settings"]
    out = [f"pyggml-resnet bench: {m['arch']}, {m['source']}, input {'x'.join(map(str, m['input']))}, "
           f"{m['flops_per_image'] / 1e9:.2f} GFLOP per image",
           f"{s['threads']} threads per engine, {s['rounds']} rounds, timed iterations per engine per round: "
           + ", ".join(f"batch {b}: {k}" for b, k in s["iters"].items()), ""]

    if r["correctness"]:
        ref = r["correctness"][0]["reference"]
        out.append(f"correctness: logits of one image, relative L2 error vs {ref}")
        out.append(f"  {'engine':<12} {'rel. error':>10}  top-1")
        for c in r["correctness"]:
            agree = "agrees" if c["top1_agrees"] else "DIFFERS"
            out.append(f"  {c['engine']:<12} {c['rel_l2_error']:>10.2e}  {agree} (class {c['top1']})")
        out.append("")

    if r["results"]:
        out.append("speed, ms per image (vs torch: time ratio at the same batch, below 1 is faster)")
        out.append(f"  {'engine':<12} {'batch':>5} {'median':>9} {'min':>9} {'max':>9} {'vs torch':>9} "
                   f"{'GFLOP/s':>8} {'peak RSS MiB':>13}")
        for x in r["results"]:
            rss = x["peak_rss_kib"] / 1024 if x["peak_rss_kib"] else None
            ratio = f"{x['ratio_to_torch']:.2f}x" if x["ratio_to_torch"] else None
            out.append(f"  {x['engine']:<12} {x['batch']:>5} {x['median_ms_per_image']:>9.1f} "
                       f"{x['min_ms_per_image']:>9.1f} {x['max_ms_per_image']:>9.1f} {_fmt(ratio, 's', 9)} "
                       f"{x['gflops']:>8.1f} {_fmt(rss, '.0f', 13)}")
        out.append("  (peak RSS: the engine process's peak over the whole run, every batch size included)")
        out.append("")

    if r["cold_start"]:
        out.append("cold start: one fresh process each, from before `python` starts to the first logits of "
                   "one image, seconds")
        out.append(f"  {'engine':<12} {'import':>7} {'load':>7} {'first':>7} {'total':>7} {'vs torch':>9} "
                   f"{'load vs torch':>14}")
        for c in r["cold_start"]:
            if "total_s" not in c:
                out.append(f"  {c['engine']:<12} failed: {c['error']}")
                continue
            ratio = f"{c['ratio_to_torch']:.2f}x" if "ratio_to_torch" in c else None
            lratio = f"{c['load_ratio_to_torch']:.2f}x" if "load_ratio_to_torch" in c else None
            out.append(f"  {c['engine']:<12} {c['import_s']:>7.2f} {c['load_s']:>7.2f} "
                       f"{c['first_inference_s']:>7.2f} {c['total_s']:>7.2f} {_fmt(ratio, 's', 9)} "
                       f"{_fmt(lratio, 's', 14)}")
        out.append("  (import includes starting the interpreter; load is reading the model file into a "
                   "runnable model,\n   except that PyTorch's mmap load leaves reading the weights to the "
                   "first inference)")
        out.append("")

    failed = {n: e for n, e in r["engines"].items() if e["status"] != "ok"}
    for name, e in failed.items():
        out.append(f"FAILED {name}: {e['error']}")
    for n in r["notes"]:
        out.append(f"note: {n}")
    if failed or r["notes"]:
        out.append("")

    mc = r["machine"]
    out.append(f"machine: {mc['cpu']}, {mc['cpus_available']} of {mc['cpus_total']} CPUs available, "
               f"{s['threads']} threads used; {' '.join(mc['isa']) or 'no ISA flags known'}; {mc['os']}")
    out.append("versions: " + ", ".join(f"{k} {v}" for k, v in mc["versions"].items() if v))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
