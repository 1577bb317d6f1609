"""The benchmark's FLOP counter and one tiny end-to-end run. Nothing here looks at timings: the machine
running the tests may be shared and slow, so only structure and correctness are asserted."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import pyggml_resnet
from pyggml_resnet import bench
from pyggml_resnet.arch import BY_NAME, Preprocessing
from pyggml_resnet.bench import contention, peers, procs
from pyggml_resnet.bench import run as run_module
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
        assert len(r["samples_ms_per_image"]) == 1  # the turn's untimed first forward kept apart
        assert r["first_ms_per_image"] > 0
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
                        lambda name, *a: None if name.split(".")[0] in ("torch", "onnx", "onnxruntime", "openvino")
                        else real(name, *a))
    monkeypatch.chdir(tmp_path)
    rc = bench.main(["--arch", "resnet18", "--rounds", "1", "--iters", "1", "--threads", "1", "--wait-quiet", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert ("note: torch is not installed: skipping torch, onnxruntime, onnxruntime-int8, openvino, openvino-bf16, "
            "openvino-int8 (the ONNX models are exported from PyTorch; pip install torch==2.13.0 onnx onnxruntime "
            "openvino)") in out
    assert ("note: no reference engine: torch is not installed (pip install torch==2.13.0), so ggml's logits are "
            "not checked against anything and no time has a ratio to PyTorch's") in out
    assert "correctness:" not in out and "ggml-f32" in out
    assert list(tmp_path.iterdir()) == []  # no bench-results.json, and the run's temporary files are gone


@pytest.mark.skipif(not gemm_paths(), reason="no packed GEMM path on this CPU")
def test_gemm_rows(tmp_path):
    """--gemm packed ggml PATH: a row per choice and type, in the same run; a path named for bf16 runs bf16 there
    (avx512bf16) or widened to f32 (an f32 path), and a choice a type cannot run is skipped with a note."""
    out = tmp_path / "gemm.json"
    path = gemm_paths()[-1]  # an f32 path
    proc = subprocess.run([sys.executable, "-m", "pyggml_resnet", "bench", "--arch", "resnet18", "--batch", "1",
                           "--rounds", "1", "--iters", "1", "--engines", "ggml", "--dtype", "f32", "bf16", "q8_0",
                           "--gemm", "packed", "ggml", path, "avx512bf16", "--json", str(out), "--wait-quiet", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    bf16 = ["ggml-bf16-packed", "ggml-bf16-mul_mat", f"ggml-bf16-{path}"]
    if gemm_paths("bf16"):
        bf16.append("ggml-bf16-avx512bf16")
    else:
        assert "note: no ggml-bf16-avx512bf16 row: this CPU cannot run the packed GEMM's avx512bf16 path" in proc.stdout
    assert list(report["engines"]) == ["ggml-f32-packed", "ggml-f32-mul_mat", f"ggml-f32-{path}", *bf16, "ggml-q8_0"]
    assert all(e["status"] == "ok" for e in report["engines"].values())
    assert "note: no ggml-f32-avx512bf16 row: this CPU cannot run the packed GEMM's avx512bf16 path for f32" in proc.stdout
    # Each ggml row says what it ran: a bf16 row on an f32 path computes in f32, on ggml's mul_mat in bf16.
    widened = f"note: ggml-bf16-{path} ran <Model resnet18 bf16 (computed as f32) batchnorm=folded gemm={path} "
    assert widened in proc.stdout
    assert "note: ggml-bf16-mul_mat ran <Model resnet18 bf16 batchnorm=folded gemm=ggml " in proc.stdout


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

# --------------------------------------------------------------------------------------------------------
# The peers: OpenVINO, and ONNX Runtime's and OpenVINO's int8 on ONNX Runtime's static quantization


SMALL = Preprocessing(resize=73, crop=64)  # small images keep the int8 checks quick


def test_synthetic_images_are_deterministic_distinct_and_picture_like(tmp_path):
    calibration = peers.images(peers.CALIBRATION, 3, SMALL)
    test = peers.images(peers.TEST, 4, SMALL)
    assert calibration.shape == (3, 3, 64, 64) and test.shape == (4, 3, 64, 64) and test.dtype == np.float32
    np.testing.assert_array_equal(peers.images(peers.TEST, 2, SMALL), test[:2])  # image i at any count
    # No test image is a calibration image, nor two test images the same.
    flat = np.concatenate([calibration, test]).reshape(7, -1)
    assert min(np.abs(a - b).max() for i, a in enumerate(flat) for b in flat[i + 1:]) > 0.5
    # Normalized as ImageNet photos are (about zero mean, unit spread), and smooth like them: neighbouring
    # pixels are strongly correlated, unlike the noise the timed inputs are.
    assert abs(test.mean()) < 1.5 and 0.2 < test.std() < 2.5
    for x in test:
        a, b = x[:, :, :-1].ravel(), x[:, :, 1:].ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.8
    # The model's preprocessing is used: another crop gives another size.
    assert peers.images(peers.TEST, 1).shape == (1, 3, 224, 224)
    # They are the pictures, saved as files and preprocessed as any image file is (5/4 the resize's side).
    peers.pictures(peers.TEST, 2, 73 * 5 // 4)[1].save(tmp_path / "test1.png")
    np.testing.assert_array_equal(pyggml_resnet.preprocess(tmp_path / "test1.png", resize=73, crop=64), test[1])


def test_agreement_counts_errors_and_top_classes():
    ref = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    z = ref.copy()
    z[0, 6], z[0, 0] = -1.0, 10.0  # image 0: another top class; the reference's 6 drops out of the top 5
    z[1, 0], z[1, 1] = 5.0, 6.0  # image 1: top classes swapped, the reference's 0 still in the top 5
    got = peers.agreement(z, ref)
    assert got["images"] == 2 and got["top1_agreement"] == 0.0 and got["top5_agreement"] == 0.5
    assert got["rel_l2_error"] == pytest.approx(np.sqrt(49 + 100 + 1 + 1) / np.linalg.norm(ref))
    assert peers.agreement(ref, ref) == {"images": 2, "rel_l2_error": 0.0, "top1_agreement": 1.0,
                                          "top5_agreement": 1.0}


def test_ort_int8_logits_of_a_reference_resnet(tmp_path):
    """The function a test of our own int8 compares with: ONNX Runtime's quantizer on the same net, calibration
    and test images. Its error is that of int8 (not zero, not f32's), and small. Run in a child process:
    importing onnx imports ml_dtypes, which teaches NumPy bfloat16 for the rest of the process, and
    test_convert checks how a bfloat16 checkpoint is refused without it."""
    missing = [m for m in ("torch", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    import torch

    from reference_resnet import make_model

    out = tmp_path / "logits.npz"
    code = (f"import sys, numpy as np; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            "from reference_resnet import make_model; from pyggml_resnet.arch import Preprocessing; "
            "from pyggml_resnet.bench import peers; small = Preprocessing(resize=73, crop=64); "
            "int8, f32 = peers.ort_int8_logits(make_model(18, seed=18, num_classes=100), "
            "peers.images(peers.CALIBRATION, 8, small), peers.images(peers.TEST, 8, small), threads=1); "
            f"np.savez({str(out)!r}, int8=int8, f32=f32)")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=600)
    int8, f32 = np.load(out)["int8"], np.load(out)["f32"]
    assert int8.shape == f32.shape == (8, 100)
    with torch.inference_mode():  # the f32 logits are the model's on the test images (threads may differ)
        want = make_model(18, seed=18, num_classes=100)(torch.from_numpy(peers.images(peers.TEST, 8, SMALL)))
    np.testing.assert_allclose(f32, want.numpy(), rtol=1e-5, atol=1e-5)
    got = peers.agreement(int8, f32)
    assert 1e-3 < got["rel_l2_error"] < 0.2, got
    assert got["top1_agreement"] >= 0.75 and got["top5_agreement"] >= 0.875, got


def test_engines_that_cannot_run_are_skipped_with_a_note(tmp_path, monkeypatch):
    """Each engine is skipped for the first package it lacks (openvino-int8 runs ONNX Runtime's quantization),
    and openvino-bf16 also where the CPU has no bf16 instructions. Only find_spec is asked: nothing is imported."""
    json_spec = importlib.util.find_spec("json")  # stands for an installed package
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxruntime", "openvino") else json_spec)
    monkeypatch.setattr(run_module, "machine_info", lambda: {"isa": ["avx2", "avx512f"]})
    run = run_module.Run(run_module.parse_args([]), str(tmp_path))
    assert run.args.engines == ["ggml", "torch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16",
                                "openvino-int8"]
    assert run_module.available_engines(run) == ["torch"]
    assert run.notes == [
        "onnxruntime is not installed: skipping onnxruntime, onnxruntime-int8, openvino-int8 (pip install onnxruntime "
        "openvino)",
        "openvino is not installed: skipping openvino, openvino-bf16 (pip install openvino)"]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: json_spec)
    run = run_module.Run(run_module.parse_args(["--engines", "openvino", "openvino-bf16", "ggml"]), str(tmp_path))
    assert run_module.available_engines(run) == ["openvino"]
    assert run.notes == ["this CPU has no native bf16 (AVX512-BF16 or AMX), where OpenVINO's bf16 would be "
                         "emulated: skipping openvino-bf16"]
    monkeypatch.setattr(run_module, "machine_info", lambda: {"isa": ["avx512f", "avx512_bf16"]})
    run = run_module.Run(run_module.parse_args(["--engines", "openvino-bf16", "openvino"]), str(tmp_path))
    assert run_module.available_engines(run) == ["openvino-bf16", "openvino"] and run.notes == []


def test_end_to_end_peers(tmp_path):
    """Every peer engine runs on the same random ResNet-18 and is as far from PyTorch as its precision allows:
    the f32 ones to float rounding, bf16 to bf16's, the int8 ones to int8's on the synthetic test images."""
    missing = [m for m in ("torch", "onnx", "onnxruntime", "openvino") if importlib.util.find_spec(m) is None]
    if missing:  # asked, not imported: onnx brings ml_dtypes, see test_ort_int8_logits_of_a_reference_resnet
        pytest.skip(f"not installed: {', '.join(missing)}")
    out = tmp_path / "peers.json"
    engines = ["torch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16", "openvino-int8"]
    proc = subprocess.run([sys.executable, "-m", "pyggml_resnet", "bench", "--arch", "resnet18", "--batch", "1",
                           "--rounds", "1", "--iters", "1", "--threads", "2", "--calibration-count", "8",
                           "--test-count", "8", "--engines", *engines, "--json", str(out), "--wait-quiet", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(report["machine"]["isa"]))
    ran = [e for e in engines if e != "openvino-bf16" or native_bf16]
    assert list(report["engines"]) == ran
    assert all(e["status"] == "ok" for e in report["engines"].values())
    assert report["settings"]["test_images"] == 8 and report["settings"]["calibration_images"] == 8
    if not native_bf16:
        assert "skipping openvino-bf16" in proc.stdout
    check = {c["engine"]: c for c in report["correctness"]}
    assert set(check) == set(ran) and all(c["reference"] == "torch" and c["images"] == 8 for c in check.values())
    for name in ("onnxruntime", "openvino"):
        assert check[name]["rel_l2_error"] < 1e-5 and check[name]["top1_agreement"] == 1.0
    if native_bf16:
        assert 1e-4 < check["openvino-bf16"]["rel_l2_error"] < 0.05 and check["openvino-bf16"]["top1_agreement"] >= 0.75
    for name in ("onnxruntime-int8", "openvino-int8"):
        c = check[name]
        assert 1e-3 < c["rel_l2_error"] < 0.2 and c["top1_agreement"] >= 0.75 and c["top5_agreement"] >= 0.875, c
    # Both int8 engines run the same QDQ model: they agree with each other far better than with f32.
    assert abs(check["onnxruntime-int8"]["rel_l2_error"] - check["openvino-int8"]["rel_l2_error"]) < 0.05
    results = {r["engine"]: r for r in report["results"]}
    assert set(results) == set(ran)
    for name, r in results.items():
        assert r["ratio_to_torch"] == pytest.approx(r["median_ms_per_image"] / results["torch"]["median_ms_per_image"])
        assert r["rel_l2_error"] == check[name]["rel_l2_error"]
        assert re.search(rf"^  {name} +1 +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+x +\d\.\de[-+]\d\d ", proc.stdout, re.M), name
        assert re.search(rf"^  {name} +\d\.\d\de[-+]\d\d +[0-8]/8 +[0-8]/8$", proc.stdout, re.M), name
    assert report["machine"]["versions"]["openvino"] and report["machine"]["versions"]["onnxruntime"]
    assert [p.name for p in tmp_path.iterdir()] == ["peers.json"]



def test_ggml_int8_row_beside_onnxruntime_int8(tmp_path):
    """--dtype int8: a ggml-int8 row, the model converted with calibration on the int8 peers' own images, at
    least as close to PyTorch as ONNX Runtime's int8 of the same weights (random ResNet-18: 8.7e-3 against
    3.4e-2 measured)."""
    missing = [m for m in ("torch", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    out = tmp_path / "int8.json"
    proc = subprocess.run([sys.executable, "-m", "pyggml_resnet", "bench", "--arch", "resnet18", "--batch", "1",
                           "--rounds", "1", "--iters", "1", "--threads", "2", "--calibration-count", "8",
                           "--test-count", "8", "--dtype", "int8", "--engines", "ggml", "torch", "onnxruntime-int8",
                           "--json", str(out), "--wait-quiet", "0"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert list(report["engines"]) == ["ggml-int8", "torch", "onnxruntime-int8"]
    assert all(e["status"] == "ok" for e in report["engines"].values())
    check = {c["engine"]: c for c in report["correctness"]}
    ours, theirs = check["ggml-int8"], check["onnxruntime-int8"]
    assert 1e-4 < ours["rel_l2_error"] <= theirs["rel_l2_error"], (ours, theirs)
    assert ours["top1_agreement"] >= theirs["top1_agreement"] and ours["top5_agreement"] == 1.0, (ours, theirs)


def test_a_worker_reports_its_own_peak_rss_not_the_bench_process_s(tmp_path):
    """The speed table's peak RSS is each engine process's own. Linux's ru_maxrss carries a parent's peak into
    a child it starts (through vfork and exec), so after the bench process itself once peaked high (its int8
    conversion) every row read that same peak (583 MiB for every engine). Here this process peaks at 1 GiB
    first; a ggml ResNet-18 worker's own peak is a fraction of that."""
    from pyggml_resnet import convert
    from pyggml_resnet.bench.workload import random_state

    cfg = BY_NAME["resnet18"]
    path = tmp_path / "resnet18.gguf"
    convert.write_gguf(convert.Checkpoint.of(random_state(cfg, 10)), path, dtype="f32", progress=False)
    ballast = np.ones(1 << 30, np.uint8)  # every page touched: this process's peak is above 1 GiB
    del ballast
    cmd = procs.child_command("worker", "ggml", path, cfg, 10, size=32, threads=1, dtype="f32", batches=[1])
    worker, _ = procs.start_worker(cmd, str(tmp_path / "worker.log"))
    try:
        peak_kib = worker.request({"cmd": "exit"}, 60)["maxrss_kib"]
    finally:
        worker.stop()
    assert 10 << 10 < peak_kib < 512 << 10  # more than an interpreter's 10 MiB, well under the parent's peak
