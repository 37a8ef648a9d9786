"""Request batching for a worker that serves one batch at a time (a model replica's reads).

Ray Serve's `@serve.batch` closes a batch `batch_wait_timeout_s` after its first request even while
the previous batch still runs, so under load the clients split into small batches that queue
behind each other (16 clients fell into rounds of 3, 6 and 7: docs/benchmarks.md). Here a batch
closes when the worker is ready for it: whatever queued while a batch ran is the next batch, at
once. Only an idle worker waits for company, and only where some is expected."""

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any


class Batcher:
    """`await batcher(item)` is `run([item, ...])`'s result for `item`, from a batch of at most
    `max_size` items. An idle worker starts a lone item at once, unless its last batch held
    several (their callers are about to come back): then it waits up to `wait_s` for a full batch.
    A caller cancelled while queued is left out of its batch; a batch that raises fails its own
    callers only."""

    def __init__(self, run: Callable[[list], Awaitable[list]], max_size: int, wait_s: float):
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self.queue: list[tuple[Any, asyncio.Future]] = []
        self.arrived = asyncio.Event()
        self.worker: asyncio.Task | None = None
        self.last_batch_size = 0

    async def __call__(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        self.arrived.set()
        if self.worker is None or self.worker.done():
            # A context of its own: the worker serves every caller, not the request that started it.
            self.worker = asyncio.create_task(self._work(), context=contextvars.Context())
        return await future  # a cancelled caller cancels its future; the worker skips it

    async def _work(self) -> None:
        queued_while_busy = False
        try:
            while self.queue:
                # Items that queued while a batch ran have waited already: they go at once.
                if not queued_while_busy and self.last_batch_size > 1:
                    await self._fill(asyncio.get_running_loop().time() + self.wait_s)
                self.queue = [(item, future) for item, future in self.queue if not future.done()]
                batch, self.queue = self.queue[: self.max_size], self.queue[self.max_size :]
                if batch:
                    await self._serve(batch)
                queued_while_busy = bool(self.queue)
        except BaseException as err:  # the worker itself stopped (cancelled): no caller is left waiting
            _fail(self.queue, RuntimeError(f"the batch worker stopped: {type(err).__name__}"))
            self.queue = []
            raise

    async def _fill(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while len(self.queue) < self.max_size and (left := deadline - loop.time()) > 0:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                return

    async def _serve(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        self.last_batch_size = len(batch)
        try:
            results = await self.run([item for item, _ in batch])
            answered = list(zip([future for _, future in batch], results, strict=True))
        except Exception as err:  # the worker lives on: the next batch is not stranded
            _fail(batch, err)
            return
        except BaseException as err:
            _fail(batch, RuntimeError(f"the batch worker stopped: {type(err).__name__}"))
            raise
        for future, result in answered:
            if not future.done():
                future.set_result(result)


def _fail(queued: list[tuple[Any, asyncio.Future]], err: BaseException) -> None:
    for _, future in queued:
        if not future.done():
            future.set_exception(err)
