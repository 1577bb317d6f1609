"""The benchmark's FLOP counter and one tiny end-to-end run. Nothing here looks at timings: the machine
running the tests may be shared and slow, so only structure and correctness are asserted."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

import pyggml_resnet
from pyggml_resnet import bench
from pyggml_resnet.arch import BY_NAME
from pyggml_resnet.bench import contention, procs
from pyggml_resnet.plan import gemm_paths


def _out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def torchvision_macs(block: str, layers, size: int = 224, num_classes: int = 1000, groups: int = 1,
                     width_per_group: int = 64) -> int:
    """Multiply-accumulates of torchvision's ResNet, written out block by block from its conv shapes
    (independently of arch.py/resnet.py, which the counter under test walks)."""
    h = _out(size, 7, 2, 3)
    macs = 64 * 3 * 7 * 7 * h * h  # stem conv
    h = _out(h, 3, 2, 1)  # max pool
    expansion = 4 if block == "bottleneck" else 1
    cin = 64
    for stage, n in enumerate(layers):
        planes = 64 * 2 ** stage
        width = int(planes * width_per_group / 64) * groups
        cout = planes * expansion
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            ho = _out(h, 3, stride, 1)
            if block == "bottleneck":
                macs += cin * width * h * h  # 1x1, at the input resolution
                macs += width * (width // groups) * 9 * ho * ho  # 3x3, strided, grouped
                macs += width * cout * ho * ho  # 1x1 expansion
            else:
                macs += cin * width * 9 * ho * ho + width * width * 9 * ho * ho
            if stride != 1 or cin != cout:
                macs += cin * cout * ho * ho  # 1x1 strided shortcut
            cin, h = cout, ho
    return macs + cin * num_classes  # fc


@pytest.mark.parametrize("name, block, layers, gmacs", [
    ("resnet18", "basic", (2, 2, 2, 2), 1.8),
    ("resnet50", "bottleneck", (3, 4, 6, 3), 4.1),
    ("resnet101", "bottleneck", (3, 4, 23, 3), 7.8),
])
def test_flops_are_twice_the_macs(name, block, layers, gmacs):
    expected = 2 * torchvision_macs(block, layers)
    assert bench.flops_per_image(name) == expected
    assert bench.flops_per_image(BY_NAME[name], 224, 224, num_classes=1000) == expected
    assert expected / 2e9 == pytest.approx(gmacs, abs=0.05)  # the figures everyone quotes


@pytest.mark.parametrize("name, layers, groups, width, gmacs", [
    ("wide_resnet50_2", (3, 4, 6, 3), 1, 128, 11.40),
    ("resnext50_32x4d", (3, 4, 6, 3), 32, 4, 4.23),
    ("resnext101_32x8d", (3, 4, 23, 3), 32, 8, 16.41),
    ("resnext101_64x4d", (3, 4, 23, 3), 64, 4, 15.46),
])
def test_flops_of_wide_resnets_and_resnexts(name, layers, groups, width, gmacs):
    """Grouped convs count their MACs per group; the quoted figures are torchvision's `_ops` metadata."""
    expected = 2 * torchvision_macs("bottleneck", layers, groups=groups, width_per_group=width)
    assert bench.flops_per_image(name) == expected
    assert expected / 2e9 == pytest.approx(gmacs, abs=0.02)


def test_flops_follow_input_size_and_classes():
    assert bench.flops_per_image("resnet50", 160, num_classes=10) == 2 * torchvision_macs(
        "bottleneck", (3, 4, 6, 3), size=160, num_classes=10)


def test_workers_import_the_package_the_parent_runs_from(tmp_path):
    """Not whatever pyggml_resnet sits in their working directory (a source checkout without its built
    extension, when the README's main job runs there after a non-editable install)."""
    probe = subprocess.run(procs.python_c("print(sys.path[0])"), cwd=tmp_path, capture_output=True, text=True,
                           check=True)
    assert probe.stdout.strip() == os.path.dirname(os.path.dirname(os.path.abspath(pyggml_resnet.__file__)))


