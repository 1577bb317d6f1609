"""Each matrix product of a ResNet timed alone: the packed GEMM's paths against ggml's mul_mat.

    python -m pyggml_resnet.bench.products [--arch resnet101] [--size 224] [--batch 1] [--threads 2] [--rounds 7]
                                           [--engines ggml avx512 avx2] [--cpu-time]

Every distinct product shape (M output channels, K = kernel area x input channels, N pixels) gets random
operands and one single-product graph per engine; the engines take turns, in alternating order, for
--rounds rounds, and each shape's fastest time per engine is kept (the steadiest figure on a shared
machine). Prints the sum over all products (each shape times its count) and every shape's GFLOP/s.
Compare engines within one run only.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np

from .. import arch
from ..ggml import Backend, Graph, Weights
from ..packing import pack_matrix, packed_shape
from ..plan import K_ALIGN, gemm_paths
from .workload import products


def _graphs(backend, weights, engines, m, k, n):
    """One finalized single-product graph per engine: (graph, input tensor, input array)."""
    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    x = rng.standard_normal((n, k)).astype(np.float32)
    k_pad = k + (-k) % K_ALIGN if k % 16 else k  # what the model gives mul_mat (its fast path needs K % 16 == 0)
    out = {}
    for e in engines:
        g = Graph(backend)
        if e == "ggml":
            xi = g.input("x", (k_pad, n))
            y, arr = g.mul_mat(weights["plain"], xi), np.pad(x, ((0, 0), (0, k_pad - k)))
        else:
            xi = g.input("x", (k, n))
            y, arr = g.gemm(weights["packed"], xi, m, path=e), x
        out[e] = (g.finalize(y), xi, arr)
    return out


def run(cfg="resnet101", size=224, batch=1, threads=2, rounds=7, engines=None, clock=time.perf_counter) -> dict:
    """{engine: {(M, K, N): fastest seconds}} and the shapes' counts, timed by `clock`."""
    engines = list(engines or ("ggml", *gemm_paths()))
    counts = collections.Counter(products(cfg, size, batch=batch))
    best = {e: {} for e in engines}
    rng = np.random.default_rng(0)
    with Backend(threads) as backend:
        for (m, k, n) in counts:
            w = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
            k_pad = k + (-k) % K_ALIGN if k % 16 else k
            specs = {"packed": ("f32", tuple(reversed(packed_shape(m, k)))), "plain": ("f32", (k_pad, m))}
            with Weights(backend, specs) as weights:
                weights.set("packed", pack_matrix(w))
                weights.set("plain", np.pad(w, ((0, 0), (0, k_pad - k))))
                graphs = _graphs(backend, weights, engines, m, k, n)
                try:
                    for r in range(rounds):
                        for e in engines if r % 2 == 0 else engines[::-1]:
                            g, xi, arr = graphs[e]
                            g.set(xi, arr)
                            t = clock()
                            g.compute()
                            dt = clock() - t
                            best[e][m, k, n] = min(best[e].get((m, k, n), dt), dt)
                finally:
                    for g, _, _ in graphs.values():
                        g.close()
    return {"best": best, "counts": dict(counts)}


def report(result: dict) -> str:
    best, counts = result["best"], result["counts"]
    engines = list(best)
    flops = {s: 2 * s[0] * s[1] * s[2] for s in counts}
    total_flops = sum(flops[s] * c for s, c in counts.items())
    lines = [f"{sum(counts.values())} products, {total_flops / 1e9:.2f} GFLOP; "
             "sum over products of each shape's fastest time:"]
    base = sum(best[engines[0]][s] * c for s, c in counts.items())
    for e in engines:
        t = sum(best[e][s] * c for s, c in counts.items())
        lines.append(f"  {e:8s} {t * 1e3:8.1f} ms  {total_flops / t / 1e9:6.1f} GFLOP/s  {t / base:5.2f}x {engines[0]}")
    lines.append("GFLOP/s per shape:")
    lines.append(f"  {'M':>5} {'K':>5} {'N':>6} count " + " ".join(f"{e:>8}" for e in engines))
    for s, c in counts.items():
        lines.append(f"  {s[0]:5d} {s[1]:5d} {s[2]:6d} {c:5d} "
                     + " ".join(f"{flops[s] / best[e][s] / 1e9:8.1f}" for e in engines))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyggml_resnet.bench.products", description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=list(arch.BY_NAME), default="resnet101")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--engines", nargs="+", choices=["ggml", *gemm_paths()], default=None)
    p.add_argument("--cpu-time", action="store_true",
                   help="time by the process's CPU time, not wall time: with --threads 1, steady on a busy machine")
    a = p.parse_args(argv)
    clock = time.process_time if a.cpu_time else time.perf_counter
    print(report(run(a.arch, a.size, a.batch, a.threads, a.rounds, a.engines, clock)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
