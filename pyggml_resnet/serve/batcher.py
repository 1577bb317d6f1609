"""Dynamic batching: the images of requests that arrive together run as one forward pass.

Requests queue here; one task on the event loop takes the oldest request and every queued one with the same
image size, up to `max_batch` images, and hands the batch to one worker thread (a Model computes one batch at a
time anyway: its calls are serialised by its lock, and each uses every thread it was given). Requests arrive
while a pass runs, so under load the batches fill by themselves; `max_wait` only lets an idle server wait a
moment for company. The event loop never waits on a forward pass.

Batching changes no result: on the packed GEMM a model's outputs for an image are bit-identical whatever the
batch around it (tests/test_serve.py checks a batched response against a lone one).
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

# Each batch size builds its graphs (~5-10% of a pass's time; one per lane, model.lanes) and a model keeps 4
# batch sizes' (model._GRAPH_CACHE): with batches of 1..4 images of one size, none is ever rebuilt.
MAX_BATCH = 4
MAX_WAIT = 0.002  # seconds


@dataclass
class _Item:
    x: np.ndarray  # float32 NCHW, already checked (shape, finite values)
    outputs: frozenset[str]  # Model outputs: "probs", "logits", "features"
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Runs `model.outputs` on batches of queued requests, in one worker thread.

    max_batch: the most images in one pass (a single request with more runs alone, in the model's chunks).
    max_wait: seconds an idle batcher waits for more requests before running a lone one.
    """

    def __init__(self, model, *, max_batch: int = MAX_BATCH, max_wait: float = MAX_WAIT):
        self.model = model
        self.max_batch, self.max_wait = max_batch, max_wait
        self.passes = 0  # forward passes run, and the images in them: what batching did
        self.images = 0
        self._pending: collections.deque[_Item] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pyggml-resnet-forward")

    async def compute(self, x: np.ndarray, outputs: frozenset[str]) -> dict[str, np.ndarray]:
        """`model.outputs(x, outputs)`, computed in a batch with whatever else is queued."""
        loop = asyncio.get_running_loop()
        if self._task is None:  # started on first use, in the loop that serves (uvicorn's, or Ray Serve's)
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._serve())
        item = _Item(x, outputs, loop.create_future())
        self._pending.append(item)
        self._wakeup.set()
        return await item.future

    async def _serve(self) -> None:
        while True:
            await self._wakeup.wait()
            if self.max_wait and sum(len(i.x) for i in self._pending) < self.max_batch:
                await asyncio.sleep(self.max_wait)
            batch = self._take()
            if not self._pending:
                self._wakeup.clear()
            if batch:
                await self._run(batch)

    def _take(self) -> list[_Item]:
        """The oldest live request and the queued ones of its image size that fit, in arrival order."""
        # A cancelled request (Ray Serve cancels one whose client went away; uvicorn lets it finish) is dropped.
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending.popleft()
        batch, n, rest = [first], len(first.x), collections.deque()
        for item in self._pending:
            if (not item.future.done() and item.x.shape[1:] == first.x.shape[1:]
                    and n + len(item.x) <= self.max_batch):
                batch.append(item)
                n += len(item.x)
            elif not item.future.done():
                rest.append(item)
        self._pending = rest
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        x = batch[0].x if len(batch) == 1 else np.concatenate([i.x for i in batch])
        names = sorted(frozenset().union(*(i.outputs for i in batch)))
        try:
            results = await loop.run_in_executor(self._executor, self.model.outputs, x, names)
        except Exception as e:
            if len(batch) == 1:
                _settle(batch[0].future, exception=e)
            else:  # one request's fault must not fail the others: each runs again alone
                for item in batch:
                    await self._run([item])
            return
        self.passes += 1
        self.images += len(x)
        start = 0
        for item in batch:
            stop = start + len(item.x)
            _settle(item.future, result={name: results[name][start:stop] for name in item.outputs})
            start = stop

    def close(self) -> None:
        """Stops the batching task and the worker thread (after the pass it may be running)."""
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=True)


def _settle(future: asyncio.Future, *, result=None, exception: BaseException | None = None) -> None:
    if future.done():  # cancelled while it waited
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
