"""A thin, safe Python layer over the cffi binding to ggml.

It owns every native lifetime (backends, weight buffers, graphs) and is the only module that touches
cffi pointers. ggml reports a bad argument by calling abort(), which would kill the interpreter, so each
function here checks shapes, types and sizes first and raises `InputError` instead.
Shapes use ggml's order: `ne[0]` is the fastest-varying dimension (NumPy's last axis), always 4 of them.
"""

from __future__ import annotations

import concurrent.futures
import enum
import os
import threading
import time
import weakref

import numpy as np

from . import dtypes, int8
from ._ggml import ffi, lib
from .cpu import MAX_THREADS, CpuShare, default_threads
from .errors import InputError
from .packing import GEMM_PATHS, PANEL, packed_shape


class _Type(enum.IntEnum):
    """A tensor type, by its ggml code; its row in `dtypes` says the rest."""

    @property
    def dtype(self) -> dtypes.DType:
        return dtypes.STORED_BY_CODE[self.value]

    @property
    def block_size(self) -> int:
        """Elements per block along ne[0] (1 for float types)."""
        return self.dtype.block_size

    def encode(self, array) -> np.ndarray:
        """`self.dtype.encode(array)`, byte for byte, in C where it is faster (f16: ggml's F16C conversion; q8_0:
        csrc/q8_0.c, as ggml's reference quantizer rounds but vectorised): models load through this."""
        return self.dtype.encode(array, _C_ENCODERS.get(self))

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """`self.dtype.decode(raw)` (stored bytes -> flat float32), the same values, in C where it is faster
        (f16: F16C; bf16: a shift): models load through this."""
        fast = _C_DECODERS.get(self)
        return fast(raw) if fast is not None and raw.size else self.dtype.decode(raw)

    @classmethod
    def parse(cls, name) -> "Type":
        """A Type, or the type a name such as "bf16" (any case) or a `dtypes.DType` stands for."""
        return name if isinstance(name, cls) else cls(dtypes.parse(name).code)


# The types this package stores weights and activations in: F32, F16, BF16, Q8_0; and I8, bytes: the int8
# GEMM's u8 activations (`Graph.gemm_int8`).
Type = _Type("Type", {**{t.name.upper(): t.code for t in dtypes.TYPES}, "I8": dtypes.I8.code})
if any(getattr(lib, f"GGML_TYPE_{t.name}") != t or lib.ggml_blck_size(t) != t.block_size for t in Type):
    raise ImportError("pyggml_resnet.dtypes disagrees with the compiled ggml on a type's code or block size")


# Type.encode's C conversions. `dtypes.DType.encode` hands them only checked arrays: C-contiguous float32, not
# empty, no NaN, in range, rows (the last axis) a whole number of blocks.
def _encode_f16(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.shape, np.float16)
    lib.ggml_cpu_fp32_to_fp16(ffi.from_buffer("float[]", a), ffi.from_buffer("ggml_fp16_t[]", out), a.size)
    return out


