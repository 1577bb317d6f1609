"""Pretrained torchvision weights by name -> a cached GGUF file -> a loaded `Model`.

    model = pyggml_resnet.from_pretrained("resnet50")                 # torchvision's DEFAULT: IMAGENET1K_V2
    model = pyggml_resnet.from_pretrained("resnet50.IMAGENET1K_V1")   # one weights version
    pyggml-resnet classify dog.jpg --model resnet50                   # the same from the command line

Names are those of the registry, `pyggml_resnet.pretrained` (``ARCH`` or ``ARCH.WEIGHTS``; `PRETRAINED`, its
table of torchvision's 17 official checkpoints, and `resolve` are importable from here too).

The first call downloads the checkpoint (stdlib urllib, streamed to a temporary file in the cache
directory: `atomic.scratch`, deleted on every way out), verifies it, converts it once to GGUF in the cache
(this step needs torch) and deletes the downloaded ``.pth``: only the GGUF is kept. Later calls load that GGUF and touch no network at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import sys
import urllib.parse
from pathlib import Path

from . import atomic
from .arch import BY_NAME
from .dtypes import NAMES as DTYPES
from .errors import Error, InputError, ModelFormatError
from .pretrained import DEFAULT_WEIGHTS, PRETRAINED, Source, resolve  # noqa: F401 (also the hub's API)

TIMEOUT = 30.0  # seconds: to connect, and for each read of the download (not for the whole transfer)
CHUNK = 1 << 20  # bytes per read while streaming
ENV_CACHE = "PYGGML_RESNET_CACHE"
HASH_REGEX = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's check_hash convention: "resnet18-f37072fd.pth"
# How `_gguf_path` names a cached file: ARCH.WEIGHTS.TAG.DTYPE.gguf (see `_stem`).
_CACHED_NAME = re.compile(rf"({'|'.join(map(re.escape, BY_NAME))})\.[A-Za-z0-9_.-]+\.[a-f0-9]+\.({'|'.join(DTYPES)})\.gguf")

class DownloadError(Error, OSError):
    """A checkpoint could not be downloaded or failed its checksum. Nothing of the attempt is left behind."""


def is_path(spec: str) -> bool:
    """Whether a model spec (the CLI's --model, `ray.Predictor`'s model) is a GGUF path rather than a pretrained
    name. Anything that exists, ends in .gguf or contains a path separator is a path, so a mistyped path gets
    "no model file" rather than "unknown pretrained model"."""
    return os.path.exists(spec) or spec.lower().endswith(".gguf") or "/" in spec or os.sep in spec


def open_model(spec: str, *, threads: int | None = None, dtype: str | None = None, url: str | None = None,
               sha256: str | None = None):
    """The model a spec names: `pyggml_resnet.load` for a file, else `from_pretrained` (downloaded and
    converted once)."""
    if is_path(spec):
        from .model import load

        return load(spec, threads=threads, dtype=dtype)
    return from_pretrained(spec, url=url, sha256=sha256, dtype=dtype or "f32", threads=threads)


def default_cache_dir() -> Path:
    """$PYGGML_RESNET_CACHE, else $XDG_CACHE_HOME/pyggml_resnet, else ~/.cache/pyggml_resnet."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative path
        return Path(xdg) / "pyggml_resnet"
    return Path.home() / ".cache" / "pyggml_resnet"


def cached_path(name: str, *, url: str | None = None, dtype: str = "f32", cache_dir=None) -> Path:
    """Where `from_pretrained` keeps (or will keep) the GGUF for these arguments."""
    _check_dtype(dtype)
    return _gguf_path(resolve(name, url), dtype, cache_dir)


