"""pyggml_resnet.hub: pretrained names -> download -> verify -> convert once -> cached GGUF -> Model.

Every download goes to a ThreadingHTTPServer on 127.0.0.1 that the test starts and stops itself (proxies
switched off), with timeouts of a fraction of a second: nothing here leaves the machine.
"""

import errno
import hashlib
import http.server
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyggml_resnet
from pyggml_resnet import DownloadError, Error, InputError, ModelFormatError, arch, hub, pretrained
from pyggml_resnet.arch import Key

FAST_TIMEOUT = 0.5  # s; hub.TIMEOUT during these tests
SMALL = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)


class LocalServer:
    """Serves `routes` {path: (mode, bytes)} on 127.0.0.1 and records every request path.

    mode "ok": the bytes; "truncated": a Content-Length 1000 bytes larger than the body, then close;
    "stall": headers and half the body, then silence; "hang": no answer at all. Anything else is a 404."""

    def __init__(self):
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.requests: list[str] = []
        self.release = threading.Event()  # lets stalled handlers return at shutdown
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                mode, body = server.routes.get(self.path.lstrip("/"), ("404", b""))
                try:
                    if mode == "404":
                        self.send_error(404)
                        return
                    if mode == "hang":
                        server.release.wait(10)
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(body) + (1000 if mode == "truncated" else 0)))
                    self.end_headers()
                    if mode == "stall":
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        server.release.wait(10)
                        return
                    self.wfile.write(body)  # HTTP/1.0: the connection closes after this
                except (ConnectionError, OSError):
                    pass  # the client gave up first: expected in the timeout tests

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def serve(self, path: str, body: bytes, mode: str = "ok") -> str:
        self.routes[path] = (mode, body)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def stop(self):
        if self.thread is not None:
            self.release.set()
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)
            self.thread = None


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """No proxy may turn a loopback request into a real one; short timeouts."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setattr(hub, "TIMEOUT", FAST_TIMEOUT)


@pytest.fixture
def server():
    s = LocalServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def resnet18(model_files):
    """(checkpoint bytes, its torch.hub-style file name, the conftest GGUF converted from it)."""
    _, pth, gguf_path = model_files(18)
    data = Path(pth).read_bytes()
    return data, f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth", gguf_path


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_cache_file_names():
    """The cache file name says which weights, which checkpoint (the URL's hash prefix) and which dtype."""
    assert hub.cached_path("resnext50_32x4d", cache_dir="/c").name == "resnext50_32x4d.IMAGENET1K_V2.1a0047aa.f32.gguf"
    name = hub.cached_path("resnet101", dtype="q8_0", cache_dir="/c").name
    assert name == "resnet101.IMAGENET1K_V2.cd907fc2.q8_0.gguf"
    # A URL without a hash prefix: a hash of the URL tags the file instead.
    assert re.fullmatch(r"resnet50\.mine\.[0-9a-f]{12}\.f32\.gguf",
                        hub.cached_path("resnet50.mine", url="http://h/ft.pth", cache_dir="/c").name)
    assert hub.PRETRAINED is pretrained.PRETRAINED and hub.resolve is pretrained.resolve  # the hub's API too


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(hub.ENV_CACHE, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert hub.default_cache_dir() == tmp_path / "home" / ".cache" / "pyggml_resnet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.default_cache_dir() == tmp_path / "xdg" / "pyggml_resnet"
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "mine"))
    assert hub.default_cache_dir() == tmp_path / "mine"


# -- downloading and converting -------------------------------------------------------------------------


