"""The benchmark's report: the machine it ran on, and the results as text."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform

import numpy as np

from .. import __version__, ggml


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
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
    return {"cpu": cpu, "cpus_total": os.cpu_count(), "cpus_available": ggml.available_cpus(), "isa": isa,
            "os": platform.platform(),
            "versions": {"python": platform.python_version(), "numpy": np.__version__,
                         "torch": _dist_version("torch"), "onnxruntime": _dist_version("onnxruntime"),
                         "ggml": ggml.version(), "pyggml-resnet": __version__, "gguf": _dist_version("gguf")}}


def _fmt(value, spec: str, width: int) -> str:
    return (format(value, spec) if value is not None else "-").rjust(width)


def format_report(r: dict) -> str:
    """The report as the text `pyggml-resnet bench` prints: one section per part that has results."""
    m, s = r["model"], r["settings"]
    out = [f"pyggml-resnet bench: {m['arch']}, {m['source']}, input {'x'.join(map(str, m['input']))}, "
           f"{m['flops_per_image'] / 1e9:.2f} GFLOP per image",
           f"{s['threads']} threads per engine, {s['rounds']} rounds, timed iterations per engine per round: "
           + ", ".join(f"batch {b}: {k}" for b, k in s["iters"].items()), ""]
    for part, lines in (("correctness", _correctness), ("results", _speed), ("cold_start", _cold_start),
                        ("load_by_dtype", _loads), ("contention", _contention)):
        if r[part]:
            out += lines(r[part]) + [""]

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


def _correctness(correctness: list[dict]) -> list[str]:
    out = [f"correctness: logits of one image, relative L2 error vs {correctness[0]['reference']}",
           f"  {'engine':<16} {'rel. error':>10}  top-1"]
    for c in correctness:
        agree = "agrees" if c["top1_agrees"] else "DIFFERS"
        out.append(f"  {c['engine']:<16} {c['rel_l2_error']:>10.2e}  {agree} (class {c['top1']})")
    return out


def _speed(results: list[dict]) -> list[str]:
    out = ["speed, ms per image (vs torch: time ratio at the same batch, below 1 is faster)",
           f"  {'engine':<16} {'batch':>5} {'median':>9} {'min':>9} {'max':>9} {'vs torch':>9} "
           f"{'GFLOP/s':>8} {'peak RSS MiB':>13}"]
    for x in results:
        rss = x["peak_rss_kib"] / 1024 if x["peak_rss_kib"] else None
        ratio = f"{x['ratio_to_torch']:.2f}x" if x["ratio_to_torch"] else None
        out.append(f"  {x['engine']:<16} {x['batch']:>5} {x['median_ms_per_image']:>9.1f} "
                   f"{x['min_ms_per_image']:>9.1f} {x['max_ms_per_image']:>9.1f} {_fmt(ratio, 's', 9)} "
                   f"{x['gflops']:>8.1f} {_fmt(rss, '.0f', 13)}")
    out.append("  (peak RSS: the engine process's peak over the whole run, every batch size included)")
    return out


def _cold_start(cold: list[dict]) -> list[str]:
    out = ["cold start: one fresh process each, from before `python` starts to the first logits of one image, "
           "seconds",
           f"  {'engine':<16} {'import':>7} {'load':>7} {'first':>7} {'total':>7} {'vs torch':>9} "
           f"{'load vs torch':>14}"]
    for c in cold:
        if "total_s" not in c:
            out.append(f"  {c['engine']:<16} failed: {c['error']}")
            continue
        ratio = f"{c['ratio_to_torch']:.2f}x" if "ratio_to_torch" in c else None
        lratio = f"{c['load_ratio_to_torch']:.2f}x" if "load_ratio_to_torch" in c else None
        out.append(f"  {c['engine']:<16} {c['import_s']:>7.2f} {c['load_s']:>7.2f} "
                   f"{c['first_inference_s']:>7.2f} {c['total_s']:>7.2f} {_fmt(ratio, 's', 9)} "
                   f"{_fmt(lratio, 's', 14)}")
    out += ["  import: starting the interpreter and importing the engine; load: reading the model file into a",
            "  runnable model; first: the first forward pass of one image (graphs, buffers, page faults); total:",
            "  the three together; vs torch: total over PyTorch's total; load vs torch: load over PyTorch's load,",
            "  which is small because PyTorch's mmap load leaves reading the weights to its first inference",
            "  (compare the totals)"]
    return out


def _loads(loads: list[dict]) -> list[str]:
    out = ["load time by stored type: pyggml_resnet.load() of the same weights stored in each type, seconds",
           f"  {'stored':<8} {'median':>7} {'min':>7} {'vs f32':>7} {'file MB':>8}"]
    for x in loads:
        out.append(f"  {x['dtype']:<8} {x['median_s']:>7.3f} {x['min_s']:>7.3f} {x['ratio_to_f32']:>6.2f}x "
                   f"{x['file_bytes'] / 1e6:>8.1f}")
    return out


def _contention(entries: list[dict]) -> list[str]:
    out = ["contention: batch 1, ms per image (medians); ratio = ggml / torch in the same case; "
           "vs quiet = that case / the quiet case",
           f"  {'case':<11} {'threads':>7} {'load':>5} {'ggml':>9} {'torch':>9} {'ratio':>7} "
           f"{'ratio vs quiet':>15} {'ggml vs quiet':>14} {'torch vs quiet':>15}"]
    for e in entries:
        load = f"{e['load_average']:.1f}" if e["load_average"] is not None else "-"
        out.append(f"  {e['case']:<11} {e['threads']:>7} {load:>5} {e['ggml_ms']:>9.1f} {e['torch_ms']:>9.1f} "
                   f"{e['ratio_to_torch']:>6.2f}x {e['ratio_vs_quiet_ratio']:>14.2f}x "
                   f"{e['ggml_vs_quiet']:>13.2f}x {e['torch_vs_quiet']:>14.2f}x")
    out.append("  (load: the 1-minute load average as the case started, busy processes included)")
    return out