def _cache_root(cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _gguf_path(source: Source, dtype: str, cache_dir) -> Path:
    return _cache_root(cache_dir) / f"{_stem(source)}.{dtype}.gguf"


def _stem(source: Source) -> str:
    """The cached GGUF's name without ".{dtype}.gguf": architecture, weights, and a tag for the file
    downloaded (the hash prefix in the URL's file name, as in resnet18-f37072fd.pth, else a hash of the URL)."""
    tag = _url_hash_prefix(source.url) or hashlib.sha256(source.url.encode()).hexdigest()[:12]
    return f"{source.arch}.{_safe(source.weights)}.{tag}"


def from_pretrained(name: str, *, url: str | None = None, sha256: str | None = None, cache_dir=None,
                    dtype: str = "f32", threads: int | None = None, batchnorm: str = "folded",
                    progress: bool = True):
    """A `Model` with torchvision's pretrained weights, downloaded and converted on first use.

    name: "resnet18" .. "resnet152", "wide_resnet50_2", "resnext50_32x4d", ... (torchvision's DEFAULT
        weights) or e.g. "resnet101.IMAGENET1K_V1"; see `PRETRAINED`.
    url: download from here instead of download.pytorch.org (a mirror, or your own checkpoint: then name
        may be e.g. "resnet50.my_finetune", recorded as the weights name).
    sha256: the checkpoint's full SHA-256 in hex. Without it, the hex prefix in the URL's file name is
        checked, as torch.hub does ("resnet101-cd907fc2.pth": the digest must start with cd907fc2).
    cache_dir: default $PYGGML_RESNET_CACHE, else $XDG_CACHE_HOME/pyggml_resnet, else ~/.cache/pyggml_resnet.
    dtype: how the GGUF stores conv and fc weights: "f32" (exact), "f16", "bf16" or "q8_0".
    threads, batchnorm: as for `pyggml_resnet.load`.
    progress: progress bars (download bytes, then conversion) on stderr.

    The cache keeps only the GGUF, named after the architecture, weights, checkpoint and dtype
    (e.g. ``resnet101.IMAGENET1K_V2.cd907fc2.f32.gguf``): the downloaded ``.pth`` is deleted once converted.
    A cached file is used as it is, with no network access (and no check against ``sha256``). Another dtype
    of a checkpoint already cached as f32 is written from that f32 file, also without the network;
    otherwise it is downloaded again. Converting needs torch; loading a cached GGUF does not.

    Raises DownloadError (no network, HTTP error, timeout, truncated download, checksum mismatch), InputError
    (unknown name, bad argument), ModelFormatError (the download is not a usable checkpoint), Error (torch
    is missing). A failed call leaves nothing in the cache: no partial download, no partial GGUF.
    """
    from . import resnet
    from .model import load

    resnet.check_batchnorm(batchnorm)  # before any download
    path = download(name, url=url, sha256=sha256, cache_dir=cache_dir, dtype=dtype, progress=progress)
    try:
        return load(path, threads=threads, batchnorm=batchnorm)
    except ModelFormatError as e:
        raise ModelFormatError(f"{e} (the cached file may be damaged: delete {path} to download it again)") from e


def download(name: str, *, url: str | None = None, sha256: str | None = None, cache_dir=None,
             dtype: str = "f32", progress: bool = True) -> Path:
    """The cached GGUF file `from_pretrained` would load, downloaded and converted first if it is not cached
    yet (arguments and errors as there); returns its path. For filling the cache ahead of time, e.g. before
    copying it to a machine without network access (``pyggml-resnet download NAME``)."""
    _check_dtype(dtype)
    if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256)):
        raise InputError(f"sha256 must be 64 hex digits, got {sha256!r}")
    source = resolve(name, url)
    path = _gguf_path(source, dtype, cache_dir)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        f32 = _gguf_path(source, "f32", cache_dir)
        if dtype != "f32" and f32.is_file():
            _reencode(f32, path, dtype, progress)
        else:
            _download_and_convert(source, path, dtype, sha256, progress)
    return path


def cached_files(cache_dir=None) -> list[Path]:
    """The GGUF files `from_pretrained` has cached (named as `cached_path` names them), sorted. Other files
    in the directory are not ours and are never listed or deleted."""
    root = _cache_root(cache_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _CACHED_NAME.fullmatch(p.name) and p.is_file())


