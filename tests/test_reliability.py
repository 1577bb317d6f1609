"""Issue 5, "never crash, never lose data": every kind of bad input, and what happens to it.

ggml reports misuse by calling abort(), which would take the interpreter (and this test run) down with it,
so each test here feeds the package something broken and checks that it raises the documented exception
while the process carries on. docs/reliability.md lists every case and its outcome.

* model files: in tests/test_loader.py, with the loader's tests;
* images through Model.classify: garbage, truncated, empty and decompression-bomb files -> InputError;
  unusual modes classify normally;
* arrays through logits/features/stages: wrong rank, channels, dtype, size, NaN -> InputError; empty
  batches, tiny images, non-contiguous and non-float32 arrays work;
* threads, native memory and close(); and a converter killed with SIGKILL mid-write.
"""

from __future__ import annotations

import ctypes
import gc
import io
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import weakref
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import pyggml_resnet
from pyggml_resnet import InputError, ModelFormatError, arch, convert

SMALL_PRE = arch.Preprocessing(resize=36, crop=32)  # classify at 32x32: fast
pytestmark = pytest.mark.usefixtures("drop_big_files")


@pytest.fixture(scope="module")
def r18(model_files):
    """(reference torch model, .pth, .gguf) of the seeded resnet18 with 10 classes, f32."""
    return model_files(18, 10)


# ----------------------------------------------------------------------------------------------------------
# Images through Model.classify


@pytest.fixture(scope="module")
def small(r18, tmp_path_factory):
    """The resnet18 (10 classes) converted to classify at 32x32, loaded."""
    path = tmp_path_factory.mktemp("small") / "r18-32.gguf"
    convert.convert(r18[1], path, preprocessing=SMALL_PRE, progress=False)
    with pyggml_resnet.load(path, threads=1) as m:
        yield m
    path.unlink()


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height pixels with almost no data: what a decompression bomb looks like
    when opened (Pillow checks the size before decoding anything)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _photo(size=48) -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("data, match", [
    (b"", "empty file"),
    (b"this is not an image", "not an image format Pillow can read"),
    (bytes(range(256)) * 8, "not an image format"),
    (_encoded(_photo(), "JPEG")[:700], "cannot read image"),
    (_encoded(_photo(), "PNG")[:2000], "cannot read image"),
    (_encoded(_photo(), "PNG")[:60], "cannot read image|not an image"),
    (_png_header_only(20000, 20000), "decompression bomb"),
    (_png_header_only(10000, 10000), "decompression bomb"),  # between MAX_IMAGE_PIXELS and twice that
    (_png_header_only(0, 0), "cannot read image|not an image"),
], ids=["empty", "text", "binary", "truncated-jpeg", "truncated-png", "png-header", "bomb", "bomb-warning",
        "zero-size-png"])
def test_bad_image_files(small, tmp_path, data, match):
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape either
        with pytest.raises(InputError, match=match):
            small.classify(path)
        with pytest.raises(InputError, match=match):
            small.classify([_photo(), path])  # one bad image fails the batch, cleanly