def test_download_convert_then_offline(server, resnet18, tmp_path):
    data, filename, reference_gguf = resnet18
    url = server.serve(filename, data)
    cache = tmp_path / "cache"
    with pyggml_resnet.load(reference_gguf, threads=1) as ref:
        want_logits = ref.logits(SMALL)
        want_top = ref.classify(np.full((40, 50, 3), 127, np.uint8), top_k=3)

    with pyggml_resnet.from_pretrained("resnet18", url=url, cache_dir=cache, threads=1, progress=False) as m:
        np.testing.assert_array_equal(m.logits(SMALL), want_logits)
        assert m.classify(np.full((40, 50, 3), 127, np.uint8), top_k=3) == want_top
        assert m.weights_name == "IMAGENET1K_V1" and m.preprocessing.resize == 256 and m.dtype == "f32"
        assert m.config.name == "resnet18" and m.labels == ref.labels
    assert server.requests == ["/" + filename]
    # Only the GGUF is kept: no .pth, no temporary file.
    assert files_in(cache) == [f"resnet18.IMAGENET1K_V1.{filename[9:17]}.f32.gguf"]

    server.stop()  # from here on any network access would fail
    with pyggml_resnet.from_pretrained("resnet18", url=url, cache_dir=cache, threads=1, progress=False) as m:
        np.testing.assert_array_equal(m.logits(SMALL), want_logits)
    # Another dtype of a checkpoint cached as f32 is written from that file, offline too.
    with pyggml_resnet.from_pretrained("resnet18", url=url, cache_dir=cache, dtype="f16", threads=1,
                                       progress=False) as m:
        assert m.dtype == "f16" and m.weights_name == "IMAGENET1K_V1"
        got = m.logits(SMALL)
    assert np.linalg.norm(got - want_logits) / np.linalg.norm(want_logits) < 1e-2
    assert server.requests == ["/" + filename]
    assert len(files_in(cache)) == 2 and all(".f16." in n or ".f32." in n for n in files_in(cache))


def test_registry_preprocessing_recorded(server, tmp_path):
    """resnet50 means IMAGENET1K_V2 (resize 232): through a mirror URL the GGUF still records both."""
    cfg = arch.BY_NAME["resnet50"]
    state = {n: torch.full(s, 0.01) for n, s in arch.expected_tensors(cfg, 1000).items()}
    ckpt = tmp_path / "r50.pth"
    torch.save(state, ckpt)
    data = ckpt.read_bytes()
    url = server.serve(f"resnet50-{hashlib.sha256(data).hexdigest()[:10]}.pth", data)
    with pyggml_resnet.from_pretrained("resnet50", url=url, cache_dir=tmp_path / "c", threads=1,
                                       progress=False) as m:
        assert m.weights_name == "IMAGENET1K_V2"
        assert (m.preprocessing.resize, m.preprocessing.crop) == (232, 224)
        path = m.path
    assert path.parent == tmp_path / "c" and "IMAGENET1K_V2" in path.name and path.name.endswith(".f32.gguf")
    import gguf

    fields = gguf.GGUFReader(path).fields
    assert fields[Key.WEIGHTS].contents() == "IMAGENET1K_V2"
    assert fields[Key.RESIZE].contents() == 232 and fields[Key.CROP].contents() == 224


def test_env_cache_dir_and_custom_weights(server, resnet18, tmp_path, monkeypatch):
    data, _, reference_gguf = resnet18
    monkeypatch.setenv("PYGGML_RESNET_CACHE", str(tmp_path / "env-cache"))
    url = server.serve("finetuned.pth", data)  # no hash in the name: nothing to check it against
    with pyggml_resnet.from_pretrained("resnet18.my_weights", url=url, threads=1, progress=False) as m:
        assert m.weights_name == "my_weights" and m.preprocessing.resize == 256
        with pyggml_resnet.load(reference_gguf, threads=1) as ref:
            np.testing.assert_array_equal(m.logits(SMALL[:1]), ref.logits(SMALL[:1]))
    [name] = files_in(tmp_path / "env-cache")
    assert name.startswith("resnet18.my_weights.") and name.endswith(".f32.gguf")


def test_full_sha256(server, resnet18, tmp_path):
    data, filename, _ = resnet18
    url = server.serve(filename, data)  # the file name's prefix is right; the full digest given is not
    cache = tmp_path / "c"
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        hub.from_pretrained("resnet18", url=url, sha256="0" * 64, cache_dir=cache, progress=False)
    assert files_in(cache) == []
    # The right digest passes the check; this body is then refused by the converter, leaving nothing.
    junk = b"this is not a checkpoint" * 10
    url = server.serve("junk.pth", junk)
    with pytest.raises(ModelFormatError, match="not a usable resnet18"):
        hub.from_pretrained("resnet18", url=url, sha256=hashlib.sha256(junk).hexdigest().upper(),
                            cache_dir=cache, progress=False)
    assert files_in(cache) == []