def clear_cache(cache_dir=None) -> list[Path]:
    """Deletes the files `cached_files` lists (and nothing else); returns them."""
    files = cached_files(cache_dir)
    for p in files:
        with contextlib.suppress(FileNotFoundError):  # another process may be clearing it too
            p.unlink()
    return files


def _check_dtype(dtype) -> None:
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _download_and_convert(source: Source, out: Path, dtype: str, sha256: str | None, progress: bool) -> None:
    from . import convert

    if not _torch_available():
        raise Error(f"converting the downloaded checkpoint of {source.arch}.{source.weights} needs torch: "
                    "pip install torch (CPU is enough), or convert it elsewhere "
                    "(python -m pyggml_resnet.convert X.pth X.gguf) and load the .gguf file")
    with atomic.scratch(out.parent, _safe(_url_filename(source.url)), target=out) as tmp:  # only the GGUF stays
        _download(source.url, tmp, sha256, progress)
        try:
            convert.convert(tmp, out, dtype=dtype, arch=source.arch, weights=source.weights,
                            preprocessing=source.preprocessing, progress=progress)
        except ModelFormatError as e:
            raise ModelFormatError(f"the file downloaded from {source.url} is not a usable {source.arch} "
                                   f"checkpoint: {e}") from e


def _reencode(f32: Path, out: Path, dtype: str, progress: bool) -> None:
    """Another dtype from a cached f32 GGUF: its arrays are the checkpoint's f32 values, exactly, and the
    converter keeps its metadata."""
    from . import convert

    convert.convert(f32, out, dtype=dtype, progress=progress)


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _url_filename(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint"


def _url_hash_prefix(url: str) -> str | None:
    """The SHA-256 prefix in the URL's file name (torch.hub's convention: resnet18-f37072fd.pth), or None."""
    m = HASH_REGEX.search(_url_filename(url))
    return m.group(1) if m else None


def _safe(text: str) -> str:
    """`text` usable in a file name on any OS."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip(".") or "_"


def _download(url: str, dest: Path, sha256: str | None, progress: bool) -> None:
    """Streams `url` into `dest` and checks it. The caller deletes `dest` on failure. Network failures raise
    DownloadError; a failure to write `dest` (a full disk) is the OSError that says so, not a network one."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    chunks = _stream(url)
    total = next(chunks)
    with open(dest, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                                     desc=_url_filename(url), disable=not progress) as bar:
        for chunk in chunks:
            f.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    _verify(url, digest.hexdigest(), sha256)


def _stream(url: str):
    """Yields the response's Content-Length (None if it has none), then its body in chunks. Every failure of
    the network or the server raises DownloadError, with what to do about it."""
    import http.client  # these three take ~0.1 s to import (email parsing): only when downloading
    import urllib.error
    import urllib.request

    hint = ("check the network connection, or pass url= (--url on the command line) a mirror, or download the "
            ".pth yourself, convert it with python -m pyggml_resnet.convert and load the .gguf")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "pyggml_resnet"})
    except ValueError as e:
        raise InputError(f"not a URL: {url!r} ({e})") from None
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            yield total
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                yield chunk
    except urllib.error.HTTPError as e:
        raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}; {hint}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"could not download {url}: {e.reason}; {hint}") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, IncompleteRead, bad status lines
        raise DownloadError(f"could not download {url}: {type(e).__name__}: {e}; {hint}") from None
    if total is not None and received != total:
        raise DownloadError(f"could not download {url}: the connection closed after {received} of {total} "
                            f"bytes; {hint}")


def _verify(url: str, actual: str, sha256: str | None) -> None:
    if sha256 is not None:
        if actual != sha256.lower():
            raise DownloadError(f"{url}: SHA-256 mismatch: expected {sha256.lower()}, got {actual}. "
                                "The download was deleted; retry, or check the URL and the checksum")
        return
    prefix = _url_hash_prefix(url)
    if prefix and not actual.startswith(prefix):
        raise DownloadError(f"{url}: SHA-256 mismatch: the file name says it starts with {prefix}, "
                            f"got {actual[:len(prefix)]}. The download was deleted; retry, or check the URL")
