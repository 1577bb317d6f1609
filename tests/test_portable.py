"""The portable build on older CPUs: the installed package runs a ResNet-18 under qemu-user's emulated Haswell
(AVX2, no AVX-512) and Nehalem (SSE4.2, no AVX), picks the kernels each CPU has, and gives the logits of the
run on this machine (docs/building.md); so do the int8 product and the u8 max pool. A build for this machine
only (PYGGML_NATIVE) fails here: SIGILL.

qemu-x86_64 comes from Debian's qemu-user package, which .ci/run installs; without it these tests skip.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import pyggml_resnet

QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64 (Debian's qemu-user; .ci/run installs it)")


def run(cpu: str | None, cmd: list[str]) -> subprocess.CompletedProcess:
    """cmd under qemu's model of `cpu`, or on this machine (None). numpy's OpenBLAS is told the emulated CPU's
    kernels: on an AMD Zen 5 host it chose Haswell's under `-cpu Nehalem` though cpuid there says Nehalem
    (family 6 model 26, no AVX), and `import numpy` died of SIGILL; the test is about our build."""
    if cpu is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return subprocess.run([QEMU, "-cpu", cpu, *cmd], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OPENBLAS_CORETYPE": cpu.upper()})

# Run in the emulated process: logits of the saved input, what ran the products, and which of ggml's CPU
# libraries was loaded (qemu-user shows the guest's own mappings in /proc/self/maps).
_CHILD = r"""
import json, re, sys
import numpy as np
import pyggml_resnet
with pyggml_resnet.load(sys.argv[1], threads=1) as model:
    np.save(sys.argv[3], model.logits(np.load(sys.argv[2])))
    gemm = model.gemm
