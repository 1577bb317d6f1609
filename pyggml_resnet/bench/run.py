"""`pyggml-resnet bench`: the run, phase by phase, each phase a function over one `Run`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from .. import arch, convert, loader
from ..arch import Preprocessing, ResNetConfig
from ..argtypes import positive
from ..dtypes import NAMES as DTYPES

from ..errors import Error, InputError, print_error
from ..cpu import available_cpus, default_threads
from ..ggml import Type
from ..packing import GEMM_PATHS
from ..plan import gemm_path, packed_paths

# --gemm choices, and the suffix each gives its row's name: the load default's packed path, ggml's mul_mat, or a
# packed path by name (an f32 path for bf16 or f16 weights: widened to f32 at load).
GEMMS = {"packed": "packed", "ggml": "mul_mat", **{path: path for path in GEMM_PATHS}}
from . import contention, peers, quiet
from .child import ENGINES, iterations
from .procs import Worker, WorkerError, answer_timeout, child_command, run_child, start_worker
from .report import format_report, machine_info
from .workload import SEED, flops_per_image, random_state

COLD_TIMEOUT = 600.0
PREPARE_TIMEOUT = 900.0
SWITCH_PAUSE = 0.05  # s between engines: lets the last one's spinning worker threads (OpenMP, ORT) go idle


@dataclass
class Run:
    """What the phases share: the settings, the model, the engine rows and their state so far."""

    args: argparse.Namespace
    tmp: str  # the run's temporary directory
    cfg: ResNetConfig | None = None
    num_classes: int = 1000
    size: int = 224  # the input's side
    preprocessing: Preprocessing = field(default_factory=Preprocessing)  # the model's, for the synthetic images
    gguf_path: str = ""
    source: str = ""  # where the weights came from, for the report
    rows: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # name -> (engine, dtype, model path)
    gemm: dict[str, str] = field(default_factory=dict)  # name -> load(gemm=...) of a ggml row that sets it
    status: dict[str, dict] = field(default_factory=dict)  # name -> the report's "engines" entry
    workers: dict[str, Worker] = field(default_factory=dict)  # the rows whose worker is running
    est: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> {batch: s per iteration}
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)
        _progress(f"note: {text}")

    def fail(self, name: str, err, inline: bool = False) -> None:
        """Marks a row failed and stops its worker."""
        self.status[name].update(status="failed", error=str(err))
        _progress(" (failed)" if inline else f"\n{name} failed: {err}", end="" if inline else "\n")
        if name in self.workers:
            self.workers.pop(name).stop()

    def command(self, mode: str, engine: str, path: str, **options) -> list[str]:
        return child_command(mode, engine, path, self.cfg, self.num_classes, size=self.size, **options)

    def start_worker(self, name: str, row: str, threads: int, **options) -> tuple[Worker, dict]:
        """Starts a worker for engine row `row` (logging to NAME.log): see `procs.start_worker`."""
        engine, dtype, path = self.rows[row]
        return start_worker(self.command("worker", engine, path, threads=threads, dtype=dtype,
                                         gemm=self.gemm.get(row), **options), os.path.join(self.tmp, f"{name}.log"))

    def timeout(self, name: str, batch: int, iters: int) -> float:
        """Seconds to wait for row `name`'s answer, from its warm-up time at this batch (10 s if unknown)."""
        return answer_timeout(self.est.get(name, {}).get(batch, 10.0), iters)


def _progress(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def parse_args(argv, prog: str = "pyggml-resnet bench") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog,
                                description="Time ggml against PyTorch eager, ONNX Runtime and OpenVINO (f32, "
                                            "and int8 quantized statically) on the same ResNet weights, each "
                                            "engine in its own process, and check how far each is from "
                                            "PyTorch's logits.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a GGUF model file (default: a seeded random model of --arch)")
    src.add_argument("--arch", choices=list(arch.BY_NAME), default="resnet101",
                     help="architecture of the random model (default: resnet101)")
    p.add_argument("--batch", type=positive, nargs="+", default=[1], help="batch sizes (default: 1)")
    p.add_argument("--threads", type=positive, default=None, help="CPU threads per engine (default: OMP_NUM_THREADS, else all available)")
    p.add_argument("--rounds", type=positive, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--iters", type=positive, default=3,
                   help="timed iterations per engine per round at batch 1, about ITERS/BATCH for larger "
                        "batches (default: 3)")
    p.add_argument("--dtype", nargs="+", choices=convert.DTYPES, default=["f32"],
                   help="ggml weight types, one engine row each (default: f32); int8 converts the model with "
                        "calibration on the int8 peers' --calibration-count images")
    p.add_argument("--gemm", nargs="+", choices=GEMMS, default=None,
                   help="what runs ggml's f32, bf16 and f16 products, one row each: packed (our GEMM on the load "
                        "default's path, ggml-f32-packed), ggml (its mul_mat, ggml-f32-mul_mat) or a packed path by "
                        "name (ggml-bf16-avx512: bf16 widened to f32); a choice a type cannot run here is skipped "
                        "with a note (default: one row, the load default)")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                   help="engines to run: ggml (one row per --dtype), torch (PyTorch eager), onnxruntime and "
                        "openvino (the f32 ONNX export; openvino-bf16 at OpenVINO's bf16 precision, on CPUs with "
                        "native bf16), onnxruntime-int8 and openvino-int8 (ONNX Runtime's static int8 "
                        "quantization of that export) (default: all; missing ones are skipped)")
    p.add_argument("--calibration-count", type=positive, default=16, metavar="N",
                   help="synthetic images that calibrate the int8 engines' activation ranges (default: 16)")
    p.add_argument("--test-count", type=positive, default=8, metavar="N",
                   help="synthetic images, none of them a calibration image, whose logits every engine is "
                        "checked on against PyTorch's (default: 8)")
    p.add_argument("--contention", action="store_true",
                   help="then time ggml and PyTorch again with twice the threads, and beside 1 and 2 busy "
                        "processes, and print each case's ratio against the quiet one")
    p.add_argument("--wait-quiet", type=float, default=60, metavar="S",
                   help="before the timed rounds, wait up to S seconds until other processes keep less than half "
                        "a CPU busy (default: 60; 0 measures one second and does not wait)")
    p.add_argument("--json", metavar="OUT", help="also write every result, sample and setting to this JSON file")
    a = p.parse_args(argv)
    a.batch = list(dict.fromkeys(a.batch))
    a.dtype = list(dict.fromkeys(a.dtype))
    a.gemm = list(dict.fromkeys(a.gemm or ()))
    a.engines = list(dict.fromkeys(a.engines))
    if a.threads is None:
        a.threads = default_threads()
    return a


def _interrupt(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so the workers are killed and the temporary files removed.
    raise KeyboardInterrupt


def main(argv=None, prog: str = "pyggml-resnet bench") -> int:
    args = parse_args(argv, prog)
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _bench(args)
    except KeyboardInterrupt:
        _progress("\ninterrupted")
        return 130
    except (Error, OSError) as e:
        return print_error(e)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _bench(args) -> int:
    run = Run(args, tempfile.mkdtemp(prefix="pyggml-bench-"))
    try:
        return _phases(run)
    finally:
        for w in run.workers.values():
            w.stop()
        shutil.rmtree(run.tmp, ignore_errors=True)


def _phases(run: Run) -> int:
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    make_model(run)
    flops = flops_per_image(run.cfg, run.size, run.size, run.num_classes)
    engine_rows(run, prepare_references(run, available_engines(run)))
    start_workers(run)
    correctness = check_correctness(run)
    busy = _wait_until_quiet(run, load_avg)
    samples, firsts = timed_rounds(run)
    oversubscribed = contention_cases(run)
    stop_workers(run)
    cold = cold_starts(run)
    loads = load_times(run)
    a = run.args
    report = {
        "model": {"arch": run.cfg.name, "source": run.source, "num_classes": run.num_classes,
                  "input": [3, run.size, run.size], "flops_per_image": flops},
        "settings": {"batches": a.batch, "threads": a.threads, "rounds": a.rounds,
                     "iters": {str(b): iterations(a.iters, b) for b in a.batch},
                     "engines": list(run.rows), "ggml_dtypes": a.dtype, "test_images": a.test_count,
                     "calibration_images": a.calibration_count if any(dt == "int8" for _, dt, _ in run.rows.values())
                     else None},
        "machine": {**machine_info(), "load_average_at_start": load_avg, "busy_cpus_before_timing": busy},
        "engines": run.status,
        "correctness": correctness,
        "results": summarize(run, samples, firsts, flops),
        "cold_start": cold,
        "load_by_dtype": loads,
        "contention": oversubscribed,
        "notes": run.notes,
    }
    print(format_report(report))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        _progress(f"wrote {a.json}")
    return 0 if run.rows and all(s["status"] == "ok" for s in run.status.values()) else 1


def _wait_until_quiet(run: Run, load_avg: float | None) -> float | None:
    """Waits (--wait-quiet) for other work to stop before the timed rounds, and notes any still running, which
    shows up as spread between min and max. Returns the CPUs busy then (None where not measurable)."""
    busy = quiet.wait_until_quiet(run.args.wait_quiet, progress=_progress)
    if busy is not None and busy >= quiet.QUIET_CPUS:
        run.note(f"the machine is busy ({busy:.1f} of {available_cpus()} CPUs busy with other work as the timed "
                 "rounds started): expect noisy timings; the min columns suffer least")
    elif busy is None and load_avg is not None and load_avg >= 1:
        run.note(f"the machine may be busy (1-minute load average {load_avg:.1f} on {available_cpus()} CPUs before "
                 "starting): expect noisy timings; the min columns suffer least")
    return busy


def make_model(run: Run) -> None:
    """The model: the GGUF file given, or a seeded random one written to the run's directory."""
    if run.args.model:
        mf = loader.read(run.args.model)  # validates the file before any worker starts
        # Timed on square inputs: a file that records another shape is timed at its height.
        run.cfg, run.num_classes, run.size = mf.config, mf.num_classes, mf.preprocessing.input_size[0]
        run.preprocessing = mf.preprocessing
        run.gguf_path = run.args.model
        run.source = f"{os.path.abspath(run.args.model)} ({mf.weights_name}, stored {mf.dtype})"
        return
    run.cfg = arch.BY_NAME[run.args.arch]
    _progress(f"making a random {run.cfg.name} (seed {SEED}) ...", end=" ")
    t = time.perf_counter()
    run.gguf_path = os.path.join(run.tmp, f"{run.cfg.name}-random.gguf")
    checkpoint = convert.Checkpoint.of(random_state(run.cfg, run.num_classes))
    convert.write_gguf(checkpoint, run.gguf_path, dtype="f32", progress=False, weights=f"random-seed-{SEED}")
    _progress(f"{time.perf_counter() - t:.1f} s")
    run.source = f"random weights (NumPy seed {SEED})"


# What each engine but ggml needs installed: torch runs PyTorch and exports the ONNX model the others run; the
# int8 engines run ONNX Runtime's quantization of it. Then the pip install that brings each package.
NEEDS = {"torch": ("torch",), "onnxruntime": ("torch", "onnx", "onnxruntime"),
         "onnxruntime-int8": ("torch", "onnx", "onnxruntime"), "openvino": ("torch", "onnx", "openvino"),
         "openvino-bf16": ("torch", "onnx", "openvino"),
         "openvino-int8": ("torch", "onnx", "onnxruntime", "openvino")}
PIP = {"torch": "torch==2.13.0", "onnx": "onnx", "onnxruntime": "onnxruntime", "openvino": "openvino"}
NATIVE_BF16 = {"avx512_bf16", "amx_bf16"}  # CPU flags with which OpenVINO's bf16 is not emulated


def available_engines(run: Run) -> list[str]:
    """The engines of --engines, but ggml, that can run here; a note says why each other one cannot."""
    ok, skipped = [], {}  # skipped: {the first missing package: [engines it stops]}
    for engine in run.args.engines:
        if engine == "ggml":
            continue
        missing = next((m for m in NEEDS[engine] if importlib.util.find_spec(m) is None), None)
        if missing:
            skipped.setdefault(missing, []).append(engine)
        else:
            ok.append(engine)
    for package, engines in skipped.items():
        lacking = dict.fromkeys(m for e in engines for m in NEEDS[e] if importlib.util.find_spec(m) is None)
        why = "the ONNX models are exported from PyTorch; " if package == "torch" and engines != ["torch"] else ""
        run.note(f"{package} is not installed: skipping {', '.join(engines)} ({why}pip install "
                 + " ".join(PIP[m] for m in lacking) + ")")
    if "openvino-bf16" in ok and not NATIVE_BF16 & set(machine_info()["isa"]):
        ok.remove("openvino-bf16")
        run.note("this CPU has no native bf16 (AVX512-BF16 or AMX), where OpenVINO's bf16 would be emulated: "
                 "skipping openvino-bf16")
    return ok


def prepare_references(run: Run, engines: list[str]) -> dict[str, str]:
    """The files the peers run, of the same weights: {engine: path}. The .pth and .onnx files are made in one
    child process, ONNX Runtime's int8 quantization of the .onnx (on the calibration images) in another, so
    the f32 engines still run if quantizing fails."""
    if not engines:
        return {}
    int8 = [e for e in engines if ENGINES[e][1] == "int8"]
    onnx = [e for e in engines if e != "torch"]
    _progress("writing the weights for PyTorch" + (" and exporting ONNX" if onnx else "") + " ...", end=" ")
    t = time.perf_counter()
    try:
        run_child(run.command("prepare", "torch", run.gguf_path, out=run.tmp, onnx=bool(onnx)),
                  os.path.join(run.tmp, "prepare.log"), PREPARE_TIMEOUT)
    except WorkerError as e:
        _progress("failed")
        run.note(f"preparing the PyTorch/ONNX models failed, skipping {', '.join(engines)}: {e}")
        return {}
    _progress(f"{time.perf_counter() - t:.1f} s")
    paths = {e: os.path.join(run.tmp, "model.pth" if e == "torch" else "model.onnx") for e in engines}
    if int8:
        for e in int8:
            paths.pop(e)
        if quantize(run, int8):
            paths.update((e, os.path.join(run.tmp, "model-int8.onnx")) for e in int8)
    return paths


def quantize(run: Run, engines: list[str]) -> bool:
    """ONNX Runtime's static int8 quantization of the ONNX export for `engines`, calibrated on
    --calibration-count synthetic images (peers.quantize_int8), in a child process; False (with a note) if it
    failed."""
    n = run.args.calibration_count
    _progress(f"quantizing to int8 on {n} calibration images ...", end=" ")
    t = time.perf_counter()
    calibration = os.path.join(run.tmp, "calibration.npy")
    np.save(calibration, peers.images(peers.CALIBRATION, n, run.preprocessing))
    try:
        run_child(run.command("quantize", "onnxruntime", os.path.join(run.tmp, "model.onnx"), out=run.tmp,
                              calibration=calibration), os.path.join(run.tmp, "quantize.log"), PREPARE_TIMEOUT)
    except WorkerError as e:
        _progress("failed")
        run.note(f"quantizing the ONNX model to int8 failed, skipping {', '.join(engines)}: {e}")
        return False
    _progress(f"{time.perf_counter() - t:.1f} s")
    return True


def int8_model(run: Run) -> str:
    """ggml-int8's model: the f32 file converted to int8, calibrated on the very images the int8 peers are
    (`quantize`), preprocessed as the model's settings say."""
    n = run.args.calibration_count
    _progress(f"converting to int8, calibrated on {n} images ...", end=" ")
    t = time.perf_counter()
    path = os.path.join(run.tmp, f"{run.cfg.name}-int8.gguf")
    convert.convert(run.gguf_path, path, dtype="int8", progress=False,
                    calibration=list(peers.images(peers.CALIBRATION, n, run.preprocessing)))
    _progress(f"{time.perf_counter() - t:.1f} s")
    return path


def engine_rows(run: Run, paths: dict[str, str]) -> None:
    """One row per ggml dtype, and one per other engine prepared."""
    for engine in run.args.engines:
        if engine == "ggml":
            for dt in run.args.dtype:
                if dt == "int8":
                    run.rows["ggml-int8"] = ("ggml", dt, int8_model(run))
                    run.gemm["ggml-int8"] = None
                    continue
                for gemm in _gemm_choices(run, dt):
                    name = f"ggml-{dt}" + (f"-{GEMMS[gemm]}" if gemm else "")
                    run.rows[name] = ("ggml", dt, run.gguf_path)
                    run.gemm[name] = gemm
        elif engine in paths:
            run.rows[engine] = (ENGINES[engine][0], ENGINES[engine][1], paths[engine])
    run.status = {name: {"engine": e, "dtype": dt, "status": "ok", "error": None}
                  for name, (e, dt, _) in run.rows.items()}


def _gemm_choices(run: Run, dtype: str) -> list[str | None]:
    """The load(gemm=...) of each of ggml-`dtype`'s rows: each --gemm choice the plan accepts for it on this CPU
    (a note names the others), or the load default alone where --gemm is not given or the type has no packed
    path (q8_0)."""
    if not run.args.gemm or not packed_paths(dtype):
        return [None]
    choices = []
    for gemm in run.args.gemm:
        try:
            gemm_path(gemm, Type.parse(dtype))
            choices.append(gemm)
        except InputError as e:
            run.note(f"no ggml-{dtype}-{GEMMS[gemm]} row: {e}")
    return choices or [None]


def start_workers(run: Run) -> None:
    """Starts the workers one by one, each loading and warming up alone."""
    for name in run.rows:
        _progress(f"starting {name} ...", end=" ")
        try:
            run.workers[name], ready = run.start_worker(name, name, run.args.threads, batches=run.args.batch)
        except WorkerError as e:
            run.fail(name, e)
            continue
        run.est[name] = {int(b): s for b, s in ready["warmup_s"].items()}
        run.status[name]["load_s_warm"] = ready["load_s"]
        if ready.get("model"):
            run.note(f"{name} ran {ready['model']}")
        _progress(f"ready (load {ready['load_s']:.2f} s, " + ", ".join(
            f"batch {b}: {s * 1e3:.0f} ms" for b, s in run.est[name].items()) + ")")


REFERENCES = ("torch", "onnxruntime", "openvino")  # exact in f32; PyTorch first, as the others imitate it


def check_correctness(run: Run) -> list[dict]:
    """The synthetic test images (none a calibration image) through every engine, one at a time, each engine's
    logits compared with the reference engine's (peers.agreement)."""
    if not any(n in run.workers for n in REFERENCES):
        why = ("torch is not installed (pip install torch==2.13.0)" if importlib.util.find_spec("torch") is None
               else "no torch row ran (--engines ggml torch)")
        run.note(f"no reference engine: {why}, so ggml's logits are not checked against anything and no "
                 "time has a ratio to PyTorch's")
        return []
    path = os.path.join(run.tmp, "test-images.npy")
    np.save(path, peers.images(peers.TEST, run.args.test_count, run.preprocessing))
    logits = {}
    for name, w in list(run.workers.items()):
        try:
            reply = w.request({"cmd": "logits", "path": path}, run.timeout(name, 1, run.args.test_count))
            logits[name] = np.asarray(reply["logits"], dtype=np.float64)
        except WorkerError as e:
            run.fail(name, e)
    ref = next((n for n in REFERENCES if n in logits), None)
    correctness = []
    for name, z in logits.items() if ref else ():
        entry = {"engine": name, "reference": ref, **peers.agreement(z, logits[ref])}
        entry["top1_agrees"] = entry["top1_agreement"] == 1.0  # on every image
        correctness.append(entry)
        run.status[name].update({k: entry[k] for k in ("rel_l2_error", "top1_agreement", "top5_agreement")})
    return correctness


def timed_rounds(run: Run) -> tuple[dict[str, dict[int, list[float]]], dict[str, dict[int, list[float]]]]:
    """Interleaved rounds, the engines in rotating order: the timed samples, {name: {batch: [seconds per image,
    ...]}}, and alike each turn's untimed first forward (what the other engines' turns left it to redo: caches,
    sleeping threads; OpenVINO's is up to a third slower than its next, so timing it would flatter engines that
    keep less warm state)."""
    a = run.args
    samples = {name: {b: [] for b in a.batch} for name in run.rows}
    firsts = {name: {b: [] for b in a.batch} for name in run.rows}
    for r in range(a.rounds if run.workers else 0):
        order = list(run.workers)
        order = order[r % len(order):] + order[:r % len(order)]
        _progress(f"round {r + 1}/{a.rounds}:", end="")
        for b in a.batch:
            iters = iterations(a.iters, b)
            _progress(f"  batch {b}:", end="")
            for name in order:
                if name not in run.workers:
                    continue
                time.sleep(SWITCH_PAUSE)
                _progress(f" {name}", end="")
                try:
                    reply = run.workers[name].request({"cmd": "time", "batch": b, "iters": iters},
                                                      run.timeout(name, b, iters + 1))
                    samples[name][b] += [t / b for t in reply["times"]]
                    firsts[name][b].append(reply["first"] / b)
                except WorkerError as e:
                    run.fail(name, e, inline=True)  # the error itself is in the report
        _progress("")
    return samples, firsts


def contention_cases(run: Run) -> list[dict]:
    """With --contention: ggml (f32 if timed) and PyTorch again, oversubscribed and beside busy processes."""
    if not run.args.contention:
        return []
    ggml_row = next((f"ggml-{dt}" for dt in ("f32", *run.args.dtype) if f"ggml-{dt}" in run.workers), None)
    if ggml_row is None or "torch" not in run.workers:
        run.note("--contention needs a ggml and a PyTorch worker: skipped")
        return []
    try:
        return contention.run_cases(run, ggml_row, _progress)
    except WorkerError as e:
        run.note(f"the contention cases stopped: {e}")
        return []


def stop_workers(run: Run) -> None:
    """Ends every worker, recording its peak RSS."""
    for name in list(run.workers):
        try:
            run.status[name]["peak_rss_kib"] = run.workers[name].request({"cmd": "exit"}, 60)["maxrss_kib"]
        except WorkerError as e:
            run.fail(name, e)
        if name in run.workers:
            run.workers.pop(name).stop()


def cold_starts(run: Run) -> list[dict]:
    """Each engine from a fresh process to its first logits, with its ratio to PyTorch's."""
    cold = []
    for name, (engine, dt, path) in run.rows.items():
        _progress(f"cold start {name} ...", end=" ")
        entry = {"engine": name}
        try:
            msg, t0 = run_child(run.command("cold", engine, path, threads=run.args.threads, dtype=dt,
                                            gemm=run.gemm.get(name)),
                                os.path.join(run.tmp, f"{name}-cold.log"), COLD_TIMEOUT)
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
    return cold


def load_times(run: Run) -> list[dict]:
    """`pyggml_resnet.load` of the same weights stored in each type (re-encoded from the model file, as
    `convert` does), in rounds that alternate the types: median seconds and the ratio to f32's."""
    from .. import load

    paths = {}
    for dt in DTYPES:
        paths[dt] = os.path.join(run.tmp, f"load-{dt}.gguf")
        convert.convert(run.gguf_path, paths[dt], dtype=dt, progress=False)
    _progress("load times by stored type:", end="")
    times = {dt: [] for dt in DTYPES}
    for _ in range(run.args.rounds):
        for dt in DTYPES:
            t = time.perf_counter()
            load(paths[dt], threads=run.args.threads).close()
            times[dt].append(time.perf_counter() - t)
        _progress(".", end="")
    _progress("")
    f32 = statistics.median(times["f32"])
    return [{"dtype": dt, "median_s": statistics.median(s), "min_s": min(s), "ratio_to_f32": statistics.median(s) / f32,
             "file_bytes": os.path.getsize(paths[dt]), "samples_s": s} for dt, s in times.items()]


def summarize(run: Run, samples: dict, firsts: dict, flops: int) -> list[dict]:
    """Per engine and batch: median, min and max time per image, the ratio to PyTorch, GFLOP/s, and the median
    of each turn's untimed first forward."""
    results = []
    for b in run.args.batch:
        torch_s = samples.get("torch", {}).get(b)
        torch_med = statistics.median(torch_s) if torch_s else None
        for name in run.rows:
            s = samples[name][b]
            if not s:
                continue
            med = statistics.median(s)
            results.append({"engine": name, "batch": b, "median_ms_per_image": med * 1e3,
                            "min_ms_per_image": min(s) * 1e3, "max_ms_per_image": max(s) * 1e3,
                            "ratio_to_torch": med / torch_med if torch_med else None,
                            "gflops": flops / med / 1e9, "peak_rss_kib": run.status[name].get("peak_rss_kib"),
                            "rel_l2_error": run.status[name].get("rel_l2_error"),
                            "samples_ms_per_image": [v * 1e3 for v in s],
                            "first_ms_per_image": statistics.median(firsts[name][b]) * 1e3})
    return results
