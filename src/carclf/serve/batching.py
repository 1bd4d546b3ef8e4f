"""Micro-batching: requests' photos merged into engine calls on one inference thread."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING

import numpy as np

from carclf.serve.settings import ApiError, ServeSettings

if TYPE_CHECKING:
    from carclf.serve.middleware import Metrics


class MicroBatcher:
    """An asyncio queue in front of one inference thread: requests' photos are merged into batches of up to
    ``max_batch`` photos, the first photo waiting at most ``max_wait`` seconds for company."""

    def __init__(self, infer, settings: ServeSettings, metrics: Metrics) -> None:
        self.infer, self.settings, self.metrics = infer, settings, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="carclf-infer")
        self.pending = 0  # photos queued or in the running batch
        self.task: asyncio.Task | None = None
        self._held: tuple | None = None  # an item that did not fit the last batch

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="carclf-batcher")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def run_alone(self, images: list[bytes]):
        """Inference on the inference thread outside the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.infer, images)

    async def submit(self, images: list[bytes]) -> tuple[np.ndarray, list[int]]:
        if self.pending + len(images) > self.settings.max_queue:
            raise ApiError(503, "busy", f"{self.pending} photos are waiting for inference; retry shortly",
                           retry_after_s=1)
        fut = asyncio.get_running_loop().create_future()
        self.pending += len(images)
        self.metrics.queued.set(self.pending)
        await self.queue.put((images, fut))
        try:
            return await fut
        finally:
            if not fut.done():  # the client went away: the batch drops this item's results
                fut.cancel()

    async def _next(self, timeout: float | None):
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout is None:
            return await self.queue.get()
        if not self.queue.empty():
            return self.queue.get_nowait()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._next(None)]
            n = len(items[0][0])
            deadline = loop.time() + self.settings.max_wait_ms / 1000
            while n < self.settings.max_batch:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if n + len(item[0]) > self.settings.max_batch:
                    self._held = item  # starts the next batch
                    break
                items.append(item)
                n += len(item[0])
            items = [(imgs, fut) for imgs, fut in items if not fut.cancelled()]  # clients that went away
            photos = [im for imgs, _ in items for im in imgs]
            if photos:
                t0 = time.perf_counter()
                try:
                    probs, bad = await loop.run_in_executor(self.executor, self.infer, photos)
                except Exception as exc:  # noqa: BLE001 - reported to each waiting request as a 500, never fatal
                    for _, fut in items:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    self.metrics.record_batch(len(photos), time.perf_counter() - t0)
                    bad_set, start = set(bad), 0
                    for imgs, fut in items:
                        end = start + len(imgs)
                        if not fut.done():
                            fut.set_result((probs[start:end], [i - start for i in range(start, end) if i in bad_set]))
                        start = end
            self.pending -= n
            self.metrics.queued.set(self.pending)
            del items, photos  # no request's bytes outlive its batch