def _encode_q8_0(a: np.ndarray) -> np.ndarray:
    row = a.shape[-1]
    out = np.empty((*a.shape[:-1], Type.Q8_0.dtype.nbytes(row)), np.uint8)
    lib.q8_0_encode(ffi.from_buffer("float[]", a), ffi.from_buffer("uint8_t[]", out), a.size)
    return out


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """`dtypes.bf16_round` in C (ggml's scalar conversion, the same rounding and NaN): float32 -> bf16 bits."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    out = np.empty(a.shape, np.uint16)
    lib.ggml_cpu_fp32_to_bf16(ffi.from_buffer("float[]", a), ffi.from_buffer("ggml_bf16_t[]", out), a.size)
    return out


def _decode_half(kind: str, ctype: str):
    """Stored f16 or bf16 bytes -> float32, by ggml's exact conversion of that type."""
    convert = getattr(lib, f"ggml_cpu_{kind}_to_fp32")

    def decode(raw: np.ndarray) -> np.ndarray:
        out = np.empty(raw.size // 2, np.float32)
        convert(ffi.from_buffer(f"{ctype}[]", raw), ffi.from_buffer("float[]", out), out.size)
        return out
    return decode


_C_ENCODERS = {Type.F16: _encode_f16, Type.BF16: bf16_bits, Type.Q8_0: _encode_q8_0}
_C_DECODERS = {Type.F16: _decode_half("fp16", "ggml_fp16_t"), Type.BF16: _decode_half("bf16", "ggml_bf16_t")}


def version() -> str:
    """The version of the ggml compiled into the extension."""
    return ffi.string(lib.ggml_version()).decode()


MAX_WINDOW = lib.OP_PARAM_INT_MAX  # the largest kernel, stride or padding an op takes (csrc/op_params.h)
_MAX_SRC = 9  # the most source tensors a ggml custom op takes (fewer than GGML_MAX_SRC, 10)

# The packed GEMM's paths (packing.GEMM_PATHS) as csrc/gemm.h's enum numbers them.
_GEMM_CODES = {"avx512": lib.GEMM_AVX512, "avx2": lib.GEMM_AVX2, "avx512bf16": lib.GEMM_AVX512_BF16}
if _GEMM_CODES.keys() != GEMM_PATHS.keys():
    raise ImportError("pyggml_resnet.packing and the binding disagree on the packed GEMM's paths")


def gemm_path_supported(path: str) -> bool:
    """Whether this CPU (and this build) runs the packed GEMM's `path`, one of `packing.GEMM_PATHS`."""
    if not isinstance(path, str) or path not in _GEMM_CODES:
        raise InputError(f"the packed GEMM has no path {path!r}; its paths are {', '.join(_GEMM_CODES)}")
    return bool(lib.gemm_path_supported(_GEMM_CODES[path]))


def gemm_cache_bytes(level: int) -> int:
    """The size (bytes, one core's) of the level-1 data cache (level 1) or the L2 (level 2) that the packed
    GEMM sizes its cache blocks for: the CPU's, read with cpuid (32 KiB and 1 MiB where cpuid does not list
    them), unless `set_gemm_cache_bytes` chose another."""
    return int(lib.gemm_cache_bytes(_integer(level, "gemm_cache_bytes: level", 1, 2)))


def gemm_block_k_bytes() -> int:
    """The bytes of k (4 per f32 value, 1 per int8) in each of the packed GEMM's cache blocks: 1024 where the
    L1d (`gemm_cache_bytes(1)`) holds a tile of weights that size in two thirds of itself, else 512."""
    return int(lib.gemm_kc_bytes())


def gemm_folds_broadcasts() -> bool:
    """Whether the packed GEMM's AVX-512 f32 tiles fold each pixel's broadcast into their FMAs (AMD Zen 4's
    form) rather than broadcast it into a register first (every other CPU's), unless
    `set_gemm_folds_broadcasts` chose. The two give the same bits; only their speed differs by CPU."""
    return bool(lib.gemm_folds_broadcasts())


def set_gemm_folds_broadcasts(folded: bool | None) -> None:
    """Runs the AVX-512 f32 tiles in the folded form (True), the register form (False) or the CPU's (None),
    for every model in this process: to measure or test both forms. Call it between computations."""
    if folded is not None and not isinstance(folded, (bool, np.bool_)):
        raise InputError(f"set_gemm_folds_broadcasts: folded must be True, False or None, got {folded!r}")
    lib.gemm_set_folds_broadcasts(-1 if folded is None else int(folded))


def set_gemm_cache_bytes(level: int, size: int | None) -> None:
    """Sizes the packed GEMM's blocks for a level-`level` cache of `size` bytes (None: the CPU's again), for
    every model in this process: to measure other blockings. Results do not change; only the order of the work
    does. Call it between computations, not while one runs."""
    level = _integer(level, "set_gemm_cache_bytes: level", 1, 2)
    lib.gemm_set_cache_bytes(level, 0 if size is None else _integer(size, "set_gemm_cache_bytes: size", 1, 2**40))


def _integer(value, what: str, lo: int, hi: int | None = None) -> int:
    """`value` as an int, if it is an integer (Python's or NumPy's, not a bool) in lo..hi; else InputError.
    The one check of every integer argument here."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (
            hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"from {lo} to {hi}"
        raise InputError(f"{what} must be an integer {bounds}, got {value!r}")
    return int(value)


# The packed GEMM's int8 paths (csrc/gemm.h's gemm_int8), widest first: the last runs on every CPU.
GEMM_INT8_PATHS = {"int8-avx512vnni": lib.GEMM_INT8_AVX512_VNNI, "int8-avxvnni": lib.GEMM_INT8_AVX_VNNI,
                   "int8-avx2": lib.GEMM_INT8_AVX2, "int8-scalar": lib.GEMM_INT8_SCALAR}


def gemm_int8_paths() -> tuple[str, ...]:
    """The int8 paths this CPU (and this build) can run, widest first; "int8-scalar" always."""
    return tuple(name for name, path in GEMM_INT8_PATHS.items() if lib.gemm_path_supported(path))


def _shape4(ne) -> tuple[int, int, int, int]:
    ne = tuple(int(n) for n in ne)
    if not 1 <= len(ne) <= 4:
        raise InputError(f"a tensor has 1 to 4 dimensions, got {len(ne)}")
    if any(n <= 0 for n in ne):
        raise InputError(f"every dimension must be positive, got {ne}")
    return ne + (1,) * (4 - len(ne))


def _set_name(ptr, name: str):
    lib.ggml_set_name(ptr, name.encode()[:63])  # ggml keeps 63 bytes of a name


def _alive(handle, what: str):
    if handle is None or handle == ffi.NULL:
        raise InputError(f"this {what} has been closed")
    return handle


class Tensor:
    """A ggml tensor; its memory belongs to the Weights or Graph that made it."""

    __slots__ = ("_ptr", "_owner")

    def __init__(self, ptr, owner):
        # ptr is never NULL: ggml aborts rather than return no tensor when its context is full, which is
        # why Weights sizes its context for its tensors and Graph._building refuses to outgrow its own.
        self._ptr = ptr
        self._owner = owner

    @property
    def _live(self):
        """The native tensor, or InputError once its Weights or Graph is closed (its memory is gone)."""
        if self._owner._ctx is None:
            raise InputError("this tensor's weights or graph has been closed")
        return self._ptr

    @property
    def ne(self) -> tuple[int, int, int, int]:
        return tuple(self._live.ne)

    @property
    def nb(self) -> tuple[int, int, int, int]:
        return tuple(self._live.nb)

    @property
    def type(self) -> Type:
        return Type(self._live.type)

    @property
    def nbytes(self) -> int:
        return lib.ggml_nbytes(self._live)

    @property
    def is_contiguous(self) -> bool:
        return bool(lib.ggml_is_contiguous(self._live))

    def __repr__(self):
        if self._owner._ctx is None:
            return "Tensor(<closed>)"
        return f"Tensor({self.type.name}, ne={self.ne})"


def _host_bytes(tensor: Tensor, array) -> np.ndarray:
    """Checks that `array` holds exactly this tensor's bytes, in NumPy's order (the reverse of ne)."""
    array = np.ascontiguousarray(array)
    want = tensor.type.dtype.host
    if array.dtype != want:
        raise InputError(f"a {tensor.type.name} tensor takes {np.dtype(want).name} data, got {array.dtype}")
    if array.nbytes != tensor.nbytes:
        raise InputError(f"{tensor!r} holds {tensor.nbytes} bytes, the array has {array.nbytes} "
                         f"(shape {array.shape})")
    if tensor.type in (Type.F32, Type.F16, Type.BF16):
        expected = tuple(reversed(tensor.ne))
        squeezed = tuple(n for n in array.shape if n != 1)
        if squeezed != tuple(n for n in expected if n != 1):
            raise InputError(f"{tensor!r} takes an array of shape {expected}, got {array.shape}")
    return array


def _free_natives(natives, free_second):
    """Finalizer of Weights and Graph: their context, and the buffer or allocator made after it (if any)."""
    ctx, second = natives
    if second != ffi.NULL:
        free_second(second)
    lib.ggml_free(ctx)


class _Closable:
    """`with` support for the native objects below and for model.Model: leaving the block calls close()."""

    def close(self):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Backend(_Closable):
    """ggml's CPU backend with its thread count, and a thread pool of its own whose threads sleep between
    computations (ggml's default pool is started for every computation, and its new threads spin while
    they wait for work, which a busy machine pays for).

    A computation either runs one graph on the backend's threads, which meet at a barrier after every op, or
    runs graphs side by side on its lanes (`lane`): single-thread backends, each graph on a thread of its own,
    with nothing to wait for but its own work (`compute`)."""

    def __init__(self, threads: int | None = None, adapt: bool = False):
        """threads: the pool's threads, the most a computation uses (default: `cpu.default_threads()`).
        adapt: computations run on fewer while they get less than all of their CPUs (other processes busy
        on them: `cpu.CpuShare`); else on all of them."""
        self._lock = threading.Lock()
        self._natives = [ffi.NULL, ffi.NULL]  # what the finalizer frees: the backend and its thread pool
        self._finalizer = weakref.finalize(self, _free_backend, self._natives)
        self._ptr = None
        self._adapt = bool(adapt)
        self._lanes: list[Backend] = []
        self._runners = None  # Python threads that compute lanes' graphs beside the caller's (`compute`)
        self._start(default_threads() if threads is None else threads)
        _BACKENDS.add(self)

    def _start(self, threads: int):
        ptr = lib.ggml_backend_cpu_init()
        if ptr == ffi.NULL:
            raise MemoryError("ggml could not start its CPU backend")
        self._ptr = self._natives[0] = ptr
        self._share = CpuShare() if self._adapt else None  # after a fork: the child's own share
        self.threads = threads

    @property
    def threads(self) -> int:
        return self._threads

    @threads.setter
    def threads(self, n: int):
        n = _integer(n, "threads", 1, MAX_THREADS)
        with self._lock:  # not while a computation runs on the current pool
            ptr = _alive(self._ptr, "backend")
            params = ffi.new("struct ggml_threadpool_params *", lib.ggml_threadpool_params_default(n))
            params.poll = 0  # between computations the threads sleep on a condition variable
            pool = lib.ggml_threadpool_new(params)
            lib.ggml_backend_cpu_set_n_threads(ptr, n)
            lib.ggml_backend_cpu_set_threadpool(ptr, pool)
            old, self._natives[1] = self._natives[1], pool
            if old != ffi.NULL:
                lib.ggml_threadpool_free(old)
            self._threads = self.last_threads = n  # last_threads: what the last computation ran on

    def lane(self, i: int) -> "Backend":
        """Lane i (0 <= i < threads): a single-thread backend of this one's, made on first use and closed with
        it, whose graphs `compute` runs beside the other lanes' (their memory is ggml's CPU memory, as this
        backend's: they read its weights)."""
        i = _integer(i, "lane", 0, self._threads - 1)
        with self._lock:
            _alive(self._ptr, "backend")
            while len(self._lanes) <= i:
                self._lanes.append(Backend(1))
            return self._lanes[i]

    def compute(self, graphs: "list[Graph]", prepare=None) -> None:
        """Computes graphs built on this backend or on its lanes: the lanes' graphs first, side by side (one per
        lane; each computation holds its own thread and releases Python's lock), then the others in turn on the
        backend's threads, or fewer while `adapt` finds the CPUs shared (lanes wait for nobody, so a lane on a
        shared CPU slows only its own share). prepare: None, or a callable (or None) per graph, called on the
        thread that computes the graph just before it does (to set its inputs: the lanes' side by side too);
        the first exception raised is raised once every lane is done."""
        prepare = [None] * len(graphs) if prepare is None else list(prepare)
        if len(prepare) != len(graphs):
            raise InputError(f"compute got {len(graphs)} graphs but {len(prepare)} prepare callables")
        lanes = [i for i, g in enumerate(graphs) if g._backend is not self]
        if any(graphs[i]._backend not in self._lanes for i in lanes):
            raise InputError("compute takes graphs of this backend and of its lanes")
        if len({id(graphs[i]._backend) for i in lanes}) != len(lanes):
            raise InputError("two graphs on one lane cannot compute side by side")
        for g in graphs:
            g._check_computable()
        threads = 1
        if len(lanes) < len(graphs):  # asked once per computation with graphs of its own: CpuShare's probes
            with self._lock:
                threads = self._share.threads(self._threads) if self._share is not None else self._threads

        def run(i: int, n: int) -> int:
            if prepare[i] is not None:
                prepare[i]()
            return graphs[i]._backend._run(graphs[i]._graph, n)

        cpu, wall = time.process_time(), time.perf_counter()
        statuses = []
        if lanes:
            if self._runners is None:
                self._runners = concurrent.futures.ThreadPoolExecutor(MAX_THREADS - 1, "pyggml-lane")
            beside = [self._runners.submit(run, i, 1) for i in lanes[1:]]
            try:
                statuses.append(run(lanes[0], 1))
            finally:  # the graphs are the caller's again only once every lane is done with its own
                concurrent.futures.wait(beside)
            statuses += [f.result() for f in beside]
        statuses += [run(i, threads) for i, g in enumerate(graphs) if g._backend is self]
        if self._share is not None:
            self._share.record(max(threads, len(lanes)), time.process_time() - cpu, time.perf_counter() - wall)
        for status in statuses:
            if status != lib.GGML_STATUS_SUCCESS:
                raise RuntimeError(f"ggml graph compute failed with status {status}")

    def _run(self, graph, n: int) -> int:
        """Runs a cgraph on this backend's pool, on n of its threads; ggml's status."""
        with self._lock:
            ptr = _alive(self._ptr, "backend")
            if n != self.last_threads:  # the pool keeps its threads; those beyond n sit this computation out
                lib.ggml_backend_cpu_set_n_threads(ptr, n)
                self.last_threads = n
            return lib.ggml_backend_graph_compute(ptr, graph)

    def _after_fork_in_child(self):
        # The pool's threads did not survive the fork, and freeing the pool would join them: leave the old
        # backend and pool to the parent, and start new ones. A lock held by a thread of the parent would
        # stay held here forever. The lanes are backends too (they restart themselves), the runners threads.
        self._lock = threading.Lock()
        self._runners = None
        if self._ptr is not None:
            self._natives[:] = [ffi.NULL, ffi.NULL]
            self._start(self._threads)

    def close(self):
        self._ptr = None
        for lane in self._lanes:
            lane.close()
        if self._runners is not None:
            self._runners.shutdown(wait=False)
        self._finalizer()


def _free_backend(natives):
    backend, pool = natives
    if backend != ffi.NULL:
        lib.ggml_backend_free(backend)
    if pool != ffi.NULL:
        lib.ggml_threadpool_free(pool)


_BACKENDS: "weakref.WeakSet[Backend]" = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: [b._after_fork_in_child() for b in list(_BACKENDS)])


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_POPULATE_WRITE = 23  # Linux's values; an unknown advice is refused (EINVAL), which costs nothing
# 2 MiB pages (where transparent huge pages are on, "madvise" mode included), asked for before a buffer is first
# written: every run streams all of the weights and activations through the TLB. ResNet-101 on Zen 4, one
# thread, two loads called in turn in one process: the weights' 1-2.6% faster (f32, int8), the compute
# buffer's another 1%.
_MADV_HUGEPAGE = 14


