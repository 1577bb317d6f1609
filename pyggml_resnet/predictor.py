"""The rows `classify` computes, in this process or on Ray actors: `Predictor` turns a batch of images (a
"path" column, or an "image" column of decoded pixels) into one row per image: its top-k classes, logits or
pooled features, or the error that made the image unreadable. `results` writes such rows to a file;
`pyggml_resnet.ray` runs a Predictor per Ray actor (its docstring lists the columns).

Ray is never imported here: under a Ray worker the default thread count is the CPUs Ray assigned.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from .errors import InputError
from .model import Model, top_predictions

OUTPUTS = ("classify", "logits", "features")


def assigned_cpus() -> int | None:
    """The CPUs Ray gave this actor or task (at least 1 when a fraction), or None outside a Ray worker."""
    if "ray" not in sys.modules:  # not running under Ray: do not import it for nothing
        return None
    import ray

    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return None if cpus is None else max(1, int(cpus))


class Predictor:
    """A callable class for `Dataset.map_batches` (batch_format="numpy"); see the module's docstring.

    model: a GGUF path or a registry name such as "resnet50" (loaded once per actor; a registry name is
        downloaded into each node's cache on first use: see docs/scaling.md). Never a `Model` object.
    output: "classify", "logits" or "features".
    top_k: classes per row for "classify".
    threads: ggml threads per actor; default the CPUs Ray assigned to the actor (its `num_cpus`), so actors
        never oversubscribe the machine. Outside Ray, the package's default.
    dtype: weight type at load, as for `pyggml_resnet.load` (default: as stored).
    journal: where a Ray actor notes which file it is decoding, so that a file that killed the worker process
        becomes an error row on the batch's retry instead of killing it again (`pyggml_resnet.ray` passes
        one; see docs/scaling.md). None in one process, where nothing outlives a crash.
    """

    def __init__(self, model: str | os.PathLike, *, output: str = "classify", top_k: int = 5,
                 threads: int | None = None, dtype: str | None = None, journal=None):
        from .hub import open_model

        if isinstance(model, Model):
            raise TypeError("Predictor takes the model's path or registry name, not a loaded Model: "
                            "each actor loads its own copy")
        _check_output(output)
        self._setup(open_model(os.fspath(model), threads=threads or assigned_cpus(), dtype=dtype), output, top_k)
        self.journal = journal

    @classmethod
    def around(cls, model: Model, *, output: str = "classify", top_k: int = 5) -> Predictor:
        """A Predictor on a model already open in this process (the CLI's in-process path), which stays the
        caller's to close. Not for Ray: a Model cannot travel to an actor."""
        _check_output(output)
        self = cls.__new__(cls)
        self._setup(model, output, top_k)
        self.journal = None
        return self

    def _setup(self, model: Model, output: str, top_k: int) -> None:
        self.output = output
        self.model = model
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.model.num_classes:
            raise InputError(f"top_k must be an integer from 1 to {self.model.num_classes}, got {top_k!r}")
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" in batch:
            sources = batch["image"]
        elif "path" in batch:
            sources = batch["path"]
        else:
            raise InputError(f"Predictor needs an 'image' or a 'path' column, got {sorted(batch)}")
        paths = [str(p) for p in batch["path"]] if "path" in batch else [None] * len(sources)
        # The journal watches decoding from paths only: decoded images come from Ray's own reader.
        watch = self.journal.begin(paths) if self.journal is not None and "image" not in batch else _UNWATCHED
        errors, arrays, good = self._decode(sources, paths, watch)
        out = {"path": np.array(paths, dtype=object)}
        out.update(self._results(np.stack(arrays) if arrays else None, good, len(sources)))
        out["error"] = np.array(errors, dtype=object)
        watch.done()
        return out

    def _decode(self, sources, paths: list, watch) -> tuple[list, list, list[int]]:
        """(error per row or None, the decoded arrays, their rows). A file that killed the worker in an
        earlier attempt of this batch is not decoded again: its row says so."""
        errors: list[str | None] = [None] * len(sources)
        arrays, good = [], []
        for i, source in enumerate(sources):
            if i in watch.crashed:
                errors[i] = f"{paths[i]}: {watch.crashed[i]}"
                continue
            watch.decoding(i)
            try:
                arrays.append(self.model.preprocess(source))
                good.append(i)
            except Exception as e:  # any undecodable image: one error row, never a failed job
                errors[i] = str(e) if paths[i] is None or paths[i] in str(e) else f"{paths[i]}: {e}"
        watch.decoding(None)  # a death from here on is the batch's, not one file's
        return errors, arrays, good

    def _results(self, x: np.ndarray | None, good: list[int], n: int) -> dict[str, np.ndarray]:
        model = self.model
        if self.output == "classify":
            labels, indices, probs = ([[] for _ in range(n)] for _ in range(3))
            for i, p in zip(good, model.probabilities(x) if x is not None else []):
                top = top_predictions(p, self.top_k, model.labels)
                labels[i] = [t.label for t in top]
                indices[i] = [t.index for t in top]
                probs[i] = [round(t.prob, 6) for t in top]  # as the CLI's rows
            return {"labels": _objects(labels), "indices": _objects(indices), "probs": _objects(probs)}
        width = model.feature_dim if self.output == "features" else model.num_classes
        result = np.full((n, width), np.nan, np.float32)  # NaN marks an error row's missing vector
        if x is not None:
            result[good] = model.features(x) if self.output == "features" else model.logits(x)
        return {self.output: result}


class _Unwatched:
    """The watch of a batch that no journal follows: no file crashed before, nothing to record."""

    crashed: dict[int, str] = {}

    def decoding(self, index: int | None) -> None:
        pass

    def done(self) -> None:
        pass


_UNWATCHED = _Unwatched()


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")


def _objects(items: list) -> np.ndarray:
    """A 1-D object array of lists (np.array would make a 2-D array when the lists have equal lengths)."""
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr
