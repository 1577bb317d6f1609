"""The user-facing model: load a GGUF file once, then classify images or compute logits and features."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import arch, loader, resnet
from .errors import InputError
from .ggml import Backend, Graph, Type, _Closable
from .plan import check_gemm, plan_model

MAX_BATCH = 16  # larger inputs run in chunks of this many images, reusing one graph
MAX_SIDE = 4096  # larger images would need more than 4 GiB of activations
# A graph's compute buffer takes ~248 bytes per input pixel (any depth), so a chunk holds at most this many
# pixels (~190 MiB): 16 images of 224x224, 4 of 448x448, one of anything larger.
MAX_CHUNK_PIXELS = MAX_BATCH * 224 * 224
# Compiled graphs are kept for this many input shapes in use per model: a shape's graphs are one per lane and
# one on every thread (`lanes`), so a model keeps up to _GRAPH_CACHE * (threads + 1) of them.
_GRAPH_CACHE = 4
OUTPUTS = ("features", "logits", "probs")  # what a forward pass gives (`Model.outputs`)


@dataclass(frozen=True)
class Prediction:
    """One class of a classification result."""

    label: str
    index: int
    prob: float


def top_predictions(probs: np.ndarray, k: int, labels) -> list[Prediction]:
    """The k most probable classes of one probability vector, most probable first (ties: lower index first)."""
    return [Prediction(labels[i], int(i), float(probs[i])) for i in np.argsort(-probs, kind="stable")[:k]]


def _check_int8(model_file: loader.ModelFile, dtype, batchnorm: str, winograd) -> bool:
    """Whether the file is int8, once its load options are checked: an int8 file runs int8 only, with its
    BatchNorm folded (as it was at conversion) and no Winograd; int8 needs an int8 file (calibrated)."""
    if model_file.input_quants is None:
        if dtype == "int8":
            raise InputError(f"{model_file.path} is a {model_file.dtype} file: int8 needs calibrated activation "
                             "ranges, so convert the checkpoint with `python -m pyggml_resnet.convert CKPT OUT.gguf "
                             "--dtype int8 --calibration IMAGES` and load that file")
        return False
    if dtype not in (None, "int8"):
        raise InputError(f"{model_file.path} is an int8 file: load it with dtype None or 'int8', or load a float "
                         f"file for {dtype!r}")
    if batchnorm != "folded":
        raise InputError(f"{model_file.path} is an int8 file, whose BatchNorm was folded into its weights at "
                         "conversion: load it with batchnorm='folded', or a float file for batchnorm='explicit'")
    if winograd:
        raise InputError("int8 convolutions run as direct products: load an int8 file with winograd None or False")
    return True


class Model(_Closable):
    """A ResNet held in ggml memory. Use `pyggml_resnet.load` to make one.

    Calls are thread-safe: they are serialised by a lock, since each computation already uses every
    thread given to it, and the cached graphs (and ggml's CPU backend) hold per-call state that two
    computations must not share. `close()` (or leaving a `with` block) frees the native memory; later
    calls raise InputError. A model that is garbage-collected without `close()` is freed as well.
    """

    def __init__(self, model_file: loader.ModelFile, *, threads: int | None = None,
                 batchnorm: str = "folded", dtype: str | None = None, winograd: bool | None = None,
                 gemm: str | None = None, adapt_threads: bool = True):
        resnet.check_batchnorm(batchnorm)
        # The path of a load, top-down: the file (read), the plan, the weights arranged by the plan, and (per
        # input shape, in `_graph`) the graph built by the plan.
        int8 = _check_int8(model_file, dtype, batchnorm, winograd)
        self._plan = plan_model(model_file.config, model_file.num_classes,
                                dtype=Type.F32 if int8 else Type.parse(dtype or model_file.dtype), gemm=gemm,
                                winograd=winograd, batchnorm=batchnorm, input_quants=model_file.input_quants,
                                shortcut_quants=model_file.shortcut_quants)
        self.dtype = "int8" if int8 else self._plan.weight_type.name.lower()
        # What the products multiply: the dtype, or "f32" for f16 and bf16 weights widened at load (plan.py).
        self.compute_dtype = "int8" if int8 else self._plan.compute_type.name.lower()
        self.gemm = self._plan.gemm  # what runs the matrix products: a packed GEMM path, or ggml's mul_mat
        self.config = model_file.config
        self.num_classes = model_file.num_classes
        self.labels = model_file.labels
        self.preprocessing = model_file.preprocessing
        self.weights_name = model_file.weights_name
        self.batchnorm = batchnorm
        self.path = model_file.path
        self._eps = model_file.eps
        self._lock = threading.RLock()
        self._graphs: OrderedDict[tuple, tuple[Graph, dict]] = OrderedDict()
        self._backend = Backend(threads, adapt=adapt_threads)
        try:
            self._weights = resnet.upload_weights(self._backend, model_file, self._plan)
        except BaseException:
            self._backend.close()
            raise

    def __reduce_ex__(self, protocol):
        # pickle, copy and Ray's cloudpickle all come here; without this they fail on the lock, obscurely.
        raise TypeError(f"a pyggml_resnet Model cannot be pickled or copied: its weights live in native "
                        f"memory. Pass the model's path ({self.path}) or registry name instead and load it "
                        f"where it is used (pyggml_resnet.ray.Predictor loads one per Ray actor)")

    def __repr__(self):
        backend = self._backend
        state = "closed" if backend is None else f"threads={backend.threads}"
        widened = f" (computed as {self.compute_dtype})" if self.compute_dtype != self.dtype else ""
        return (f"<Model {self.config.name} {self.dtype}{widened} batchnorm={self.batchnorm} gemm={self.gemm} "
                f"classes={self.num_classes} {state}>")

    @property
    def closed(self) -> bool:
        return self._backend is None

    def _open_backend(self) -> Backend:
        backend = self._backend
        if backend is None:
            raise InputError("this model has been closed")
        return backend

    @property
    def threads(self) -> int:
        return self._open_backend().threads

    @threads.setter
    def threads(self, n: int):
        with self._lock:
            self._open_backend().threads = n

    @property
    def weights_bytes(self) -> int:
        """Native memory held by the model's weights (compute buffers come on top, per input shape)."""
        self._open_backend()
        return self._weights.nbytes

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    # -- inference ---------------------------------------------------------------------------------------

    def logits(self, x) -> np.ndarray:
        """Float32 NCHW images, already preprocessed (`preprocess`) -> (N, num_classes) float32 logits."""
        return self._run(x, ("logits",))["logits"]

    def features(self, x) -> np.ndarray:
        """Float32 NCHW images -> (N, feature_dim) pooled embeddings: the input of the final fc layer."""
        return self._run(x, ("features",))["features"]

    def probabilities(self, x) -> np.ndarray:
        """Float32 NCHW images -> (N, num_classes) softmax probabilities."""
        return self._run(x, ("probs",))["probs"]

    def outputs(self, x, names) -> dict[str, np.ndarray]:
        """Several of "features", "logits" and "probs" from one forward pass (a server answering requests
        that ask for different ones), each the array its own method gives."""
        names = tuple(names)
        if not names or not set(names) <= set(OUTPUTS):
            raise InputError(f"outputs must name some of {', '.join(OUTPUTS)}, got {names!r}")
        return self._run(x, names)

    def stages(self, x) -> dict[str, np.ndarray]:
        """Every stage's output for NCHW images, as NCHW arrays: "stem" (after the max pool),
        "layer1".."layer4", then "features" and "logits". For debugging and layer-by-layer checks.
        The whole batch runs as one graph, so it may hold at most MAX_SIDE**2 pixels in all."""
        x = self._check_input(x)
        n, _, h, w = x.shape
        if n * h * w > MAX_SIDE * MAX_SIDE:
            raise InputError(f"stages runs a batch as one graph: at most {MAX_SIDE * MAX_SIDE} pixels in all, "
                             f"got {n} images of {h}x{w}")
        if n == 0:
            return self._empty_stages(h, w)
        with self._lock:
            self._open_backend()
            graph, out = self._graph(x.shape, stages=True)
            graph.set(out["image"], self._chunk(x, 0, n))
            graph.compute()
            result = {}
            for name in resnet.STAGES:
                result[name] = graph.get(out[name]).transpose(0, 3, 1, 2)  # NHWC -> NCHW
            for name in ("features", "logits"):
                result[name] = graph.get(out[name]).reshape(n, -1)
        return result

    def calibration_taps(self, x) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """What int8 calibration measures (convert/calibrate.py), for one preprocessed NCHW image (1, 3, H, W):
        the input of every ungrouped convolution (convs that read one tensor get one array) and the output of
        every downsample, each NHWC float32 by weight name."""
        x = self._check_input(x)
        if len(x) != 1:
            raise InputError(f"calibration_taps takes one image, got {len(x)}")
        with self._lock:
            graph = Graph(self._open_backend(), max_nodes=resnet.max_nodes(self.config, 1))
            try:
                inputs: dict = {}
                shortcuts: dict = {}
                out = resnet.build(graph, self._weights, self.config, self._eps, self._plan, 1, *x.shape[2:],
                                   taps=inputs, shortcuts=shortcuts)
                # A block's input feeds two convs: one graph output, one array.
                distinct = {id(t): t for t in (*inputs.values(), *shortcuts.values())}
                graph.finalize(out["logits"], *distinct.values())
                graph.set(out["image"], self._chunk(x, 0, 1))
                graph.compute()
                got = {key: graph.get(t) for key, t in distinct.items()}
                return ({name: got[id(t)] for name, t in inputs.items()},
                        {name: got[id(t)] for name, t in shortcuts.items()})
            finally:
                graph.close()

    def _empty_stages(self, h: int, w: int) -> dict[str, np.ndarray]:
        """What `stages` gives for an empty batch: each stage's (0, C, H, W), as PyTorch's shapes."""
        def down(n):  # a 3x3/2 pool or conv with padding 1, and the 7x7/2 stem with padding 3: ceil(n / 2)
            return (n - 1) // 2 + 1
        h, w = down(down(h)), down(down(w))  # stem conv, max pool
        result = {"stem": np.zeros((0, arch.STEM.out_ch, h, w), np.float32)}
        for block in arch.block_names(self.config):
            if block.stride > 1:
                h, w = down(h), down(w)
            result[f"layer{block.stage}"] = np.zeros((0, block.out_ch, h, w), np.float32)
        result["features"] = np.zeros((0, self.feature_dim), np.float32)
        result["logits"] = np.zeros((0, self.num_classes), np.float32)
        return result

    def preprocess(self, img) -> np.ndarray:
        """An image (path, PIL image, HxWx3 uint8 array) as the float32 (3, H, W) array this model's
        weights expect: torchvision's transforms with the preprocessing recorded in the model file."""
        from . import transforms  # Pillow: imported with the first image, not with the package

        return transforms.preprocess(img, **dataclasses.asdict(self.preprocessing))

    def classify(self, img, top_k: int = 5):
        """Top-k predictions for an image (path, PIL image, HxWx3 uint8 array), sorted by probability.

        A list or tuple of images runs as one batch and gives a list of prediction lists.
        """
        self._open_backend()
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= self.num_classes:
            raise InputError(f"top_k must be an integer from 1 to {self.num_classes}, got {top_k!r}")
        single = not isinstance(img, (list, tuple))
        images = [img] if single else list(img)
        empty = np.zeros((0, 3, *self.preprocessing.input_size), np.float32)
        batch = np.stack([self.preprocess(i) for i in images]) if images else empty
        probs = self.probabilities(batch)
        results = [top_predictions(p, top_k, self.labels) for p in probs]
        return results[0] if single else results

    def _check_input(self, x) -> np.ndarray:
        """x as an (N, 3, H, W) array of real numbers, not yet copied: `_chunk` converts it a chunk at a time.

        Integer and float arrays of any width are accepted (and rounded to float32); uint8 (raw pixels,
        not normalised), bool, complex, object and string arrays are refused, as are sides outside
        1..MAX_SIDE. N may be 0."""
        self._open_backend()
        try:
            arr = np.asarray(x)
        except Exception as e:
            raise InputError(f"cannot use {type(x).__name__} as an image batch: {e}") from None
        if arr.dtype.kind not in "fiu":
            raise InputError(f"images must be a real-valued numeric array, got dtype {arr.dtype}")
        if arr.dtype == np.uint8:  # pixels as read from a file: the network expects them scaled and normalised
            raise InputError("images are uint8 pixels, but the network takes float32 images normalised as its "
                             "weights expect: use np.stack([model.preprocess(img) for img in images]), or "
                             "model.classify(images)")
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise InputError(f"images must have shape (N, 3, H, W), got {arr.shape}")
        h, w = arr.shape[2:]
        if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
            raise InputError(f"image height and width must be 1..{MAX_SIDE}, got {h}x{w}")
        return arr

    @staticmethod
    def _chunk(arr: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Images start..stop of a checked NCHW batch as contiguous float32 NHWC (the graph's channel-fastest
        input, made in the one copy NumPy does anyway for a dtype or a slice), refusing NaN and infinite values
        (a float64 value beyond float32's range becomes infinite and is refused too)."""
        chunk = np.empty((stop - start, *arr.shape[2:], arr.shape[1]), np.float32)
        with np.errstate(over="ignore"):  # overflow gives inf, refused just below
            for c in range(arr.shape[1]):  # a plane at a time: 3x faster than a copy of the transposed view
                chunk[..., c] = arr[start:stop, c]
        if not np.isfinite(chunk).all():
            bad = start + int(np.flatnonzero(~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1))[0])
            raise InputError(f"image {bad} of the batch contains NaN or infinite values")
        return chunk

    def _run(self, x, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        x = self._check_input(x)
        n, _, h, w = x.shape
        widths = {name: self.feature_dim if name == "features" else self.num_classes for name in outputs}
        result = {name: np.empty((n, width), np.float32) for name, width in widths.items()}
        step = max(1, min(MAX_BATCH, MAX_CHUNK_PIXELS // (h * w)))
        for start in range(0, n, step):
            with self._lock:
                backend = self._open_backend()  # closed by another thread since the check?
                parts = [(start + lo, start + hi, *self._graph((hi - lo,) + x.shape[1:], lane=lane))
                         for lo, hi, lane in lanes(min(step, n - start), backend.threads)]

                def prepare(first, end, graph, out):  # each part's images made NHWC on its lane's thread
                    return lambda: graph.set(out["image"], self._chunk(x, first, end))

                backend.compute([part[2] for part in parts], [prepare(*part) for part in parts])
                for first, end, graph, out in parts:
                    for name, width in widths.items():
                        result[name][first:end] = graph.get(out[name]).reshape(end - first, width)
        return result

    def _graph(self, shape, stages: bool = False, lane: int | None = None) -> tuple[Graph, dict]:
        """The compiled graph for this input shape (on this lane of the backend, or on its own threads), built
        on first use and kept for reuse."""
        n, _, h, w = shape
        key = (n, h, w, stages, lane)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        backend = self._backend if lane is None else self._backend.lane(lane)
        graph = Graph(backend, max_nodes=resnet.max_nodes(self.config, n))
        try:
            out = resnet.build(graph, self._weights, self.config, self._eps, self._plan, n, h, w, stages)
            names = resnet.STAGES + ("features", "logits") if stages else ("features", "logits", "probs")
            graph.finalize(*(out[k] for k in names))
        except BaseException:
            graph.close()
            raise
        self._graphs[key] = (graph, out)
        if len(self._graphs) > _GRAPH_CACHE * (self._backend.threads + 1):
            self._graphs.popitem(last=False)[1][0].close()
        return graph, out

    # -- lifetime ----------------------------------------------------------------------------------------

    def close(self):
        """Frees the model's native memory. Safe to call twice."""
        with self._lock:
            for graph, _ in self._graphs.values():
                graph.close()
            self._graphs.clear()
            if self._backend is not None:
                self._weights.close()
                self._backend.close()
                self._backend = None


def lanes(n: int, threads: int) -> list[tuple[int, int, int | None]]:
    """How a chunk of n images runs on `threads` threads: (first, end, lane) per part. Each lane takes an equal
    share of the images on one thread, side by side with the others and no barrier between them; the images
    left over run on every thread (lane None), as does a single image. ResNet-101, 2 threads, batch 8 on Zen 5:
    f32 0.98x the time of one graph on both threads, int8 0.95x, and steady through the host's slow stretches
    (its CPUs on cores without a shared L3), where two threads meeting at each op's barrier lose 1.26x."""
    if threads < 2 or n < 2:
        return [(0, n, None)]
    k = min(threads, n)
    share = n // k
    parts = [(i * share, (i + 1) * share, i) for i in range(k)]
    return parts + ([(k * share, n, None)] if n % k else [])


def load(path: str | os.PathLike, *, threads: int | None = None, batchnorm: str = "folded",
         dtype: str | None = None, winograd: bool | None = None, gemm: str | None = None,
         adapt_threads: bool = True) -> Model:
    """Loads a GGUF model file written by `python -m pyggml_resnet.convert`.

    threads: CPU threads per computation (default: `cpu.default_threads()`: OMP_NUM_THREADS if set, else
        every CPU this process may use, within its cgroup's CPU quota). A batch runs an equal share of its
        images on each thread, side by side (`lanes`); a single image runs on all of them.
    adapt_threads: run computations on fewer threads while they get less CPU time than their threads
        could use (other processes busy on the same CPUs): on the CPUs they got, at least 1, trying all
        `threads` again now and then (`cpu.CpuShare`). A batch's lanes, which wait for nobody, run on all
        `threads` regardless. The results are the same bits on any number of threads. False: always
        `threads`.
    batchnorm: "folded" (fast, default) or "explicit" (each BatchNorm as ggml sub/div/mul/add).
    dtype: "f32", "f16", "bf16" or "q8_0" for the conv and fc weights (default: as stored in the file).
        "int8" (the default for them) only for a file converted with `--dtype int8 --calibration` (whose
        BatchNorm is folded: batchnorm="explicit" is refused), whose convs run on the packed GEMM's int8 path
        ("int8-avx512vnni", "int8-avxvnni", "int8-avx2" or "int8-scalar", from the CPU, or named by `gemm`).
    winograd: run f32 3x3 stride-1 convs as Winograd F(2x2,3x3) (16 multiplies per 2x2 outputs instead of
        36; as exact as the direct product, docs/benchmarks.md). With the packed GEMM the transformed weights
        are made from the packed ones as they are used, so memory is unchanged; by default (None) it runs
        for images of 32 or more 2x2 tiles (layers 1-3 of a 224x224 input), where it was measured to pay.
        With ggml's mul_mat (gemm="ggml") it is off by default, and True stores the transformed weights
        (16/9 of those convs' memory, +54 MB for ResNet-101). True and False force it on and off.
    gemm: what runs the matrix products. "packed": our GEMM over weights packed at load, with the
        BatchNorm bias, residual add and ReLU fused in; bit-identical results for any batch and thread count
        (csrc/gemm.h). Its path is chosen from the CPU (`plan.packed_paths`): "avx512" or "avx2" (AVX2+FMA)
        for f32 weights, and for f16 and bf16 weights widened to f32 at load (exact; f32's memory and speed,
        Winograd included); "avx512bf16" (AVX512-BF16: bf16 weights and inputs, f32 sums) for bf16 weights
        where the CPU's bf16 dot product beats its f32 FMAs (AMD's Zen 4; not Intel's). A path may also be
        named to force it (e.g. "avx512bf16" or "avx512" for a bf16 model). "ggml": ggml's mul_mat over the
        weights as they are (f16 and bf16 at half f32's memory). Default: "packed" where the CPU has a path
        for the weights, else "ggml"; q8_0 weights always use ggml's mul_mat. `Model.compute_dtype` and
        `repr(model)` say what the products multiply.
    Raises ModelFormatError for a malformed file, InputError for bad arguments.
    """
    resnet.check_batchnorm(batchnorm)
    if dtype not in (None, "int8"):
        Type.parse(dtype)
    check_gemm(gemm)
    if winograd is not None and not isinstance(winograd, bool):
        raise InputError(f"winograd must be True, False or None, got {winograd!r}")
    if not isinstance(adapt_threads, bool):
        raise InputError(f"adapt_threads must be True or False, got {adapt_threads!r}")
    return Model(loader.read(path), threads=threads, batchnorm=batchnorm, dtype=dtype, winograd=winograd, gemm=gemm,
                 adapt_threads=adapt_threads)