def busy_loop(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return contention.BUSY_LOOP.encode() in f.read()
    except OSError:  # gone meanwhile
        return False


def test_end_to_end_ggml_against_torch(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "tmp.json"
    proc = subprocess.run([sys.executable, "-m", "pyggml_resnet", "bench", "--arch", "resnet18", "--batch", "1",
                           "--rounds", "1", "--iters", "1", "--engines", "ggml", "torch", "--contention", "--json", str(out),
                           "--wait-quiet", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert {"model", "settings", "machine", "engines", "correctness", "results", "cold_start", "notes"} <= set(report)
    assert report["model"]["arch"] == "resnet18"
    assert report["model"]["flops_per_image"] == 2 * torchvision_macs("basic", (2, 2, 2, 2))
    assert set(report["engines"]) == {"ggml-f32", "torch"}
    assert all(e["status"] == "ok" and e["peak_rss_kib"] > 0 for e in report["engines"].values())

    check = {c["engine"]: c for c in report["correctness"]}
    assert check["ggml-f32"]["reference"] == "torch"
    # The bench's own PyTorch forward and ggml agree to f32 rounding on the same random weights.
    assert check["ggml-f32"]["rel_l2_error"] < 1e-5
    assert check["ggml-f32"]["top1_agrees"]

    rows = {(r["engine"], r["batch"]) for r in report["results"]}
    assert rows == {("ggml-f32", 1), ("torch", 1)}
    for r in report["results"]:
        assert len(r["samples_ms_per_image"]) == 1
        assert r["min_ms_per_image"] <= r["median_ms_per_image"] <= r["max_ms_per_image"]
        assert r["gflops"] > 0
    cold = {c["engine"]: c for c in report["cold_start"]}
    assert set(cold) == {"ggml-f32", "torch"}
    for c in cold.values():
        parts = c["import_s"] + c["load_s"] + c["first_inference_s"]
        assert c["total_s"] == pytest.approx(parts) and min(c["import_s"], c["load_s"], c["first_inference_s"]) > 0
    assert report["machine"]["versions"]["ggml"]
    assert "ggml-f32" in proc.stdout and "cold start" in proc.stdout
    # Every cold-start column is explained under the table.
    legend = proc.stdout.split("cold start:")[1].split("load time by stored type")[0]
    for column in ("import:", "load:", "first:", "total:", "vs torch:", "load vs torch:"):
        assert f" {column} " in legend.replace("\n", " "), column
    # The load-time row: the same weights stored in each type, loaded as they are stored.
    loads = {x["dtype"]: x for x in report["load_by_dtype"]}
    assert list(loads) == ["f32", "f16", "bf16", "q8_0"]
    assert loads["f32"]["ratio_to_f32"] == 1.0 and all(x["median_s"] > 0 for x in loads.values())
    assert loads["f16"]["file_bytes"] < 0.6 * loads["f32"]["file_bytes"]
    assert re.search(r"^  bf16 +\d+\.\d{3} +\d+\.\d{3} +\d+\.\d\dx +\d+\.\d$", proc.stdout, re.M)

    # --contention: the same two engines again in four cases, with the busy processes gone afterwards.
    threads = report["settings"]["threads"]
    cases = report["contention"]
    assert [(c["case"], c["threads"], c["busy"]) for c in cases] == [
        ("quiet", threads, 0), ("2x threads", 2 * threads, 0), ("1 busy", threads, 1), ("2 busy", threads, 2)]
    for c in cases:
        assert len(c["ggml_samples_ms"]) == len(c["torch_samples_ms"]) == 1
        assert c["ratio_to_torch"] == pytest.approx(c["ggml_ms"] / c["torch_ms"])
        assert c["ratio_vs_quiet_ratio"] == pytest.approx(c["ratio_to_torch"] / cases[0]["ratio_to_torch"])
        assert c["ggml_vs_quiet"] == pytest.approx(c["ggml_ms"] / cases[0]["ggml_ms"])
    assert "contention" in proc.stdout and "2 busy" in proc.stdout
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and busy_loop(pid)]
    # Temporary files are cleaned up: only the JSON is left behind in the working directory.
    assert [p.name for p in tmp_path.iterdir()] == ["tmp.json"]


def test_without_torch_no_reference_and_no_results_file(tmp_path, monkeypatch, capsys):
    """Without torch there is nothing to check ggml against: the bench says so instead of comparing ggml-f32
    with itself. And it writes bench-results.json only when asked (--json)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("torch", "onnx", "onnxruntime") else real(name, *a))
    monkeypatch.chdir(tmp_path)
    rc = bench.main(["--arch", "resnet18", "--rounds", "1", "--iters", "1", "--threads", "1", "--wait-quiet", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "note: torch is not installed: skipping PyTorch and ONNX Runtime" in out
    assert ("note: no reference engine: torch is not installed (pip install torch==2.13.0), so ggml's logits are "
            "not checked against anything and no time has a ratio to PyTorch's") in out
    assert "correctness:" not in out and "ggml-f32" in out
    assert list(tmp_path.iterdir()) == []  # no bench-results.json, and the run's temporary files are gone


@pytest.mark.skipif(not gemm_paths(), reason="no packed GEMM path on this CPU")
def test_gemm_rows(tmp_path):
    """--gemm packed ggml: one f32 row per product engine, in the same run; bf16 too where it has a packed path."""
    out = tmp_path / "gemm.json"
    proc = subprocess.run([sys.executable, "-m", "pyggml_resnet", "bench", "--arch", "resnet18", "--batch", "1",
                           "--rounds", "1", "--iters", "1", "--engines", "ggml", "--dtype", "f32", "bf16",
                           "--gemm", "packed", "ggml", "--json", str(out), "--wait-quiet", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    bf16 = {"ggml-bf16-packed", "ggml-bf16-mul_mat"} if gemm_paths("bf16") else {"ggml-bf16"}
    assert set(report["engines"]) == {"ggml-f32-packed", "ggml-f32-mul_mat"} | bf16
    assert all(e["status"] == "ok" for e in report["engines"].values())


def test_quiet_waits_for_three_quiet_seconds_and_no_longer_than_told():
    """The timed rounds start after three quiet seconds in a row (a busy second starts the count again), or
    after --wait-quiet seconds of measuring, returning how busy the last second was."""
    from pyggml_resnet.bench import quiet

    def measures(values):
        it = iter(values)
        calls = []
        return calls, lambda: calls.append(1) or next(it)

    calls, measure = measures([1.9, 0.1, 0.2, 1.0, 0.1, 0.0, 0.3, 5.0])
    assert quiet.wait_until_quiet(60, measure=measure) == 0.3 and len(calls) == 7
    calls, measure = measures([1.5] * 100)
    assert quiet.wait_until_quiet(10, measure=measure) == 1.5 and len(calls) == 10
    calls, measure = measures([1.5])
    assert quiet.wait_until_quiet(0, measure=measure) == 1.5 and len(calls) == 1  # measured, not waited for
    assert quiet.wait_until_quiet(60, measure=lambda: None) is None  # no /proc/stat: no wait


def test_busy_cpus_from_proc_stat_deltas():
    from pyggml_resnet.bench import quiet

    reads = iter([(100, 1000, 4), (250, 1200, 4)])  # 150 busy jiffies of 200, on 4 CPUs: 3 CPUs busy
    assert quiet.busy_cpus(sleep=lambda s: None, read=lambda: next(reads)) == pytest.approx(3.0)
    assert quiet.busy_cpus(sleep=lambda s: None, read=lambda: None) is None
    if os.path.exists("/proc/stat"):
        busy, total, cpus = quiet._cpu_times()
        assert 0 <= busy <= total and cpus >= 1


def test_timed_rounds_wait_for_quiet_and_say_when_it_never_came(monkeypatch, capsys):
    """The bench's first output is trustworthy: its timed rounds start after the wait, and a machine still busy
    then is noted with what was measured (not the lagging load average the build left behind)."""
    from pyggml_resnet.bench import quiet, run as bench_run

    waits = []
    r = bench_run.Run(bench_run.parse_args(["--wait-quiet", "7"]), "/nonexistent")
    for busy, noted in ((0.1, False), (1.6, True)):
        monkeypatch.setattr(quiet, "wait_until_quiet", lambda limit, progress, b=busy: waits.append(limit) or b)
        r.notes.clear()
        assert bench_run._wait_until_quiet(r, load_avg=9.0) == busy
        assert bool(r.notes) == noted
    assert waits == [7, 7]
    assert re.match(r"the machine is busy \(1\.6 of \d+ CPUs busy with other work as the timed rounds started\)",
                    r.notes[0])
    monkeypatch.setattr(quiet, "wait_until_quiet", lambda limit, progress: None)  # no /proc/stat
    r.notes.clear()
    bench_run._wait_until_quiet(r, load_avg=9.0)
    assert r.notes[0].startswith("the machine may be busy (1-minute load average 9.0")
