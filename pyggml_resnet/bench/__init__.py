"""Benchmark: ggml against PyTorch eager, ONNX Runtime and OpenVINO on the same ResNet weights, same CPU threads.

    pyggml-resnet bench [--model M.gguf | --arch resnet101] [--batch 1 8] [--threads N] [--rounds R]
                        [--iters K] [--dtype f32 bf16 ...] [--gemm packed ggml]
                        [--engines ggml torch onnxruntime onnxruntime-int8 openvino openvino-bf16 openvino-int8]
                        [--calibration-count N] [--test-count N] [--contention] [--wait-quiet S]
                        [--json OUT]

Without --model a seeded random model is made with NumPy and written as GGUF, so a fresh machine needs no
torch and no download; the other engines are optional, each skipped with a note if what it needs is missing
(`pip install 'pyggml-resnet[bench]'` brings them all). The peers run what a user of each would: PyTorch a
`.pth` state dict, ONNX Runtime and OpenVINO the ONNX export (OpenVINO at f32 precision, and bf16 where the CPU
has it natively), and the int8 engines ONNX Runtime's static quantization of that export (QDQ, per-channel s8
weights, u8 activations, min-max ranges over synthetic calibration images; `peers`).

How the numbers are made fair:

* Each engine runs in its own fresh process, so its peak RSS is its own and no engine's import, threads or
  allocator state touches another's. The ggml process never imports torch. Worker processes load
  `child.py` directly (`procs._LAUNCH`), not through the `pyggml_resnet` package, so the torch and ONNX
  Runtime processes carry nothing of ours but that module's standard-library imports.
* Workers are started and warmed up one after the other, then wait idle while another one runs. The timed
  part is interleaved: each round runs every engine in turn (in rotating order) for every batch size, so
  slow drift of a shared machine (other load, clocks, heat) spreads over all engines instead of biasing
  whichever ran last. Every sample is one full forward of a batch, timed with perf_counter in the worker,
  after one untimed forward at the start of each turn (kept apart in the JSON as `first_ms_per_image`): what
  the other engines' turns evicted or put to sleep is thus not timed, as the peers' own benchmark tools
  measure a steady state (OpenVINO's first forward after another engine's turn takes up to a third longer).
* Correctness is checked in the same run on the same weights: every engine's logits for synthetic test
  images (none of them a calibration image), as a relative L2 error and top-1/top-5 agreement against
  PyTorch's.
* Cold start is measured in one more fresh process per engine, from just before `python` starts to the
  first logits of one image, after the timed rounds (so every engine's libraries are in the page cache).
  PyTorch loads a `.pth` state dict the way a careful user would (mmap, meta-device model, assign=True).

* Before the timed rounds the run waits (up to --wait-quiet seconds) until other processes keep less than
  half a CPU busy, measured from /proc/stat rather than the lagging load average, and notes it if they do not.

The modules: `child` (the worker processes, their PyTorch ResNet and the ONNX Runtime and OpenVINO sessions),
`procs` (starting and talking to them), `workload` (FLOPs, the random model), `peers` (the ONNX export, the int8
quantization, the synthetic images, the error measures), `run` (the phases of a run), `quiet` (waiting for a
quiet machine), `contention` (the oversubscribed cases of --contention), `report` (the machine, the text).
"""

from .run import main
from .workload import flops_per_image, random_state

__all__ = ["flops_per_image", "main", "random_state"]