def test_filename_hash_prefix(server, tmp_path):
    body = b"x" * 5000
    digest = hashlib.sha256(body).hexdigest()
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    url = server.serve(f"resnet18-{wrong}.pth", body)
    with pytest.raises(DownloadError, match=f"starts with {wrong}"):
        hub.from_pretrained("resnet18", url=url, cache_dir=tmp_path, progress=False)
    assert files_in(tmp_path) == []


def _refused_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/resnet18-00000000.pth"


@pytest.mark.parametrize("failure", ["404", "refused", "hang", "stall", "truncated", "stopped"])
def test_network_failures(server, tmp_path, failure):
    body = b"y" * 200_000
    name = f"resnet18-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    if failure == "refused":
        url = _refused_url()
    elif failure == "404":
        url = server.url(name)
    else:
        url = server.serve(name, body, mode="ok" if failure == "stopped" else failure)
        if failure == "stopped":
            server.stop()
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        hub.from_pretrained("resnet18", url=url, cache_dir=tmp_path / "c", progress=False)
    assert time.monotonic() - start < 10 * FAST_TIMEOUT
    message = str(info.value)
    assert url in message and "mirror" in message  # what failed, and what to do
    assert isinstance(info.value, OSError) and isinstance(info.value, Error)
    assert files_in(tmp_path / "c") == []


def test_full_disk_is_not_a_network_failure(server, small_disk):
    """A cache on a full disk: an OSError naming the file it was making, not "check the network"."""
    body = b"y" * (2 << 20)
    url = server.serve(f"resnet18-{hashlib.sha256(body).hexdigest()[:8]}.pth", body)
    with pytest.raises(OSError) as info:
        hub.from_pretrained("resnet18", url=url, cache_dir=small_disk, progress=False)
    assert not isinstance(info.value, DownloadError) and info.value.errno == errno.ENOSPC
    assert info.value.filename == str(hub.cached_path("resnet18", url=url, cache_dir=small_disk))
    assert files_in(small_disk) == ["old"]


def test_torch_missing(server, resnet18, tmp_path, monkeypatch):
    data, filename, _ = resnet18
    url = server.serve(filename, data)
    monkeypatch.setattr(hub, "_torch_available", lambda: False)
    with pytest.raises(Error, match="pip install torch"):
        hub.from_pretrained("resnet18", url=url, cache_dir=tmp_path, progress=False)
    assert server.requests == [] and files_in(tmp_path) == []  # refused before downloading


@pytest.mark.parametrize("kwargs", [dict(dtype="f64"), dict(sha256="abc"), dict(batchnorm="none"),
                                    dict(name="resnet18.IMAGENET1K_V9")])
def test_bad_arguments_fail_before_any_request(server, tmp_path, kwargs):
    url = server.serve("resnet18-00000000.pth", b"z")
    name = kwargs.pop("name", "resnet18")
    with pytest.raises(InputError):
        hub.from_pretrained(name, url=url if "IMAGENET" not in name else None, cache_dir=tmp_path, **kwargs)
    assert server.requests == [] and files_in(tmp_path) == []


# -- the command line: classify --url/--sha256, download, cache ---------------------------------------------