def test_other_bad_images(small, tmp_path, r18):
    with pytest.raises(InputError, match="no such file"):
        small.classify(tmp_path / "missing.jpg")
    with pytest.raises(InputError):
        small.classify(tmp_path)  # a directory
    with pytest.raises(InputError, match="not an image"):
        small.classify(r18[2])  # the model file
    with pytest.raises(InputError, match="expected a path, PIL image or numpy array"):
        small.classify(42)
    with pytest.raises(InputError, match="dtype must be uint8"):
        small.classify(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match="no pixels"):
        small.classify(np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(InputError, match="top_k"):
        small.classify(_photo(), top_k=11)


def _same(a, b):
    return [(p.index, p.prob) for p in a] == [(p.index, p.prob) for p in b]


def test_unusual_images_classify(small, tmp_path):
    """Each classifies like the RGB image it should be converted to, through a file and in memory."""
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65536, (40, 30), dtype=np.uint16)
    rgba = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    pal = Image.fromarray(rgba[..., :3]).quantize(16)
    pal.info["transparency"] = 3
    cmyk = Image.fromarray(rgba, "CMYK")
    la = Image.fromarray(rgba[..., :2], "LA")
    cases = {
        "1x1": (Image.new("RGB", (1, 1), (200, 30, 90)), np.full((1, 1, 3), (200, 30, 90), np.uint8), "PNG"),
        "I;16": (Image.fromarray(grey16), np.stack([(grey16 >> 8).astype(np.uint8)] * 3, axis=-1), "PNG"),
        "CMYK": (cmyk, np.asarray(cmyk.convert("RGB")), "JPEG"),
        "LA": (la, np.stack([rgba[..., 0]] * 3, axis=-1), "PNG"),
        "P+transparency": (pal, np.asarray(pal.convert("RGBA"))[..., :3], "PNG"),
        "1x300 strip": (Image.fromarray(rgba[:1, :, :3].repeat(10, axis=1)), rgba[:1, :, :3].repeat(10, axis=1), "PNG"),
    }
    for name, (im, rgb, fmt) in cases.items():
        want = small.classify(np.ascontiguousarray(rgb), top_k=3)
        assert len(want) == 3 and all(0 <= p.prob <= 1 for p in want), name
        assert _same(small.classify(im, top_k=3), want), name
        if fmt == "PNG":  # lossless: the file classifies the same
            path = tmp_path / f"{name.replace(' ', '_')}.png"
            im.save(path)
            assert Image.open(path).mode == im.mode, name
            assert _same(small.classify(path, top_k=3), want), name
        else:
            path = tmp_path / "cmyk.jpg"
            im.save(path, quality=95)
            assert Image.open(path).mode == "CMYK"
            assert len(small.classify(path, top_k=3)) == 3


# ----------------------------------------------------------------------------------------------------------
# Arrays through logits / features / stages


def _x(n=1, h=16, w=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


@pytest.mark.parametrize("x, match", [
    (np.zeros((3, 16, 16), np.float32), r"shape \(N, 3, H, W\), got \(3, 16, 16\)"),
    (np.zeros((1, 1, 3, 16, 16), np.float32), r"got \(1, 1, 3, 16, 16\)"),
    (np.float32(1.0), r"got \(\)"),
    (np.zeros((1, 1, 16, 16), np.float32), r"got \(1, 1, 16, 16\)"),
    (np.zeros((1, 4, 16, 16), np.float32), r"got \(1, 4, 16, 16\)"),
    (np.zeros((1, 16, 16, 3), np.float32), r"got \(1, 16, 16, 3\)"),  # NHWC
    (np.zeros((1, 3, 0, 16), np.float32), "height and width must be 1..4096, got 0x16"),
    (np.zeros((1, 3, 16, 0), np.float32), "got 16x0"),
    (np.broadcast_to(np.float32(0), (1, 3, 4097, 16)), "got 4097x16"),
    (np.broadcast_to(np.float32(0), (1, 3, 10**6, 10**6)), "got 1000000x1000000"),
    (np.zeros((1, 3, 8, 8), object), "real-valued numeric array, got dtype object"),
    (np.full((1, 3, 8, 8), "1.0"), "got dtype <U3"),
    (np.full((1, 3, 8, 8), b"1"), r"got dtype \|S1"),
    (np.zeros((1, 3, 8, 8), np.complex64), "got dtype complex64"),
    (np.zeros((1, 3, 8, 8), bool), "got dtype bool"),
    # raw pixels, as np.asarray(Image.open(...)) gives them: not what the network was trained on
    (np.zeros((1, 3, 8, 8), np.uint8), r"^images are uint8 pixels, .* use np.stack\(\[model.preprocess\(img\)"),
    (np.zeros((2, 8, 8, 3), np.uint8), "images are uint8 pixels"),
    (np.zeros((1, 3, 8, 8), "datetime64[s]"), "got dtype datetime64"),
    ([[[[1.0]]], [[[1.0, 2.0]]]], "cannot use list as an image batch"),  # ragged
    ("images", "got dtype <U6"),
    (None, "got dtype object"),
], ids=["rank3", "rank5", "scalar", "1-channel", "4-channels", "nhwc", "zero-height", "zero-width", "4097",
        "giant", "object", "str", "bytes", "complex", "bool", "uint8", "uint8-nhwc", "datetime", "ragged", "string", "none"])
def test_bad_arrays(small, x, match):
    for method in (small.logits, small.features, small.probabilities, small.stages):
        with pytest.raises(InputError, match=match):
            method(x)


def test_non_finite_inputs_refused(small):
    x = _x(3)
    for value in (np.nan, np.inf, -np.inf):
        bad = x.copy()
        bad[2, 1, 5, 5] = value
        for method in (small.logits, small.features, small.stages):
            with pytest.raises(InputError, match="image 2 of the batch contains NaN or infinite values"):
                method(bad)
    with pytest.raises(InputError, match="image 0 .* NaN or infinite"):
        small.logits(np.full((1, 3, 4, 4), 1e39))  # finite in float64, infinite in float32


def test_tiny_images_match_pytorch(small, r18):
    """The network runs on any size from 1x1 up, as PyTorch's does (every stage then stays 1x1)."""
    ref = r18[0]
    for h, w in [(1, 1), (1, 2), (2, 1), (3, 3), (5, 2), (7, 7)]:
        x = _x(2, h, w, seed=h * 10 + w)
        with torch.no_grad():
            want = ref(torch.from_numpy(x)).numpy()
        got = small.logits(x)
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), (h, w)


