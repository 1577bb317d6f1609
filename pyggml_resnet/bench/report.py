"""The benchmark's report: the machine it ran on, and the results as text."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import numpy as np

from .. import __version__, ggml
from ..cpu import available_cpus, cpuinfo

# How the AVX-512 f32 tiles broadcast each pixel (ggml.gemm_folds_broadcasts).
_FORMS = {True: "broadcasts folded into the FMAs", False: "broadcasts in registers"}


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    info = cpuinfo()
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", info.get("Features", "")).split())  # x86, arm64
    # The instruction sets that decide which kernels the engines can use.
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
                       "amx_bf16", "amx_int8", "asimd", "sve") if f in flags]
    # Family and model tell an Intel Xeon's generation apart ("Intel(R) Xeon(R) Processor" names several).
    cpu += f" (family {info['cpu family']} model {info['model']})" if "cpu family" in info and "model" in info else ""
    return {"cpu": cpu, "cpus_total": os.cpu_count(), "cpus_available": available_cpus(), "isa": isa,
            "l1d_kib": ggml.gemm_cache_bytes(1) >> 10, "block_k_bytes": ggml.gemm_block_k_bytes(),
            "folds_broadcasts": ggml.gemm_folds_broadcasts(),
            "l2_kib": ggml.gemm_cache_bytes(2) >> 10, "os": platform.platform(),
            "versions": {"python": platform.python_version(), "numpy": np.__version__,
                         "torch": _dist_version("torch"), "onnxruntime": _dist_version("onnxruntime"),
                         "openvino": _dist_version("openvino"), "onnx": _dist_version("onnx"),
                         "ggml": ggml.version(), "pyggml-resnet": __version__, "gguf": _dist_version("gguf")}}


def _fmt(value, spec: str, width: int) -> str:
    return (format(value, spec) if value is not None else "-").rjust(width)


def format_report(r: dict) -> str:
    """The report as the text `pyggml-resnet bench` prints: one section per part that has results."""
    m, s = r["model"], r["settings"]
    out = [f"pyggml-resnet bench: {m['arch']}, {m['source']}, input {'x'.join(map(str, m['input']))}, "
           f"{m['flops_per_image'] / 1e9:.2f} GFLOP per image",
           f"{s['threads']} threads per engine, {s['rounds']} rounds, timed iterations per engine per round "
           "(after an untimed one): "
           + ", ".join(f"batch {b}: {k}" for b, k in s["iters"].items()), ""]
    if r["correctness"]:
        out += _correctness(r["correctness"], s) + [""]
    for part, lines in (("results", _speed), ("cold_start", _cold_start), ("load_by_dtype", _loads),
                        ("contention", _contention)):
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
               f"{s['threads']} threads used; {' '.join(mc['isa']) or 'no ISA flags known'}; "
               f"GEMM blocks of {mc.get('block_k_bytes', '?')} bytes of k for an L1d of {mc.get('l1d_kib', '?')} KiB, "
               f"sized for an L2 of {mc.get('l2_kib', '?')} KiB; AVX-512 f32 tiles with "
               f"{_FORMS.get(mc.get('folds_broadcasts'), '? broadcasts')}; {mc['os']}")
    out.append("versions: " + ", ".join(f"{k} {v}" for k, v in mc["versions"].items() if v))
    return "\n".join(out)


def _correctness(correctness: list[dict], settings: dict) -> list[str]:
    ref, n = correctness[0]["reference"], correctness[0]["images"]
    calibration = settings.get("calibration_images")
    columns = [("engine", 16), ("rel. error", 10), ("top-1", 6), ("top-5", 6)]
    rows = [[c["engine"], f"{c['rel_l2_error']:.2e}", f"{round(c['top1_agreement'] * n)}/{n}",
             f"{round(c['top5_agreement'] * n)}/{n}"] for c in correctness]
    return ([f"correctness: logits of {n} synthetic test images against {ref}'s"
             + (f" (none of them among the {calibration} that calibrated the int8 engines)" if calibration else "")]
            + _table(columns, rows)
            + [f"  rel. error: relative L2 error of all the logits; top-1: images whose top class is {ref}'s;",
               f"  top-5: images whose top 5 classes hold {ref}'s top class"])


def _table(columns: list[tuple[str, int]], rows: list) -> list[str]:
    """A table's lines: a header of (name, width) columns, the first left-aligned and the rest right-aligned,
    then one line per row of cell strings; a row given as one string is written as it is."""
    def line(cells):
        first, *rest = cells
        return "  " + " ".join([first.ljust(columns[0][1])] + [c.rjust(w) for c, (_, w) in zip(rest, columns[1:])])
    return [line([name for name, _ in columns])] + [f"  {r}" if isinstance(r, str) else line(r) for r in rows]


def _x(ratio) -> str | None:
    return f"{ratio:.2f}x" if ratio is not None else None


def _speed(results: list[dict]) -> list[str]:
    columns = [("engine", 16), ("batch", 5), ("median", 9), ("min", 9), ("max", 9), ("vs torch", 9),
               ("rel. error", 10), ("GFLOP/s", 8), ("peak RSS MiB", 13)]
    rows = [[x["engine"], str(x["batch"]), f"{x['median_ms_per_image']:.1f}", f"{x['min_ms_per_image']:.1f}",
             f"{x['max_ms_per_image']:.1f}", _fmt(_x(x["ratio_to_torch"] or None), "s", 0),
             _fmt(x.get("rel_l2_error"), ".1e", 0), f"{x['gflops']:.1f}",
             _fmt(x["peak_rss_kib"] / 1024 if x["peak_rss_kib"] else None, ".0f", 0)] for x in results]
    return (["speed, ms per image (vs torch: time ratio at the same batch, below 1 is faster)"]
            + _table(columns, rows)
            + ["  (rel. error: of the logits against the reference's, from the correctness check; peak RSS: the",
               "  engine process's peak over the whole run, every batch size included)"])


def _cold_start(cold: list[dict]) -> list[str]:
    columns = [("engine", 16), ("import", 7), ("load", 7), ("first", 7), ("total", 7), ("vs torch", 9),
               ("load vs torch", 14)]
    rows = [f"{c['engine']:<16} failed: {c['error']}" if "total_s" not in c else
            [c["engine"], f"{c['import_s']:.2f}", f"{c['load_s']:.2f}", f"{c['first_inference_s']:.2f}",
             f"{c['total_s']:.2f}", _fmt(_x(c.get("ratio_to_torch")), "s", 0),
             _fmt(_x(c.get("load_ratio_to_torch")), "s", 0)] for c in cold]
    return (["cold start: one fresh process each, from before `python` starts to the first logits of one "
             "image, seconds"]
            + _table(columns, rows)
            + ["  import: starting the interpreter and importing the engine; load: reading the model file into a",
               "  runnable model; first: the first forward pass of one image (graphs, buffers, page faults); total:",
               "  the three together; vs torch: total over PyTorch's total; load vs torch: load over PyTorch's load,",
               "  which is small because PyTorch's mmap load leaves reading the weights to its first inference",
               "  (compare the totals)"])


def _loads(loads: list[dict]) -> list[str]:
    columns = [("stored", 8), ("median", 7), ("min", 7), ("vs f32", 7), ("file MB", 8)]
    rows = [[x["dtype"], f"{x['median_s']:.3f}", f"{x['min_s']:.3f}", _x(x["ratio_to_f32"]),
             f"{x['file_bytes'] / 1e6:.1f}"] for x in loads]
    return (["load time by stored type: pyggml_resnet.load() of the same weights stored in each type, seconds"]
            + _table(columns, rows))


def _contention(entries: list[dict]) -> list[str]:
    columns = [("case", 11), ("threads", 7), ("load", 5), ("ggml", 9), ("torch", 9), ("ratio", 7),
               ("ratio vs quiet", 15), ("ggml vs quiet", 14), ("torch vs quiet", 15)]
    rows = [[e["case"], str(e["threads"]), _fmt(e["load_average"], ".1f", 0), f"{e['ggml_ms']:.1f}",
             f"{e['torch_ms']:.1f}", _x(e["ratio_to_torch"]), _x(e["ratio_vs_quiet_ratio"]),
             _x(e["ggml_vs_quiet"]), _x(e["torch_vs_quiet"])] for e in entries]
    out = ["contention: batch 1, ms per image (medians); ratio = ggml / torch in the same case; "
           "vs quiet = that case / the quiet case"] + _table(columns, rows)
    out.append("  (load: the 1-minute load average as the case started, busy processes included)")
    return out