maps = open("/proc/self/maps").read()
print(json.dumps({"gemm": gemm, "ggml_cpu": sorted(set(re.findall(r"libggml-cpu-([\w.]+)\.so", maps)))}))
"""


@pytest.fixture(scope="module")
def resnet18(model_files, tmp_path_factory):
    """(model file, input file, this machine's logits): a ResNet-18 on two 64x64 images, one thread."""
    _, _, path = model_files(18)
    x = np.random.default_rng(23).standard_normal((2, 3, 64, 64), dtype=np.float32)
    x_path = tmp_path_factory.mktemp("portable") / "x.npy"
    np.save(x_path, x)
    with pyggml_resnet.load(path, threads=1) as model:
        return path, x_path, model.logits(x)


def emulated(cpu: str, resnet18, tmp_path):
    """The child's report and logits, run on qemu's model of `cpu`."""
    path, x_path, _ = resnet18
    out = tmp_path / f"{cpu}.npy"
    proc = run(cpu, [sys.executable, "-c", _CHILD, str(path), str(x_path), str(out)])
    assert proc.returncode == 0, f"under -cpu {cpu}: exit {proc.returncode} (-4: SIGILL)\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.splitlines()[-1]), np.load(out)


def test_haswell_runs_the_avx2_gemm_bit_identical(resnet18, tmp_path):
    """AVX2 and FMA, no AVX-512: the packed GEMM's AVX2 path, whose sums are those of every other path."""
    report, logits = emulated("Haswell", resnet18, tmp_path)
    assert report == {"gemm": "avx2", "ggml_cpu": ["haswell"]}
    assert np.array_equal(logits, resnet18[2])


def test_nehalem_falls_back_to_ggml_mul_mat(resnet18, tmp_path):
    """SSE4.2 only: no packed GEMM path, so ggml's mul_mat, in its SSE4.2 build; other sums, same logits to
    f32 rounding."""
    report, logits = emulated("Nehalem", resnet18, tmp_path)
    assert report == {"gemm": "ggml", "ggml_cpu": ["sse42"]}
    native = resnet18[2]
    assert np.linalg.norm(logits - native) <= 1e-5 * np.linalg.norm(native)
    assert not np.array_equal(logits, native)  # the emulated run took another path, as the report says


# The u8 max pool (int8's stem) in the copy of csrc/pool.c's loop that each emulated CPU picks, against NumPy.
_POOL_CHILD = r"""
import numpy as np
from pyggml_resnet.ggml import Backend, Graph, Type
x = np.random.default_rng(9).integers(0, 256, (2, 13, 10, 20), dtype=np.uint8)  # NHWC
with Backend(threads=1) as be, Graph(be) as g:
    t = g.input("x", (20, 10, 13, 2), Type.I8)
    y = g.max_pool(t, 3, 2, 1)
    g.finalize(y)
    g.set(t, x.view(np.int8))
    g.compute()
    got = g.get(y).view(np.uint8)
padded = np.zeros((2, 15, 12, 20), np.uint8)  # zeros never beat a byte: padding ignored, as the op does
padded[:, 1:14, 1:11] = x
want = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2)) for j in range(5)], 1)
                 for i in range(7)], 1)
print(got.shape == want.shape and bool(np.array_equal(got, want)))
"""


@pytest.mark.parametrize("cpu", ["Haswell", "Nehalem"])
def test_u8_max_pool_exact_on_older_cpus(cpu):
    proc = run(cpu, [sys.executable, "-c", _POOL_CHILD])
    assert proc.returncode == 0, f"under -cpu {cpu}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stdout.splitlines()[-1] == "True"


# An int8 conv (3x3 over u8 pixels with a zero point, bias, a u8 residual, ReLU), f32 and u8 results, on the
# int8 path the CPU picks: Haswell's AVX2+FMA one, Nehalem's portable one, whose epilogue's fused multiply-adds
# are libm's fmaf, in software there.
_INT8_CHILD = r"""
import sys
import numpy as np
from pyggml_resnet import int8
from pyggml_resnet.ggml import Backend, Graph, Type, Weights, gemm_int8_paths
rng = np.random.default_rng(5)
c, m, h, w = 16, 32, 6, 7
q = int8.quantize_matrix(rng.standard_normal((m, 3, 3, c), dtype=np.float32))
x = rng.integers(0, 256, (1, h, w, c), dtype=np.uint8)
r = rng.integers(0, 256, (1, h, w, m), dtype=np.uint8)
specs = {"w": ("f32", tuple(reversed(q.packed.shape[:3]))), "s": ("f32", (m,)), "c": ("f32", (m,)),
         "b": ("f32", (m,))}
with Backend(threads=1) as be, Weights(be, specs) as wt, Graph(be) as g:
    wt.set("w", int8.words(q.packed))
    wt.set("s", q.scales)
    wt.set("c", int8.words(q.colsums))
    wt.set("b", rng.standard_normal(m, dtype=np.float32))
    xt, rt = g.input("x", (c, w, h, 1), Type.I8), g.input("r", (m, w, h, 1), Type.I8)
    conv = dict(scales=wt["s"], colsums=wt["c"], x_scale=0.02, x_zero=3, kernel=3, padding=1, bias=wt["b"],
                residual=rt, residual_scale=0.05, residual_zero=128, relu=True)
    y32 = g.gemm_int8(wt["w"], xt, m, **conv)
    y8 = g.gemm_int8(wt["w"], xt, m, y_scale=0.04, y_zero=0, **conv)
    g.finalize(y32, y8)
    g.set(xt, x.view(np.int8))
    g.set(rt, r.view(np.int8))
    g.compute()
    np.save(sys.argv[1], g.get(y32))
    np.save(sys.argv[2], g.get(y8).view(np.uint8))
print(gemm_int8_paths()[0])
"""


def int8_conv(tmp_path, cpu=None):
    """The int8 child's path and results (f32, u8), under qemu's model of `cpu` or on this machine."""
    f32, u8 = tmp_path / f"{cpu}-f32.npy", tmp_path / f"{cpu}-u8.npy"
    proc = run(cpu, [sys.executable, "-c", _INT8_CHILD, str(f32), str(u8)])
    assert proc.returncode == 0, f"under -cpu {cpu}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.stdout.splitlines()[-1], np.load(f32), np.load(u8)


@pytest.mark.parametrize("cpu, path", [("Haswell", "int8-avx2"), ("Nehalem", "int8-scalar")])
def test_int8_conv_bit_identical_on_older_cpus(cpu, path, tmp_path):
    _, native_f32, native_u8 = int8_conv(tmp_path)  # whichever path this CPU picks: all give the same bits
    got_path, f32, u8 = int8_conv(tmp_path, cpu)
    assert got_path == path
    assert np.array_equal(f32.view(np.uint32), native_f32.view(np.uint32))
    assert np.array_equal(u8, native_u8) and 0 < np.count_nonzero(u8) < u8.size  # bytes on both sides of the clamp