def test_empty_batch(small):
    x = np.zeros((0, 3, 20, 30), np.float32)
    assert small.logits(x).shape == (0, 10) and small.logits(x).dtype == np.float32
    assert small.features(x).shape == (0, 512)
    assert small.probabilities(x).shape == (0, 10)
    assert small.classify([]) == []
    empty, one = small.stages(x), small.stages(np.zeros((1, 3, 20, 30), np.float32))
    assert list(empty) == list(one)
    for name in one:
        assert empty[name].shape == (0,) + one[name].shape[1:], name


def test_any_layout_and_real_dtype_works(small):
    x = _x(2, 24, 20)
    want = small.logits(x)
    views = {
        "fortran": np.asfortranarray(x),
        "strided": np.ascontiguousarray(np.repeat(x, 2, axis=3))[..., ::2],
        "nhwc-transposed": np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
        "reversed-twice": x[::-1][::-1],
        "float64": x.astype(np.float64),
        "float16-exact": x.astype(np.float16),
        "list": x.tolist(),
    }
    for name, v in views.items():
        expect = small.logits(np.asarray(v, np.float32)) if name == "float16-exact" else want
        assert np.array_equal(small.logits(v), expect), name
    ints = np.random.default_rng(2).integers(-3, 4, (2, 3, 20, 20))
    for dtype in (np.int8, np.int32, np.int64, np.uint16):  # uint8 is refused: raw pixels (test_bad_arrays)
        v = np.abs(ints).astype(dtype) if np.dtype(dtype).kind == "u" else ints.astype(dtype)
        assert np.array_equal(small.logits(v), small.logits(v.astype(np.float32))), dtype
    assert np.array_equal(small.features(x[:, :, ::2, ::2]), small.features(x[:, :, ::2, ::2].copy()))


def test_big_batches_run_in_chunks(small):
    """A batch runs as chunks of up to 16 images (fewer for big images): each chunk exactly as on its own."""
    x = _x(37, 8, 8)
    got = small.logits(x)
    for start, stop in ((0, 16), (16, 32), (32, 37)):
        assert np.array_equal(got[start:stop], small.logits(x[start:stop])), start
    big = np.broadcast_to(_x(1, 300, 300), (3, 3, 300, 300))  # 90,000 pixels each: chunks of 8
    assert np.array_equal(small.features(big), np.repeat(small.features(big[:1]), 3, axis=0))


# ----------------------------------------------------------------------------------------------------------
# Threads


