"""Ray Data: classify or embed image sets on every CPU of one machine or a cluster, one model per actor.

    import ray
    import pyggml_resnet.ray as pr

    ray.init()                                            # or ray.init("ray://head:10001"), or `ray job submit`
    ds = pr.read_paths(["photos/"])                       # one row per image file: {"path": ...}
    ds = pr.predict(ds, "resnet50", output="features")  # = ds.map_batches(pr.Predictor, **pr.map_batches_kwargs(...))
    ds.write_parquet("embeddings/")                       # path, features, error

`Predictor` (from `pyggml_resnet.predictor`: the rows the CLI computes too) is the callable class for
`Dataset.map_batches`: each actor loads the model once, from a GGUF path or a registry name
(`pyggml_resnet.from_pretrained`); a `Model` object never travels between processes (pickling one raises
TypeError). It reads the "image" column when there is one (uint8 HxWx3 images from
`ray.data.read_images(..., mode="RGB")`), else the "path" column, and returns one row per input row:

    output="classify":  path, labels, indices, probs (top-k, as the CLI's JSON lines), error
    output="logits":    path, logits (num_classes float32), error
    output="features":  path, features (feature_dim float32: pooled embeddings), error

An image that cannot be read or decoded gives a row whose `error` is the message (and whose results are
empty lists, or NaN vectors); every other row is computed as usual. `error` is null for good rows.

A batch whose worker process dies (a lost node, the OOM killer, a file that crashes the decoder) is run again
by its restarted actor (each actor is restarted at most ACTOR_RESTARTS times over the job); a file that was
being decoded when a retry's worker died is not decoded again but becomes an error row (see `_CrashJournal`,
and docs/scaling.md for the numbers).

Prefer a column of paths to `read_images`: it is decoded by `pyggml_resnet.load_image`, so 16-bit images keep
their range (`read_images(mode="RGB")` goes through Pillow's `convert("RGB")`, which clips 16-bit values
above 255 to white, and a folder mixing 8- and 16-bit files fails in Arrow without mode="RGB"), and a bad
file becomes an error row (in `read_images` Ray's reader fails the whole job on it). For 8-bit images both
inputs give tensors identical to `model.preprocess(path)`.

This module imports Ray only inside the functions that need it, so `import pyggml_resnet.ray` works (and
`Predictor` can be called in-process) without Ray installed. Install it with `pip install pyggml-resnet[ray]`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings

import numpy as np

from .errors import InputError
from .model import MAX_BATCH, Model
from .predictor import Predictor

# What Ray retries, and how often (docs/scaling.md, "Lost nodes and crashed workers"): a batch whose worker died
# is run again, without a count of its own, by its actor once restarted (on another node if its node is lost:
# Ray sees a lost node only after its health checks fail, and a count would run out in the meantime); each
# actor is restarted at most ACTOR_RESTARTS times over the job, which bounds everything.
ACTOR_RESTARTS = 8


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def map_batches_kwargs(model: str | os.PathLike, *, output: str = "classify", top_k: int = 5,
                       actors: int | None = None, threads: int = 1, batch_size: int = MAX_BATCH,
                       dtype: str | None = None) -> dict:
    """Keyword arguments for `ds.map_batches(Predictor, **map_batches_kwargs(...))`.

    actors: the actor pool's size (default: the cluster's CPUs // threads, at least 1; needs `ray.init()`).
    threads: CPUs reserved per actor, which is also its ggml thread count. On a machine's few cores, one
        thread per actor and one actor per core is fastest (docs/scaling.md has the measurements).
    batch_size: images per call; 16 is the largest batch the model computes in one graph.
    An actor whose process dies is restarted (at most ACTOR_RESTARTS times) and its batch run again; one
    batch in flight per actor, so that a death costs no other batch a run. Also
    starts the job's crash journal (an actor without CPUs on this node), which the Predictors share.
    """
    import ray

    if isinstance(model, Model):
        raise TypeError("map_batches_kwargs takes the model's path or registry name, not a loaded Model: "
                        "each actor loads its own copy")
    for name, value in (("threads", threads), ("batch_size", batch_size), ("actors", actors)):
        if value is not None:
            _check_positive(name, value)
    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    return {
        # No threads here: each actor takes its thread count from the CPUs Ray assigned it (num_cpus).
        "fn_constructor_kwargs": {"model": os.fspath(model), "output": output, "top_k": top_k, "dtype": dtype,
                                  "journal": _Journal.start()},
        "compute": ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        "num_cpus": threads,
        "batch_size": batch_size,
        "batch_format": "numpy",
        "max_restarts": ACTOR_RESTARTS,
        "max_task_retries": -1,  # bounded by max_restarts: a batch is retried only on a restarted actor
    }


def predict(ds, model: str | os.PathLike, *, cls: type = Predictor, **options):
    """`ds.map_batches(cls, **map_batches_kwargs(model, **options))` (cls: Predictor or a subclass), without
    Ray 2.60's warning that `ray_remote_args` (here max_restarts, max_task_retries) are deprecated: Ray has no
    named parameter for them yet."""
    kwargs = map_batches_kwargs(model, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        return ds.map_batches(cls, **kwargs)


class _CrashJournal:
    """A Ray actor on the driver's node, which outlives any worker: for each batch in flight, its attempts so
    far, the node of the latest, the row it is decoding when watched, and the rows that were being decoded
    when a watched attempt's worker died. A batch leaves the journal when it is done.

    So a file that kills its worker while decoding costs two deaths: the first attempt is not watched (a
    watch costs a round trip per file), the retry is, and the third attempt gives the file an error row. A
    death on a node that is gone blames no file: the node was lost, the file may be good."""

    def __init__(self):
        self._batches: dict[str, tuple[int, str | None, int | None, list[int]]] = {}

    def begin(self, key: str, node: str) -> tuple[int, list[int]]:
        """An attempt at the batch starts on `node`: (its number from 1, the rows that killed a worker)."""
        attempt, last_node, decoding, crashed = self._batches.get(key, (0, None, None, []))
        if decoding is not None and _node_alive(last_node):  # its worker died while decoding this row
            crashed = crashed + [decoding]
        self._batches[key] = (attempt + 1, node, None, crashed)
        return attempt + 1, crashed

    def decoding(self, key: str, row: int | None) -> None:
        attempt, node, _, crashed = self._batches[key]
        self._batches[key] = (attempt, node, row, crashed)

    def done(self, key: str) -> None:
        self._batches.pop(key, None)


def _node_alive(node: str) -> bool:
    """Whether Ray still counts the node in (a lost one is declared dead before its actors restart)."""
    import ray

    return any(n["NodeID"] == node and n["Alive"] for n in ray.nodes())


class _Journal:
    """The Predictors' side of the crash journal: it travels to every actor in the constructor's kwargs."""

    def __init__(self, actor):
        self._actor = actor

    @classmethod
    def start(cls) -> _Journal:
        """A journal on this (the driver's) node, which lives as long as the Dataset that holds it."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return cls(ray.remote(num_cpus=0, scheduling_strategy=here)(_CrashJournal).remote())

    def begin(self, paths: list[str]) -> _Watch:
        import ray

        key = hashlib.sha256("\0".join(paths).encode()).hexdigest()
        attempt, crashed = ray.get(self._actor.begin.remote(key, ray.get_runtime_context().get_node_id()))
        return _Watch(self._actor, key, attempt, crashed)


class _Watch:
    """One attempt at a batch, as `Predictor` sees it: `crashed` (row -> error message), `decoding(row)`
    before each file (and None after the last), `done()`. Only a retry records each file, and waits for
    the journal to have it before decoding: the first attempt costs one round trip, not one per file."""

    def __init__(self, actor, key: str, attempt: int, crashed: list[int]):
        self._actor, self._key, self._watched = actor, key, attempt > 1
        self.crashed = {row: "its worker process died while decoding this file (a crash in the decoder?); "
                             "not decoded again" for row in crashed}

    def decoding(self, row: int | None) -> None:
        if self._watched:
            import ray

            ray.get(self._actor.decoding.remote(self._key, row))

    def done(self) -> None:
        self._actor.done.remote(self._key)  # not awaited: a stale entry only makes a rerun watched


def read_paths(inputs: list[str | os.PathLike], *, batch_size: int = MAX_BATCH):
    """A Dataset with one row {"path": ...} per image file: files as given, folders searched recursively
    (the CLI's rules), in blocks of `batch_size` rows (give `predict` the same batch_size). Only the paths
    travel; each actor reads its images, so on a cluster the files must be on storage every node sees at the
    same path."""
    from .transforms import image_paths

    _check_positive("batch_size", batch_size)
    paths = image_paths([os.fspath(p) for p in inputs])
    if not paths:
        raise InputError("no images found")
    return _path_blocks([str(p) for p in paths], batch_size)


def _path_blocks(paths: list[str], batch_size: int):
    """A Dataset of {"path": ...} rows in blocks of exactly `batch_size` rows (the last one fewer). Ray Data
    gives an actor's task whole blocks, at least batch_size rows, and cuts the task's last batch short:
    `from_items`' blocks (1 row each up to 200 rows, then len/200 rows) made 600 paths into tasks of 18 rows,
    computed as batches of 16 and 2. With batch-sized blocks every task is one batch, as in a plain loop."""
    import pyarrow as pa
    import ray

    return ray.data.from_arrow([pa.table({"path": paths[i:i + batch_size]})
                                for i in range(0, len(paths), batch_size)])


def run_cli(args, paths: list) -> int:
    """`pyggml-resnet classify ... --ray [ADDRESS] --out FILE`: Predictor on Ray actors, every image a row (bad
    ones an error row), written by the CLI's one writer (`results.write_results`)."""
    import logging
    import time

    import ray

    from .results import write_results

    for option in ("verbose", "url", "sha256", "max_pixels"):
        if getattr(args, option):
            raise InputError(f"--{option.replace('_', '-')} cannot be used with --ray (yet)")
    output = "features" if args.features else "classify"
    # Opened here first: a bad path, name or --top-k fails now, with its own message, not in every actor.
    # A path is made absolute, since Ray's workers do not run in this directory.
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    Predictor(model, output=output, top_k=args.top_k, threads=1, dtype=args.dtype).model.close()
    rows = [str(p) for p in paths]
    start = time.perf_counter()
    ray.init(address=args.ray or None, logging_level="WARNING")
    batches = None
    try:
        print(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, started in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        context = ray.data.DataContext.get_current()  # (importing ray.data configures its logger)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run INFO lines bury the progress bar
        context.enable_progress_bars = False  # ours counts images
        context.execution_options.preserve_order = True  # rows in the order of the paths
        kwargs = dict(output=output, top_k=args.top_k, actors=args.actors, threads=args.threads or 1,
                      batch_size=args.batch_size, dtype=args.dtype)
        # Workers may run elsewhere: they get absolute paths, the output keeps the paths as given.
        ds = predict(_path_blocks([os.path.abspath(p) for p in rows], args.batch_size), model, **kwargs)
        batches = _as_given(ds.iter_batches(batch_format="numpy", batch_size=None), rows)
        return write_results(batches, args.out, len(rows))
    finally:
        # A failed write leaves Ray Data's iterator (and its threads) alive, held by the traceback: stop it
        # before shutting Ray down, or the shutdown waits on it.
        if batches is not None:
            batches.close()
        ray.shutdown()


def _as_given(batches, rows: list[str]):
    """The batches (in the order of `rows`, as preserve_order keeps them) with each path as the user gave it."""
    done = 0
    iterator = iter(batches)
    try:
        for batch in iterator:
            n = len(batch.get("path", ()))
            if n == 0:
                continue
            given = rows[done:done + n]
            assert [os.path.abspath(p) for p in given] == list(batch["path"]), "Ray changed the order of the rows"
            done += n
            yield {**batch, "path": np.array(given, dtype=object)}
    finally:
        iterator.close()  # stops Ray Data's prefetching at once when the writer gives up early