def _advise(buffer, advice: int) -> bool:
    """madvise over the whole pages of a backend buffer; False where the kernel refused or none lie in it."""
    base = int(ffi.cast("uintptr_t", lib.ggml_backend_buffer_get_base(buffer)))
    start = -(-base // _PAGE) * _PAGE
    end = (base + lib.ggml_backend_buffer_get_size(buffer)) // _PAGE * _PAGE
    return end > start and lib.madvise(ffi.cast("void *", start), end - start, advice) == 0


class Weights(_Closable):
    """Named constant tensors allocated together in one backend buffer."""

    def __init__(self, backend: Backend, specs: dict[str, tuple[Type | str, tuple[int, ...]]]):
        """`specs` maps each name to (type, ne); call `set` for every tensor before computing with it."""
        if not specs:
            raise InputError("Weights needs at least one tensor")
        checked = {}
        for name, (ttype, ne) in specs.items():
            ttype, ne = Type.parse(ttype), _shape4(ne)
            if ne[0] % ttype.block_size:
                raise InputError(f"{name}: ne[0]={ne[0]} is not a multiple of {ttype.name}'s block size "
                                 f"{ttype.block_size}")
            checked[name] = (ttype, ne)
        ctx = lib.ggml_init({"mem_size": lib.ggml_tensor_overhead() * len(checked) + 1024,
                             "mem_buffer": ffi.NULL, "no_alloc": True})
        if ctx == ffi.NULL:
            raise MemoryError("ggml_init failed")
        self._ctx = ctx
        self._natives = [ctx, ffi.NULL]  # what the finalizer frees: context and buffer
        self._finalizer = weakref.finalize(self, _free_natives, self._natives, lib.ggml_backend_buffer_free)
        self._tensors = {}
        for name, (ttype, ne) in checked.items():
            t = Tensor(lib.ggml_new_tensor_4d(ctx, ttype, *ne), self)
            _set_name(t._ptr, name)
            self._tensors[name] = t
        buffer = lib.ggml_backend_alloc_ctx_tensors(ctx, _alive(backend._ptr, "backend"))
        if buffer == ffi.NULL:
            self.close()
            raise MemoryError("could not allocate the weights' buffer")
        self._natives[1] = buffer

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no weight named {name!r}") from None

    @property
    def nbytes(self) -> int:
        return lib.ggml_backend_buffer_get_size(self._natives[1]) if self._ctx is not None else 0

    def set(self, name: str, array):
        t = self[name]
        array = _host_bytes(t, array)
        _alive(self._ctx, "weight set")
        lib.ggml_backend_tensor_set(t._ptr, ffi.from_buffer(array), 0, t.nbytes)

    def prefault(self) -> bool:
        """Maps the weights' memory in ahead of writing it (huge pages asked for first: `_MADV_HUGEPAGE`), in
        one kernel call (MADV_POPULATE_WRITE), rather than a page fault per 4 KiB as it is first written:
        ResNet-101's 178 MB of faults took ~110 ms of a ~200 ms cold load, this ~60 ms. Whether the kernel
        did: not before Linux 5.14, nor on other systems (the memory is then faulted in as it is written, as
        without this call), nor once closed."""
        buffer = self._natives[1]
        if self._ctx is None or buffer == ffi.NULL:
            return False
        _advise(buffer, _MADV_HUGEPAGE)
        return _advise(buffer, _MADV_POPULATE_WRITE)

    def fill(self, name: str, write) -> None:
        """Calls `write(a)` with `a` the f32 or bf16 tensor's own memory, as a flat NumPy array (float32, or
        uint16 holding bf16 bits), to fill in place: `set` copies from a host array, which a loader must first
        make (and the OS fault in). `a` is valid only during the call: it must not outlive it."""
        t = self[name]
        _alive(self._ctx, "weight fill")
        storage = {Type.F32: np.float32, Type.BF16: np.uint16}.get(t.type)
        if storage is None:
            raise InputError(f"fill: {t!r} is neither f32 nor bf16")
        write(np.frombuffer(ffi.buffer(t._ptr.data, t.nbytes), storage))

    def close(self):
        self._ctx = None
        self._tensors = {}
        self._finalizer()


class _State(enum.Enum):
    """A Graph's life: ops are added while BUILDING; FINALIZED allocates it for set/compute/get; CLOSED
    has freed it."""

    BUILDING = enum.auto()
    FINALIZED = enum.auto()
    CLOSED = enum.auto()


class Graph(_Closable):
    """Builds a compute graph from ggml operations, allocates it once, and computes it on demand.

    Build with the op methods, then `finalize(outputs)`; afterwards `set` inputs, `compute`, `get` results.
    """

    def __init__(self, backend: Backend, max_nodes: int = 2048):
        max_nodes = _integer(max_nodes, "max_nodes", 16)
        self._backend = backend
        self._max_nodes = max_nodes
        # Room for three tensors per node: every tensor made here is a node except the inputs (not counted
        # against max_nodes), so this is ample; `_building` refuses to grow past it.
        size = lib.ggml_tensor_overhead() * max_nodes * 3 + lib.ggml_graph_overhead_custom(max_nodes, False)
        ctx = lib.ggml_init({"mem_size": size, "mem_buffer": ffi.NULL, "no_alloc": True})
        if ctx == ffi.NULL:
            raise MemoryError("ggml_init failed")
        self._ctx = ctx
        self._n_tensors = 0
        self._graph = lib.ggml_new_graph_custom(ctx, max_nodes, False)
        self._natives = [ctx, ffi.NULL]  # what the finalizer frees: context and graph allocator
        self._finalizer = weakref.finalize(self, _free_natives, self._natives, lib.ggml_gallocr_free)
        self._inputs: list[Tensor] = []
        self._weights: set = set()  # the Weights whose tensors this graph reads
        self._state = _State.BUILDING

    # -- building ----------------------------------------------------------------------------------------

    def _new(self, ptr, node: bool = True) -> Tensor:
        self._n_tensors += 1
        t = Tensor(ptr, self)
        if node:
            # Appending each operation as it is built keeps the graph in construction order. Expanding only
            # the outputs at the end would order it depth-first, and schedule every weight-only operation
            # (a weight transform) first, keeping all of their results alive at once.
            if lib.ggml_graph_n_nodes(self._graph) + 1 >= self._max_nodes:
                raise InputError(f"graph needs more than max_nodes={self._max_nodes} nodes")
            lib.ggml_build_forward_expand(self._graph, ptr)
        return t

    def _building(self, *sources):
        """Checks the graph can grow and that every source tensor is usable; returns the context."""
        for t in sources:
            if not isinstance(t, Tensor):
                raise InputError(f"expected a Tensor, got {type(t).__name__}")
            if t._owner is not self:
                if not isinstance(t._owner, Weights) or t._owner._ctx is None:
                    raise InputError(f"{t!r} belongs to another graph or to closed weights")
                self._weights.add(t._owner)
        self._require(_State.BUILDING)
        # ggml would abort the process on a full context: refuse before that.
        if self._n_tensors + 4 > self._max_nodes * 3:
            raise InputError(f"graph too large for max_nodes={self._max_nodes}")
        return self._ctx

    @staticmethod
    def _need_f32(*tensors: Tensor, op: str):
        for t in tensors:
            if t.type != Type.F32:
                raise InputError(f"{op} takes f32 tensors, got {t!r}")

    @staticmethod
    def _need_contiguous(t: Tensor, op: str):
        if not t.is_contiguous:
            raise InputError(f"{op} needs a contiguous tensor: call cont() first ({t!r})")

    def input(self, name: str, ne, ttype: Type | str = Type.F32) -> Tensor:
        """A tensor whose data is given by `set` before each `compute`."""
        ctx = self._building()
        t = self._new(lib.ggml_new_tensor_4d(ctx, Type.parse(ttype), *_shape4(ne)), node=False)
        _set_name(t._ptr, name)
        lib.ggml_set_input(t._ptr)
        self._inputs.append(t)
        return t

    def _binary(self, fn, op, a: Tensor, b: Tensor) -> Tensor:
        ctx = self._building(a, b)
        self._need_f32(a, b, op=op)
        if any(x % y for x, y in zip(a.ne, b.ne)):
            raise InputError(f"{op}: cannot broadcast {b!r} onto {a!r}")
        return self._new(fn(ctx, a._ptr, b._ptr))

    def add(self, a: Tensor, b: Tensor, inplace: bool = False) -> Tensor:
        """a + b, with b broadcast (repeated) along any dimension that divides a's. `inplace` writes the
        result over a: only for an `a` that nothing else reads afterwards."""
        return self._binary(lib.ggml_add_inplace if inplace else lib.ggml_add, "add", a, b)

    def sub(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib.ggml_sub, "sub", a, b)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib.ggml_mul, "mul", a, b)

    def div(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib.ggml_div, "div", a, b)

    def _unary(self, fn, op, a: Tensor) -> Tensor:
        ctx = self._building(a)
        self._need_f32(a, op=op)
        self._need_contiguous(a, op)
        return self._new(fn(ctx, a._ptr))

    def relu(self, a: Tensor, inplace: bool = False) -> Tensor:
        """max(a, 0); `inplace` as for `add`."""
        return self._unary(lib.ggml_relu_inplace if inplace else lib.ggml_relu, "relu", a)

    def sqrt(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_sqrt, "sqrt", a)

    def softmax(self, a: Tensor) -> Tensor:
        """Softmax along ne[0]."""
        return self._unary(lib.ggml_soft_max, "softmax", a)

    def mean(self, a: Tensor) -> Tensor:
        """Mean along ne[0]: [n0, n1, n2, n3] -> [1, n1, n2, n3]."""
        return self._unary(lib.ggml_mean, "mean", a)

    def scale_bias(self, a: Tensor, scale: float, bias: float) -> Tensor:
        """a * scale + bias."""
        ctx = self._building(a)
        self._need_f32(a, op="scale_bias")
        self._need_contiguous(a, "scale_bias")
        return self._new(lib.ggml_scale_bias(ctx, a._ptr, float(scale), float(bias)))

    def mul_mat(self, w: Tensor, x: Tensor) -> Tensor:
        """w [K, M, ...] and x [K, N, ...] -> f32 [M, N, ...]: every column of x times every row of w.
        x is f32, or bf16 when w is (ggml would round an f32 x to bf16 for that product anyway)."""
        ctx = self._building(w, x)
        if not (x.type == Type.BF16 and w.type == Type.BF16):
            self._need_f32(x, op="mul_mat")
        if w.ne[0] != x.ne[0] or x.ne[2] % w.ne[2] or x.ne[3] % w.ne[3]:
            raise InputError(f"mul_mat: {w!r} and {x!r} do not fit (ne[0] must match)")
        if w.nb[0] > w.nb[1]:
            raise InputError(f"mul_mat: the first operand must not be transposed ({w!r})")
        return self._new(lib.ggml_mul_mat(ctx, w._ptr, x._ptr))

    def gemm(self, w: Tensor, x: Tensor, m: int, *, kernel: int = 1, stride: int = 1, padding: int = 0,
             bias: Tensor | None = None, residual: Tensor | None = None, relu: bool = False,
             path: str) -> Tensor:
        """A convolution of a channel-fastest f32 image x [C, W, H, N] (or bf16, for bf16 weights) by the
        packed weights w (`packing.pack_matrix` of an [m, K] matrix, K = kernel*kernel*C ordered (ky, kx, c) as
        `gather_patches` orders it; ggml [16, K, P, 1]) -> f32 [m, OW, OH, N], then + bias ([m]), + residual
        (shaped like the result), ReLU, fused into the product (csrc/gemm.h). With the defaults (kernel 1) it
        is x's rows times w: a Linear layer of x [K, N]. The pixels are read straight from x (a bf16 path
        rounds f32 ones as `gather_patches` does). Each output's summation order depends on K alone: results
        are bit-identical for any batch, thread count and f32 path. `path`: a path of `packing.GEMM_PATHS` for
        w's type that this CPU runs (`gemm_path_supported`)."""
        ctx = self._building(w, x, *(t for t in (bias, residual) if t is not None))
        code = self._gemm_code(w, path, "gemm")
        m = _integer(m, "gemm: m", 1)
        if not (x.type == Type.BF16 and w.type == Type.BF16):
            self._need_f32(x, op="gemm")
        self._need_f32(*(t for t in (bias, residual) if t is not None), op="gemm")
        for t in (w, x, bias, residual):
            if t is not None:
                self._need_contiguous(t, "gemm")
        kernel, stride, padding = self._check_window(x.ne[1], x.ne[2], kernel, stride, padding, "gemm")
        panels, k, _ = packed_shape(m, kernel * kernel * x.ne[0], w.type)
        if w.ne != (PANEL, k, panels, 1):
            raise InputError(f"gemm: {w!r} is not packed weights for m={m} and K={k} (want ne {(PANEL, k, panels, 1)})")
        out_w, out_h = ((n + 2 * padding - kernel) // stride + 1 for n in x.ne[1:3])
        self._check_epilogue("gemm", (m, out_w, out_h, x.ne[3]), bias, residual)
        return self._new(lib.gemm_packed(ctx, w._ptr, x._ptr, m, kernel, stride, padding,
                                         bias._ptr if bias is not None else ffi.NULL,
                                         residual._ptr if residual is not None else ffi.NULL, bool(relu),
                                         code))

    def gemm_winograd(self, w: Tensor, v: Tensor, m: int, *, like: Tensor, bias: Tensor | None = None,
                      residual: Tensor | None = None, relu: bool = False, path: str) -> Tensor:
        """A 3x3 stride-1 padding-1 convolution of `like` [C, W, H, N] by Winograd F(2x2,3x3) in the packed GEMM
        (csrc/gemm.h): v [C, T, 16, 1] is `winograd_input(like)`, w the packed f32 3x3 weights `gemm` takes
        (K = 9 C) -> [m, W, H, N], then + bias ([m]), + residual (shaped like the result), ReLU: what
        `winograd_output` makes of the 16 products, which each thread transforms as it finishes them. The
        weights are transformed as the product needs them, so nothing else is stored. `path`: an f32 path, as
        for `gemm`."""
        extra = tuple(t for t in (bias, residual) if t is not None)
        ctx = self._building(w, v, like, *extra)
        code = self._gemm_code(w, path, "gemm_winograd")
        self._need_f32(w, op="gemm_winograd")
        m = _integer(m, "gemm_winograd: m", 1)
        self._need_f32(v, like, *extra, op="gemm_winograd")
        for t in (w, v, *extra):
            self._need_contiguous(t, "gemm_winograd")
        channels, width, height, n = like.ne
        tiles = self._winograd_tiles(like)
        if v.ne != (channels, tiles, 16, 1):
            raise InputError(f"gemm_winograd: v {v!r} must be [{channels}, {tiles}, 16, 1], "
                             f"winograd_input of {like!r}")
        panels, k, _ = packed_shape(m, 9 * channels)
        if w.ne != (PANEL, k, panels, 1):
            raise InputError(f"gemm_winograd: {w!r} is not packed 3x3 weights for m={m} and {channels} channels "
                             f"(want ne {(PANEL, k, panels, 1)})")
        self._check_epilogue("gemm_winograd", (m, width, height, n), bias, residual)
        return self._new(lib.gemm_winograd(ctx, w._ptr, v._ptr, like._ptr, m,
                                           bias._ptr if bias is not None else ffi.NULL,
                                           residual._ptr if residual is not None else ffi.NULL, bool(relu), code))

    def gemm_int8(self, w: Tensor, x: Tensor, m: int, *, scales: Tensor, colsums: Tensor, x_scale: float,
                  x_zero: int, kernel: int = 1, stride: int = 1, padding: int = 0, bias: Tensor | None = None,
                  residual: Tensor | None = None, residual_scale: float | None = None, residual_zero: int = 0,
                  relu: bool = False, y_scale: float | None = None, y_zero: int = 0,
                  path: str | None = None) -> Tensor:
        """`gemm` with int8 weights (csrc/gemm.h's gemm_int8): the image x [C, W, H, N] (f32) quantized to u8 as
        its windows are packed, q = clamp(rint(x / x_scale) + x_zero, 0, 255) (x_zero 0..255; the padding is
        the value 0.0), times the s8 weights w (`int8.Int8Matrix.packed` of an [m, K] matrix as `int8.words`:
        f32 [16, K4/4, P, 1]), summed exactly in int32 over all of K, then (float) (sum - x_zero * colsums) *
        (x_scale * scales) + bias in one rounding (a fused multiply-add), + residual, ReLU -> f32
        [m, OW, OH, N]. scales: f32 [m], the weights' per channel scales; colsums: [m] (the int32 column sums
        as `int8.words`). With `y_scale` the result is quantized in turn, as the next gemm_int8 with
        x_scale=y_scale and x_zero=y_zero would quantize it, and returned as those u8 bytes (an I8 tensor):
        that op takes it as its x, and gives the same result as from the f32 one. The residual may be such u8
        bytes too, with `residual_scale` and `residual_zero` (how they were quantized): (float)
        (r - residual_zero) times residual_scale is added in one rounding (a fused multiply-add). Bit-identical
        for any path, batch and thread count. `path`: one of `gemm_int8_paths()` (default: the first)."""
        operands = tuple(t for t in (bias, residual) if t is not None)
        ctx = self._building(w, x, scales, colsums, *operands)
        code = self._int8_code(path, "gemm_int8")
        m = _integer(m, "gemm_int8: m", 1)
        u8_residual = residual is not None and residual.type == Type.I8
        self._need_f32(w, scales, colsums, *(t for t in operands if not u8_residual or t is not residual),
                       op="gemm_int8")
        if x.type not in (Type.F32, Type.I8):
            raise InputError(f"gemm_int8 takes an f32 image or its u8 bytes (I8), got {x!r}")
        if u8_residual != (residual_scale is not None):
            raise InputError("gemm_int8: a u8 (I8) residual needs residual_scale, and only it takes one")
        for t in (w, x, scales, colsums, *operands):
            self._need_contiguous(t, "gemm_int8")
        kernel, stride, padding = self._check_window(x.ne[1], x.ne[2], kernel, stride, padding, "gemm_int8")
        k = kernel * kernel * x.ne[0]
        if k > lib.GEMM_INT8_K_MAX:
            raise InputError(f"gemm_int8: K = {k} is above {lib.GEMM_INT8_K_MAX}, where int32 sums could overflow")
        panels, groups, _, _ = int8.packed_shape(m, k)
        if w.ne != (int8.PANEL, groups, panels, 1):
            raise InputError(f"gemm_int8: {w!r} is not packed int8 weights for m={m} and K={k} "
                             f"(want ne {(int8.PANEL, groups, panels, 1)})")
        for name, t in (("scales", scales), ("colsums", colsums)):
            if t.ne != (m, 1, 1, 1):
                raise InputError(f"gemm_int8: {name} {t!r} must be [{m}]")
        x_scale = self._x_scale(x_scale)
        x_zero = _integer(x_zero, "gemm_int8: x_zero", 0, 255)
        y_scale = 0.0 if y_scale is None else self._x_scale(y_scale)  # 0: an f32 result
        y_zero = _integer(y_zero, "gemm_int8: y_zero", 0, 255)
        r_scale = 0.0 if residual_scale is None else self._x_scale(residual_scale)  # 0: an f32 residual
        r_zero = _integer(residual_zero, "gemm_int8: residual_zero", 0, 255)
        out_w, out_h = ((n + 2 * padding - kernel) // stride + 1 for n in x.ne[1:3])
        self._check_epilogue("gemm_int8", (m, out_w, out_h, x.ne[3]), bias, residual)
        return self._new(lib.gemm_int8(ctx, w._ptr, x._ptr, m, kernel, stride, padding, scales._ptr, colsums._ptr,
                                       x_scale, x_zero, bias._ptr if bias is not None else ffi.NULL,
                                       residual._ptr if residual is not None else ffi.NULL, r_scale, r_zero,
                                       bool(relu), y_scale, y_zero, code))

    def quantize_u8(self, x: Tensor, x_scale: float, x_zero: int, path: str | None = None) -> Tensor:
        """The contiguous f32 tensor x quantized to u8 bytes (an I8 tensor of x's shape) exactly as
        `gemm_int8` with this x_scale, x_zero and int8 path quantizes the windows it packs (csrc/quantize.h):
        a gemm_int8 reading these bytes gives the result it gives on x, and quantizes nothing. For an input
        that many windows read (a 7x7/2 conv's), once instead of once per window."""
        ctx = self._building(x)
        code = self._int8_code(path, "quantize_u8")
        self._need_f32(x, op="quantize_u8")
        self._need_contiguous(x, "quantize_u8")
        x_scale = self._x_scale(x_scale, "quantize_u8")
        x_zero = _integer(x_zero, "quantize_u8: x_zero", 0, 255)
        return self._new(lib.quantize_u8(ctx, x._ptr, x_scale, x_zero, code))

    @staticmethod
    def _int8_code(path: str | None, op: str) -> int:
        """csrc/gemm.h's number of the int8 `path` (None: the first of `gemm_int8_paths()`), checked to run here."""
        paths = gemm_int8_paths()
        path = paths[0] if path is None else path
        if path not in paths:
            raise InputError(f"{op}: path {path!r} cannot run here; this CPU runs {paths}")
        return GEMM_INT8_PATHS[path]

    @staticmethod
    def _x_scale(value, op: str = "gemm_int8") -> float:
        """An activation scale as the float32 the op takes: positive, finite and normal (so 1 / it is finite)."""
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InputError(f"{op}: a scale must be a number, got {value!r}")
        with np.errstate(over="ignore"):
            f = np.float32(value)
        if not (np.isfinite(f) and f >= np.finfo(np.float32).tiny):
            raise InputError(f"{op}: a scale must be a positive normal float32, got {value!r}")
        return float(f)

    @staticmethod
    def _check_epilogue(op: str, out_ne: tuple[int, ...], bias: Tensor | None, residual: Tensor | None) -> None:
        """A fused epilogue's operands fit a result of ne `out_ne`: bias [out_ne[0]], residual out_ne."""
        if bias is not None and bias.ne != (out_ne[0], 1, 1, 1):
            raise InputError(f"{op}: bias {bias!r} must be [{out_ne[0]}]")
        if residual is not None and residual.ne != out_ne:
            raise InputError(f"{op}: residual {residual!r} must have ne {out_ne}")

    @staticmethod
    def _gemm_code(w: Tensor, path: str, op: str) -> int:
        """csrc/gemm.h's number of `path`, checked to be a path for w's type that this CPU runs."""
        if (not isinstance(path, str) or path not in GEMM_PATHS or Type.parse(GEMM_PATHS[path]) != w.type
                or not gemm_path_supported(path)):
            raise InputError(f"{op}: path {path!r} cannot run {w!r} on this CPU")
        return _GEMM_CODES[path]

    def cont(self, a: Tensor) -> Tensor:
        """A contiguous copy of a (possibly strided) view."""
        ctx = self._building(a)
        return self._new(lib.ggml_cont(ctx, a._ptr))

    def permute(self, a: Tensor, axes) -> Tensor:
        """A view in which a's dimension i becomes dimension axes[i] (ggml_permute's convention)."""
        ctx = self._building(a)
        axes = tuple(int(i) for i in axes)
        if sorted(axes) != [0, 1, 2, 3]:
            raise InputError(f"permute takes a permutation of (0, 1, 2, 3), got {axes}")
        return self._new(lib.ggml_permute(ctx, a._ptr, *axes))

    def reshape(self, a: Tensor, ne) -> Tensor:
        ctx = self._building(a)
        ne = _shape4(ne)
        self._need_contiguous(a, "reshape")
        if np.prod(ne) != np.prod(a.ne):
            raise InputError(f"reshape: {a!r} has {np.prod(a.ne)} elements, {ne} has {np.prod(ne)}")
        return self._new(lib.ggml_reshape_4d(ctx, a._ptr, *ne))

    def batch_slice(self, a: Tensor, index: int) -> Tensor:
        """A view of item `index` along the last dimension (the batch) of a contiguous tensor: [ne0, ne1, ne2, 1],
        itself contiguous."""
        ctx = self._building(a)
        self._need_contiguous(a, "batch_slice")
        index = _integer(index, "batch_slice: index", 0, a.ne[3] - 1)
        ne0, ne1, ne2, _ = a.ne
        _, nb1, nb2, nb3 = a.nb
        return self._new(lib.ggml_view_4d(ctx, a._ptr, ne0, ne1, ne2, 1, nb1, nb2, nb3, index * nb3))

    def stack_batch(self, tensors) -> Tensor:
        """Contiguous tensors of one type (f32, or I8: int8's u8 bytes) and equal ne0..ne2 stacked along the last
        dimension (the batch), in order, in one copy (csrc/stack.c; more than the 9 sources a ggml custom op
        takes need a second copy)."""
        tensors = list(tensors)
        ctx = self._building(*tensors)
        if not tensors:
            raise InputError("stack_batch needs at least one tensor")
        if tensors[0].type not in (Type.F32, Type.I8):
            raise InputError(f"stack_batch takes f32 or I8 tensors, got {tensors[0]!r}")
        for t in tensors:
            self._need_contiguous(t, "stack_batch")
            if t.ne[:3] != tensors[0].ne[:3] or t.type != tensors[0].type:
                raise InputError(f"stack_batch: {t!r} does not match {tensors[0]!r} in type and ne0..ne2")
        if len(tensors) > _MAX_SRC:
            return self.stack_batch([self.stack_batch(tensors[i:i + _MAX_SRC]) for i in range(0, len(tensors), _MAX_SRC)])
        return self._new(lib.stack_batch(ctx, ffi.new("struct ggml_tensor *[]", [t._ptr for t in tensors]), len(tensors)))

    def max_pool(self, x: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
        """Max pooling of a channel-fastest [C, W, H, N] f32 tensor, or I8 holding u8 bytes (compared unsigned),
        -> [C, OW, OH, N] of its type (csrc/pool.c): padded cells are ignored and a NaN in a window wins, as in
        PyTorch."""
        ctx = self._building(x)
        if x.type not in (Type.F32, Type.I8):
            raise InputError(f"max_pool takes f32 or I8 (u8) tensors, got {x!r}")
        self._need_contiguous(x, "max_pool")
        kernel, stride, padding = self._check_window(x.ne[1], x.ne[2], kernel, stride, padding, "max_pool")
        if 2 * padding > kernel:
            raise InputError(f"max_pool: padding {padding} is more than half the kernel {kernel}")
        return self._new(lib.max_pool(ctx, x._ptr, kernel, stride, padding))

    def mean_pool(self, x: Tensor) -> Tensor:
        """Each channel's mean over the pixels of a channel-fastest [C, W, H, N] f32 tensor -> [C, N]
        (csrc/pool.c; summed in double, rounded once)."""
        ctx = self._building(x)
        self._need_f32(x, op="mean_pool")
        self._need_contiguous(x, "mean_pool")
        return self._new(lib.mean_pool(ctx, x._ptr))

    def gather_patches(self, x: Tensor, kernel: int, stride: int, padding: int, k_pad: int = 0,
                       ttype: Type | str = Type.F32, groups: int = 1) -> Tensor:
        """Patches of a channel-fastest [C, W, H, N] f32 tensor, K = kernel*kernel*C/groups values each, ordered
        (ky, kx, c) with c fastest and zero-padded to k_pad when k_pad > K (csrc/patches.c): [K, OW, OH, N] for
        one group; for more, [K, OW*OH*N, groups, 1], group g's patches over its own C/groups channels.
        ttype F32 copies; BF16 rounds as ggml does for a bf16 matmul's input (to nearest even)."""
        ctx = self._building(x)
        ttype = Type.parse(ttype)
        if ttype not in (Type.F32, Type.BF16):
            raise InputError(f"gather_patches: ttype must be F32 or BF16, got {ttype.name}")
        self._need_f32(x, op="gather_patches")
        self._need_contiguous(x, "gather_patches")
        kernel, stride, padding = self._check_window(x.ne[1], x.ne[2], kernel, stride, padding, "gather_patches")
        groups = _integer(groups, "gather_patches: groups", 1, 2**31 - 1)
        if x.ne[0] % groups:
            raise InputError(f"gather_patches: groups must divide the {x.ne[0]} channels, got {groups}")
        k = kernel * kernel * (x.ne[0] // groups)
        k_pad = _integer(k_pad, "gather_patches: k_pad", 0)
        return self._new(lib.gather_patches(ctx, x._ptr, kernel, kernel, stride, padding, groups, max(k, k_pad),
                                            ttype))

    def winograd_input(self, x: Tensor) -> Tensor:
        """Winograd F(2x2,3x3) input transform of a channel-fastest [C, W, H, N] f32 tensor, padding 1:
        [C, T, 16, 1] for T = N*ceil(H/2)*ceil(W/2) tiles (csrc/winograd.c)."""
        ctx = self._building(x)
        self._need_f32(x, op="winograd_input")
        self._need_contiguous(x, "winograd_input")
        return self._new(lib.winograd_input(ctx, x._ptr))

    def winograd_output(self, m: Tensor, like: Tensor, *, bias: Tensor | None = None,
                        residual: Tensor | None = None, relu: bool = False) -> Tensor:
        """Winograd F(2x2,3x3) output transform: m [OC, T, 16, 1] (for winograd_input(like)) -> [OC, W, H, N],
        then + bias ([OC]), + residual (shaped like the result), ReLU, as each output is written."""
        extra = tuple(t for t in (bias, residual) if t is not None)
        ctx = self._building(m, like, *extra)
        self._need_f32(m, like, *extra, op="winograd_output")
        for t in (m, *extra):
            self._need_contiguous(t, "winograd_output")
        _, width, height, n = like.ne
        tiles = self._winograd_tiles(like)
        if m.ne[1:] != (tiles, 16, 1):
            raise InputError(f"winograd_output: {m!r} must be [OC, {tiles}, 16, 1] for {like!r}")
        self._check_epilogue("winograd_output", (m.ne[0], width, height, n), bias, residual)
        return self._new(lib.winograd_output(ctx, m._ptr, like._ptr, bias._ptr if bias is not None else ffi.NULL,
                                             residual._ptr if residual is not None else ffi.NULL, bool(relu)))

    @staticmethod
    def _winograd_tiles(x: Tensor) -> int:
        """The 2x2 output tiles of a padding-1 3x3 convolution of x [C, W, H, N]: winograd_input's T."""
        _, width, height, n = x.ne
        return n * ((height + 1) // 2) * ((width + 1) // 2)

    @staticmethod
    def _check_window(w, h, kernel, stride, padding, op) -> tuple[int, int, int]:
        """(kernel, stride, padding) as ints, checked to be integers that fit a w x h input and the ops' parameter
        fields (MAX_WINDOW)."""
        kernel = _integer(kernel, f"{op}: kernel", 1, MAX_WINDOW)
        stride = _integer(stride, f"{op}: stride", 1, MAX_WINDOW)
        padding = _integer(padding, f"{op}: padding", 0, MAX_WINDOW)
        if w + 2 * padding < kernel or h + 2 * padding < kernel:
            raise InputError(f"{op}: a {kernel}x{kernel} window with padding {padding} does not fit a {w}x{h} input")
        return kernel, stride, padding

    def batch_repeat(self, v: Tensor, like: Tensor, channel_dim: int) -> Tensor:
        """The per-channel vector v ([C]) expanded to like's shape along its dimension channel_dim
        (csrc/batch_repeat.c): what lets BatchNorm be plain element-wise sub/div/mul/add."""
        ctx = self._building(v, like)
        self._need_f32(v, like, op="batch_repeat")
        self._need_contiguous(v, "batch_repeat")
        channel_dim = _integer(channel_dim, "batch_repeat: channel_dim", 0, 3)
        if v.ne[1:] != (1, 1, 1) or v.ne[0] != like.ne[channel_dim]:
            raise InputError(f"batch_repeat: {v!r} must be [{like.ne[channel_dim]}] to match dimension "
                             f"{channel_dim} of {like!r}")
        return self._new(lib.batch_repeat(ctx, v._ptr, like._ptr, channel_dim))

    # -- running -------------------------------------------------------------------------------------------

    def finalize(self, *outputs: Tensor) -> "Graph":
        """Adds `outputs` and everything they depend on to the graph and allocates its memory once (huge
        pages asked for, see `_MADV_HUGEPAGE`)."""
        self._building()
        if not outputs:
            raise InputError("finalize needs at least one output tensor")
        for t in outputs:
            if t._owner is not self:
                raise InputError(f"{t!r} does not belong to this graph")
            # The allocator may reuse a view's memory unless the tensor that owns the memory is an output too.
            ptr = t._ptr
            while ptr != ffi.NULL:
                lib.ggml_set_output(ptr)
                ptr = ptr.view_src
            lib.ggml_build_forward_expand(self._graph, t._ptr)  # already there unless it is an input
        galloc = lib.ggml_gallocr_new(lib.ggml_backend_get_default_buffer_type(self._backend._ptr))
        self._natives[1] = galloc
        if not lib.ggml_gallocr_alloc_graph(galloc, self._graph):
            raise MemoryError("could not allocate the graph's compute buffer")
        for i in range(lib.ggml_graph_n_nodes(self._graph)):
            node = lib.ggml_graph_node(self._graph, i)
            if node.view_src == ffi.NULL and node.buffer != ffi.NULL:  # not a view: in the graph's own buffer
                _advise(node.buffer, _MADV_HUGEPAGE)
                break
        self._state = _State.FINALIZED
        return self

    def _require(self, state: "_State") -> None:
        """The one check of the graph's state: InputError unless it is `state`."""
        if self._state is state:
            return
        if self._state is _State.CLOSED:
            raise InputError("this graph has been closed")
        if state is _State.BUILDING:
            raise InputError("this graph is finalized: build a new one to add operations")
        raise InputError("call finalize() before computing")

    def set(self, tensor: Tensor, array):
        self._require(_State.FINALIZED)
        if tensor._owner is not self or tensor not in self._inputs:
            raise InputError(f"{tensor!r} is not an input of this graph")
        array = _host_bytes(tensor, array)
        lib.ggml_backend_tensor_set(tensor._ptr, ffi.from_buffer(array), 0, tensor.nbytes)

    def compute(self):
        """Runs the graph. Inputs must be set again before each call: ggml reuses their memory."""
        self._backend.compute([self])

    def _check_computable(self):
        self._require(_State.FINALIZED)
        if any(w._ctx is None for w in self._weights):
            raise InputError("the weights this graph reads have been closed")

    def get(self, tensor: Tensor) -> np.ndarray:
        """A fresh NumPy array (shape: reversed ne) holding the f32 tensor's current data (an I8 tensor's bytes
        as int8)."""
        self._require(_State.FINALIZED)
        if tensor._owner is not self:
            raise InputError(f"{tensor!r} does not belong to this graph")
        if tensor.type not in (Type.F32, Type.I8):
            raise InputError(f"get takes f32 or I8 tensors, got {tensor!r}")
        self._need_contiguous(tensor, "get")
        out = np.empty(tuple(reversed(tensor.ne)), dtype=tensor.type.dtype.host)
        lib.ggml_backend_tensor_get(tensor._ptr, ffi.from_buffer(out, require_writable=True), 0, tensor.nbytes)
        return out

    def close(self):
        self._state = _State.CLOSED
        self._ctx = None
        self._inputs = []
        self._weights = set()
        self._finalizer()