def cli_run(capsys, *args):
    from pyggml_resnet import cli

    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_classify_url_and_sha256(server, resnet18, tmp_path, monkeypatch, capsys):
    """--url/--sha256 reach the download, as the offline message's url= does for Python."""
    data, filename, reference_gguf = resnet18
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache"))
    image = tmp_path / "grey.png"
    from PIL import Image

    Image.new("RGB", (40, 50), (127, 127, 127)).save(image)
    url = server.serve("mine.pth", data)  # no hash in the name: only --sha256 can check it
    rc, out, err = cli_run(capsys, "classify", image, "--model", "resnet18.mine", "--url", url,
                           "--sha256", "0" * 64, "--threads", 1)
    assert rc == 1 and out == "" and f"error: {url}: SHA-256 mismatch: expected {'0' * 64}" in err
    assert files_in(tmp_path / "cache") == []
    rc, out, err = cli_run(capsys, "classify", image, "--model", "resnet18.mine", "--url", url,
                           "--sha256", hashlib.sha256(data).hexdigest(), "--threads", 1, "--top-k", 2)
    assert rc == 0 and server.requests == ["/mine.pth"] * 2
    with pyggml_resnet.load(reference_gguf, threads=1) as ref:
        top = ref.classify(str(image), top_k=2)
    assert out.splitlines() == [str(image)] + [f"  top[{i}]={p.prob:.6f} index = {p.index} label = {p.label}"
                                               for i, p in enumerate(top)]
    # A model file has no checkpoint to download: the option would be ignored, so it is refused.
    rc, out, err = cli_run(capsys, "classify", image, "--model", reference_gguf, "--url", url)
    assert rc == 1 and err == (f"error: --url and --sha256 name a pretrained model's checkpoint; --model "
                               f"{reference_gguf} is a model file\n")


def test_offline_message_names_the_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path))
    url = _refused_url()
    rc, out, err = cli_run(capsys, "classify", tmp_path / "x.png", "--model", "resnet18", "--url", url)
    assert rc == 1 and err.startswith(f"error: could not download {url}") and "(--url on the command line)" in err


def test_download_then_cache_list_and_clear(server, resnet18, tmp_path, monkeypatch, capsys):
    data, filename, reference_gguf = resnet18
    cache = tmp_path / "cache"
    monkeypatch.setenv(hub.ENV_CACHE, str(cache))
    url = server.serve(filename, data)
    rc, out, err = cli_run(capsys, "download", "resnet18", "--url", url)
    f32 = hub.cached_path("resnet18", url=url)
    assert rc == 0 and out == f"{f32} ({f32.stat().st_size / 1e6:.1f} MB)\n" and f32.is_file()
    server.stop()  # the rest is offline: bf16 is written from the cached f32 file, a second download is a no-op
    rc, out, _ = cli_run(capsys, "download", "resnet18", "--url", url, "--dtype", "bf16")
    bf16 = hub.cached_path("resnet18", url=url, dtype="bf16")
    assert rc == 0 and out.startswith(f"{bf16} (") and bf16.is_file()
    assert cli_run(capsys, "download", "resnet18", "--url", url)[:2] == (0, f"{f32} ({f32.stat().st_size / 1e6:.1f} MB)\n")
    # What from_pretrained then loads, without the network.
    with hub.from_pretrained("resnet18", url=url, dtype="bf16", threads=1, progress=False) as m:
        assert m.path == bf16 and m.dtype == "bf16"
    assert server.requests == ["/" + filename]

    # Files the cache did not make are neither listed nor deleted.
    (cache / "notes.txt").write_text("mine")
    (cache / "my-model.gguf").write_bytes(Path(reference_gguf).read_bytes()[:100])
    rc, out, _ = cli_run(capsys, "cache")
    sizes = {p: p.stat().st_size for p in (bf16, f32)}
    total = sum(sizes.values()) / 1e6
    assert rc == 0 and out.splitlines() == [f"{sizes[p] / 1e6:9.1f} MB  {p.name}" for p in sorted(sizes)] + [
        f"2 file(s), {total:.1f} MB, in {cache} (set ${hub.ENV_CACHE} to move it)"]
    rc, out, _ = cli_run(capsys, "cache", "clear")
    assert rc == 0 and out == f"deleted 2 file(s), {total:.1f} MB, from {cache}\n"
    assert files_in(cache) == ["my-model.gguf", "notes.txt"]
    assert cli_run(capsys, "cache")[1] == f"0 file(s), 0.0 MB, in {cache} (set ${hub.ENV_CACHE} to move it)\n"


def test_download_bad_name_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path))
    rc, out, err = cli_run(capsys, "download", "vgg16")
    assert rc == 1 and out == "" and err.startswith("error: unknown pretrained model 'vgg16'")
    assert files_in(tmp_path) == []