def test_eight_threads_get_exactly_the_sequential_results(small):
    rng = np.random.default_rng(3)
    jobs = []
    for i in range(24):
        kind = ("logits", "classify", "features")[i % 3]
        n = 1 + i % 2
        if kind == "classify":
            imgs = [rng.integers(0, 256, (40, 33, 3), dtype=np.uint8) for _ in range(n)]
            jobs.append((kind, imgs if n > 1 else imgs[0]))
        else:
            jobs.append((kind, rng.standard_normal((n, 3, 32, 32)).astype(np.float32)))

    def run(job):
        kind, arg = job
        if kind == "classify":
            return small.classify(arg, top_k=3)
        return getattr(small, kind)(arg)

    want = [run(j) for j in jobs]
    results: dict[tuple[int, int], object] = {}
    errors = []
    barrier = threading.Barrier(8)

    def worker(t):
        try:
            barrier.wait()
            for k in range(len(jobs)):
                j = (k + 3 * t) % len(jobs)  # each thread its own order: the calls overlap in every mix
                results[t, j] = run(jobs[j])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert len(results) == 8 * len(jobs)
    for (t, j), got in results.items():
        if jobs[j][0] == "classify":
            assert got == want[j], (t, j)
        else:
            assert np.array_equal(got, want[j]), (t, j)


def test_close_while_other_threads_compute(r18):
    """Every call either completes correctly or raises InputError("closed"): never anything else."""
    model = pyggml_resnet.load(r18[2], threads=1)
    x = _x(2, 16, 16)
    want = model.logits(x)
    outcomes, errors = [], []
    started = threading.Barrier(5)

    def worker():
        started.wait()
        for _ in range(40):
            try:
                got = model.logits(x)
            except InputError as e:
                assert "closed" in str(e)
                outcomes.append("closed")
                return
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            outcomes.append("ok" if np.array_equal(got, want) else "WRONG")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    started.wait()
    time.sleep(0.05)
    model.close()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert "WRONG" not in outcomes and outcomes.count("closed") == 4


# ----------------------------------------------------------------------------------------------------------
# Native memory and close()


