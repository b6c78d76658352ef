"""Dynamic batching: photos of concurrent requests wait a few milliseconds to share one forward pass."""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More photos are waiting than the service accepts; the caller should retry later."""


@dataclass
class _Item:
    images: np.ndarray  # k × C × H × W, one request's photos
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    """Groups the photos of requests arriving within `window_ms` (up to `max_batch` photos) into one call of
    `predict(images) -> probabilities`, run on one background thread; each request gets its own rows back.

    Counters: `forward_passes`, `requests_served`, `shared_passes` (passes that served more than one request)
    and `largest_batch` (photos in the biggest pass).
    """

    def __init__(self, predict, max_batch: int = 16, window_ms: float = 5.0, max_waiting: int = 512):
        self.predict = predict
        self.max_batch = max(1, int(max_batch))
        self.window_s = max(0.0, window_ms) / 1000
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=max(1, max_waiting))
        self._lock = threading.Lock()
        self.forward_passes = self.requests_served = self.shared_passes = self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name="binsight-batcher", daemon=True)
        self._thread.start()

    def submit(self, images: np.ndarray) -> Future:
        """A future of the probabilities (k × classes) of these k photos."""
        item = _Item(np.asarray(images, dtype=np.float32))
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return item.future

    def stats(self) -> dict:
        with self._lock:
            return {"forward_passes": self.forward_passes, "requests_served": self.requests_served,
                    "shared_passes": self.shared_passes, "largest_batch": self.largest_batch,
                    "max_batch": self.max_batch, "window_ms": self.window_s * 1000}

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        items, photos = [first], len(first.images)
        deadline = time.monotonic() + self.window_s
        while photos < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return items, True
            items.append(item)
            photos += len(item.images)
        return items, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            items, stopping = self._gather(first)
            try:
                probs = self.predict(np.concatenate([i.images for i in items]))
            except Exception as exc:  # noqa: BLE001 — each waiting request gets the failure, the thread lives on
                log.exception("forward pass failed")
                for item in items:
                    item.future.set_exception(exc)
                continue
            with self._lock:
                self.forward_passes += 1
                self.requests_served += len(items)
                self.shared_passes += len(items) > 1
                self.largest_batch = max(self.largest_batch, len(probs))
            start = 0
            for item in items:
                item.future.set_result(probs[start:start + len(item.images)])
                start += len(item.images)
