"""Pretrained torchvision weights by name -> a cached GGUF file -> a loaded `Model`.

    model = pyggml_resnet.from_pretrained("resnet50")                 # torchvision's DEFAULT: IMAGENET1K_V2
    model = pyggml_resnet.from_pretrained("resnet50.IMAGENET1K_V1")   # one weights version
    pyggml-resnet classify dog.jpg --model resnet50                   # the same from the command line

Names are ``ARCH`` or ``ARCH.WEIGHTS`` (``ARCH:WEIGHTS`` is accepted too), ARCH one of resnet18/34/50/101/152,
wide_resnet50_2, wide_resnet101_2, resnext50_32x4d, resnext101_32x8d or resnext101_64x4d, and WEIGHTS a
torchvision weights name (IMAGENET1K_V1, IMAGENET1K_V2, or DEFAULT), matched without regard to case. A bare
ARCH means torchvision's DEFAULT weights: IMAGENET1K_V2 where they exist, else IMAGENET1K_V1.
`PRETRAINED` lists the 17 official checkpoints with torchvision 0.29.1's URLs and preprocessing.

The first call downloads the checkpoint (stdlib urllib, streamed to a temporary file in the cache
directory), verifies it, converts it once to GGUF in the cache (this step needs torch) and deletes the
downloaded ``.pth``: only the GGUF is kept. Later calls load that GGUF and touch no network at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .arch import BY_NAME, Preprocessing
from .dtypes import NAMES as DTYPES
from .errors import Error, InputError, ModelFormatError

TIMEOUT = 30.0  # seconds: to connect, and for each read of the download (not for the whole transfer)
CHUNK = 1 << 20  # bytes per read while streaming
ENV_CACHE = "PYGGML_RESNET_CACHE"
HASH_REGEX = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's check_hash convention: "resnet18-f37072fd.pth"
# How `_gguf_path` names a cached file: ARCH.WEIGHTS.TAG.DTYPE.gguf (see Source.filename).
_CACHED_NAME = re.compile(rf"({'|'.join(map(re.escape, BY_NAME))})\.[A-Za-z0-9_.-]+\.[a-f0-9]+\.({'|'.join(DTYPES)})\.gguf")

_V1 = Preprocessing(resize=256, crop=224)  # torchvision's ImageClassification(crop_size=224)
_V2 = Preprocessing(resize=232, crop=224)  # ImageClassification(crop_size=224, resize_size=232): the new recipe


class DownloadError(Error, OSError):
    """A checkpoint could not be downloaded or failed its checksum. Nothing of the attempt is left behind."""


@dataclass(frozen=True)
class Pretrained:
    """One official torchvision checkpoint."""

    arch: str  # "resnet101"
    weights: str  # "IMAGENET1K_V2"
    url: str
    preprocessing: Preprocessing

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.weights}"


_BASE = "https://download.pytorch.org/models/"
PRETRAINED: dict[str, Pretrained] = {p.name: p for p in (
    # From torchvision 0.29.1, torchvision/models/resnet.py (ResNet*_Weights).
    Pretrained("resnet18", "IMAGENET1K_V1", _BASE + "resnet18-f37072fd.pth", _V1),
    Pretrained("resnet34", "IMAGENET1K_V1", _BASE + "resnet34-b627a593.pth", _V1),
    Pretrained("resnet50", "IMAGENET1K_V1", _BASE + "resnet50-0676ba61.pth", _V1),
    Pretrained("resnet50", "IMAGENET1K_V2", _BASE + "resnet50-11ad3fa6.pth", _V2),
    Pretrained("resnet101", "IMAGENET1K_V1", _BASE + "resnet101-63fe2227.pth", _V1),
    Pretrained("resnet101", "IMAGENET1K_V2", _BASE + "resnet101-cd907fc2.pth", _V2),
    Pretrained("resnet152", "IMAGENET1K_V1", _BASE + "resnet152-394f9c45.pth", _V1),
    Pretrained("resnet152", "IMAGENET1K_V2", _BASE + "resnet152-f82ba261.pth", _V2),
    # ResNeXt*_Weights and Wide_ResNet*_Weights, the same file. resnext101_64x4d has only one version,
    # trained with the new recipe, so its IMAGENET1K_V1 takes the V2 preprocessing.
    Pretrained("resnext50_32x4d", "IMAGENET1K_V1", _BASE + "resnext50_32x4d-7cdf4587.pth", _V1),
    Pretrained("resnext50_32x4d", "IMAGENET1K_V2", _BASE + "resnext50_32x4d-1a0047aa.pth", _V2),
    Pretrained("resnext101_32x8d", "IMAGENET1K_V1", _BASE + "resnext101_32x8d-8ba56ff5.pth", _V1),
    Pretrained("resnext101_32x8d", "IMAGENET1K_V2", _BASE + "resnext101_32x8d-110c445d.pth", _V2),
    Pretrained("resnext101_64x4d", "IMAGENET1K_V1", _BASE + "resnext101_64x4d-173b62eb.pth", _V2),
    Pretrained("wide_resnet50_2", "IMAGENET1K_V1", _BASE + "wide_resnet50_2-95faca4d.pth", _V1),
    Pretrained("wide_resnet50_2", "IMAGENET1K_V2", _BASE + "wide_resnet50_2-9ba9bcbe.pth", _V2),
    Pretrained("wide_resnet101_2", "IMAGENET1K_V1", _BASE + "wide_resnet101_2-32ee1156.pth", _V1),
    Pretrained("wide_resnet101_2", "IMAGENET1K_V2", _BASE + "wide_resnet101_2-d733dc28.pth", _V2),
)}
# torchvision's *_Weights.DEFAULT
DEFAULT_WEIGHTS = {"resnet18": "IMAGENET1K_V1", "resnet34": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V2",
                   "resnet101": "IMAGENET1K_V2", "resnet152": "IMAGENET1K_V2", "resnext50_32x4d": "IMAGENET1K_V2",
                   "resnext101_32x8d": "IMAGENET1K_V2", "resnext101_64x4d": "IMAGENET1K_V1",
                   "wide_resnet50_2": "IMAGENET1K_V2", "wide_resnet101_2": "IMAGENET1K_V2"}


@dataclass(frozen=True)
class Source:
    """What `from_pretrained` downloads and how it labels the result."""

    arch: str
    weights: str  # recorded in the GGUF as resnet.weights
    url: str
    preprocessing: Preprocessing

    @property
    def filename(self) -> str:
        """The cached GGUF's name without ".{dtype}.gguf": architecture, weights, and a tag for the file
        downloaded (the hash prefix in the URL's file name, as in resnet18-f37072fd.pth, else a hash of the
        URL)."""
        tag = _url_hash_prefix(self.url) or hashlib.sha256(self.url.encode()).hexdigest()[:12]
        return f"{self.arch}.{_safe(self.weights)}.{tag}"


def resolve(name: str, url: str | None = None) -> Source:
    """The checkpoint a name stands for (see the module docstring). Raises InputError for unknown names.

    With ``url`` (a mirror, or your own checkpoint) the registry's URL is replaced. A registry name keeps its
    weights name and preprocessing; ``ARCH.NAME`` with any other NAME means your own weights, recorded as
    NAME, with torchvision's classic preprocessing (resize 256, crop 224).
    """
    if not isinstance(name, str):
        raise InputError(f"a pretrained model name must be a string, got {type(name).__name__}")
    if name.lower().endswith(".gguf"):
        raise InputError(f"{name!r} is a file name, not a pretrained model name: use pyggml_resnet.load()")
    arch, sep, weights = re.match(r"([^.:]*)([.:]?)(.*)$", name.strip(), re.S).groups()
    arch, weights = arch.lower(), weights.strip()
    if arch not in BY_NAME:
        raise InputError(f"unknown pretrained model {name!r}: the architecture must be one of "
                         f"{', '.join(BY_NAME)} (e.g. 'resnet50' or 'resnet50.IMAGENET1K_V1'); to load a "
                         "converted file, give its path")
    if sep and not weights:
        raise InputError(f"{name!r}: give a weights name after {sep!r}, e.g. {arch}.{DEFAULT_WEIGHTS[arch]}")
    wanted = DEFAULT_WEIGHTS[arch] if not weights or weights.upper() == "DEFAULT" else weights
    entry = PRETRAINED.get(f"{arch}.{wanted.upper()}")
    if entry is not None:
        return Source(arch, entry.weights, url or entry.url, entry.preprocessing)
    if url is None:
        known = ", ".join(n for n in PRETRAINED if n.startswith(arch + "."))
        raise InputError(f"no pretrained weights {name!r}; {arch} has {known} (or pass url= for your own)")
    return Source(arch, wanted, url, Preprocessing())


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
        from . import load

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
    return _cache_root(cache_dir) / f"{source.filename}.{dtype}.gguf"


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
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{_safe(_url_filename(source.url))}.", suffix=".part")
    os.close(fd)
    try:
        _download(source.url, Path(tmp), sha256, progress)
        try:
            convert.convert(tmp, out, dtype=dtype, arch=source.arch, weights=source.weights,
                            preprocessing=source.preprocessing, progress=progress)
        except ModelFormatError as e:
            raise ModelFormatError(f"the file downloaded from {source.url} is not a usable {source.arch} "
                                   f"checkpoint: {e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # success or not, only the GGUF stays


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
    """Streams `url` into `dest` and checks it. The caller deletes `dest` on failure."""
    import http.client  # these three take ~0.1 s to import (email parsing): only when downloading
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    hint = ("check the network connection, or pass url= (--url on the command line) a mirror, or download the "
            ".pth yourself, convert it with python -m pyggml_resnet.convert and load the .gguf")
    digest = hashlib.sha256()
    received = 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "pyggml_resnet"})
    except ValueError as e:
        raise InputError(f"not a URL: {url!r} ({e})") from None
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response, open(dest, "wb") as f:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                      desc=_url_filename(url), disable=not progress) as bar:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}; {hint}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"could not download {url}: {e.reason}; {hint}") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, IncompleteRead, bad status lines
        raise DownloadError(f"could not download {url}: {type(e).__name__}: {e}; {hint}") from None
    if total is not None and received != total:
        raise DownloadError(f"could not download {url}: the connection closed after {received} of {total} "
                            f"bytes; {hint}")
    _verify(url, digest.hexdigest(), sha256)


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