def _rss() -> int:
    """Resident bytes after collecting garbage and handing freed heap back to the system: otherwise memory
    that earlier tests freed can be returned in the middle of a measurement and hide what a load added."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # glibc
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _finalizers(model) -> list:
    """The weakref finalizers that free each native object the model holds: backend, weights, graphs."""
    return [model._backend._finalizer, model._weights._finalizer] + [g._finalizer for g, _ in model._graphs.values()]


def test_300_calls_do_not_grow_memory(small):
    x1, x2 = _x(1, 32, 32), _x(2, 24, 24)
    img = np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)

    calls_ = (lambda: small.logits(x1), lambda: small.features(x2), lambda: small.classify(img, top_k=2))

    def calls(n):
        for i in range(n):
            calls_[i % 3]()

    calls(30)  # warm-up: graphs built and cached
    before = _rss()
    calls(300)
    grown = _rss() - before
    assert grown < 5 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 300 calls"


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """A resnet50 (1000 classes, random weights: only its size matters here), ~100 MB of f32 weights."""
    rng = np.random.default_rng(0)
    state = {name: (np.ones(shape, np.float32) if name.endswith("running_var")
                    else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01))
             for name, shape in arch.expected_tensors(arch.CONFIGS[50], 1000).items()}
    path = convert.write_gguf(convert.Checkpoint.of(state), tmp_path_factory.mktemp("r50") / "r50.gguf",
                              progress=False)
    del state
    yield path
    path.unlink()


def test_close_frees_the_native_memory(resnet50_file):
    base = _rss()
    with pyggml_resnet.load(resnet50_file, threads=1) as model:
        model.logits(_x(1, 64, 64))
        weights = model.weights_bytes
        assert weights > 90 << 20
        loaded = _rss()
        finalizers = _finalizers(model)
        assert len(finalizers) == 3 and all(f.alive for f in finalizers)
    assert not any(f.alive for f in finalizers)
    closed = _rss()
    assert loaded - base > 0.9 * weights
    assert loaded - closed > 0.9 * weights, (base, loaded, closed, weights)


def test_garbage_collected_model_frees_its_memory(r18):
    model = pyggml_resnet.load(r18[2], threads=1)
    model.logits(_x(1, 8, 8))
    finalizers = _finalizers(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert not any(f.alive for f in finalizers)


def test_every_method_after_close_raises_input_error(r18):
    model = pyggml_resnet.load(r18[2], threads=1)
    x = _x(1, 8, 8)
    model.logits(x)
    model.close()
    model.close()  # twice is fine
    assert model.closed and "closed" in repr(model)
    calls = {
        "logits": lambda: model.logits(x), "features": lambda: model.features(x),
        "probabilities": lambda: model.probabilities(x), "stages": lambda: model.stages(x),
        "classify": lambda: model.classify(np.zeros((8, 8, 3), np.uint8)),
        "classify-list": lambda: model.classify([]), "classify-bad-path": lambda: model.classify("/nonexistent"),
        "empty-batch": lambda: model.logits(x[:0]), "threads": lambda: model.threads,
        "set-threads": lambda: setattr(model, "threads", 2),
    }
    for name, call in calls.items():
        with pytest.raises(InputError, match="this model has been closed"):
            call()
    with model:  # entering a closed model is harmless; leaving closes it again
        pass
    assert model.num_classes == 10 and model.feature_dim == 512  # plain attributes stay readable


# ----------------------------------------------------------------------------------------------------------
# Checkpoints that would make the converter allocate far more than the file holds
# (the other converter refusals, the weights-only pickle and the legacy .bin cases are in test_convert.py)


def test_expanded_tensor_checkpoint_refused_before_copying(tmp_path):
    """torch.save writes a stride-0 view as its one stored value: 40 KB on disk, 8 GB once copied out."""
    path = tmp_path / "expanded.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1).expand(2**22, 512)}, path)
    assert path.stat().st_size < 64 << 10
    with pytest.raises(ModelFormatError, match=r"fc.weight has shape \(4194304, 512\) but its storage holds only 1"):
        convert.read_checkpoint(path)


def test_shared_storage_checkpoint_refused_before_copying(tmp_path):
    """200 entries naming one 4 MB tensor: 4 MB on disk, 800 MB of copies."""
    big = torch.zeros(2**20)
    path = tmp_path / "shared.pth"
    torch.save({f"layer{i}.weight": big for i in range(200)}, path)
    with pytest.raises(ModelFormatError, match="far more values than the file's size allows"):
        convert.read_checkpoint(path)


def test_zip_bomb_checkpoint_refused_before_loading(tmp_path):
    """torch.load inflates deflated zip records too, allocating what the zip claims: refused before it."""
    import zipfile

    good = tmp_path / "small.pth"
    torch.save({"a": torch.zeros(4)}, good)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(bomb, "w") as out:
        for info in z.infolist():
            if info.filename.endswith("data/0"):  # 256 MB of zeros, in ~250 KB
                out.writestr(info.filename, bytes(256 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(info, z.read(info))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ModelFormatError, match=r"zip records expand to \d+ bytes from a \d+-byte file \(a zip bomb\?\)"):
        convert.read_checkpoint(bomb)


# ----------------------------------------------------------------------------------------------------------
# Writes: a converter killed with SIGKILL while writing


def test_sigkill_midway_leaves_no_output(tmp_path, r18):
    rng = np.random.default_rng(0)
    state = {name: torch.from_numpy(np.ones(shape, np.float32) if name.endswith("running_var")
                                    else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01))
             for name, shape in arch.expected_tensors(arch.CONFIGS[101], 1000).items()}
    ckpt = tmp_path / "resnet101.pth"
    torch.save(state, ckpt)
    del state
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.gguf"
    for attempt in range(3):  # the converter finishing before the kill lands would only be a retry
        proc = subprocess.Popen([sys.executable, "-m", "pyggml_resnet.convert", str(ckpt), str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            parts = list(out_dir.glob("*.part"))
            if parts and parts[0].stat().st_size > 1 << 20:  # past the header: tensor data going in
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(60)
        if proc.returncode == -signal.SIGKILL:
            break
        out.unlink(missing_ok=True)
        for p in out_dir.glob("*.part"):
            p.unlink()
    assert proc.returncode == -signal.SIGKILL, "the converter was never caught mid-write"
    assert not out.exists()
    leftovers = sorted(p.name for p in out_dir.iterdir())
    assert len(leftovers) == 1 and re.fullmatch(r"\.model\.gguf\.\w+\.part", leftovers[0]), leftovers
    assert (out_dir / leftovers[0]).stat().st_size < 179_000_000  # a partial file, under a temporary name
    # A later conversion to the same output is unaffected, and leaves the other leftover alone.
    convert.convert(r18[1], out, progress=False)
    with pyggml_resnet.load(out, threads=1) as m:
        assert m.num_classes == 10
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(leftovers + ["model.gguf"])
