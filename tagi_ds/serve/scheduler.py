"""The one engine thread: requests that arrive within ``--batch_window_ms`` of the first waiting one (at most
``--max_batch``) are decoded together, whatever their instructions.

Every forward runs on this thread (the adapted layers share one adapter slot, so forwards must not interleave);
the HTTP event loop only queues requests and reads their events. A batch first resolves its adapters (the new
instructions of the batch in one hypernetwork forward), then decodes; adapter-only requests (``POST /v1/adapters``)
ride in the same batches. Requests that arrive while a batch decodes wait for the next one (no joining a running
batch). An error in a batch is sent to its requests and the thread goes on.
"""

from __future__ import annotations

import queue
import threading
import time

from tagi_ds.serve import decode
from tagi_ds.serve.engine import Engine, Request


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int, window_s: float) -> None:
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tagi-serve-engine", daemon=True)
        self.batches = 0
        self.failure: BaseException | None = None  # an error outside any batch: the thread is gone, /health says so

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: Request) -> None:
        self._queue.put(request)
        self.engine.metrics.set("queue_depth", self._queue.qsize())

    def _loop(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                deadline = time.perf_counter() + self.window_s
                while len(batch) < self.max_batch:
                    left = deadline - time.perf_counter()
                    try:
                        nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._run(batch)
                        return
                    batch.append(nxt)
                self.engine.metrics.set("queue_depth", self._queue.qsize())
                self._run(batch)
        except BaseException as err:  # a bug in the loop itself: recorded, /health turns 503
            self.failure = err
            raise

    def _run(self, batch: list[Request]) -> None:
        live = [r for r in batch if not r.cancelled.is_set()]
        try:
            if self.engine.mode == "tagi" and live:
                self.engine.resolve(live)
            for r in live:
                if r.adapter_only:
                    r.emit("done", {"adapter": r.adapter, "cache": r.cache})
            rows = [r for r in live if not r.adapter_only]
            if rows:
                m = self.engine.metrics
                m.observe("batch_size", len(rows))
                m.observe("batch_instructions", len({r.adapter.id if r.adapter else "" for r in rows}))
                decode.run(self.engine, rows)
            self.batches += 1
        except Exception as err:  # a request the engine could not serve: each of the batch's gets the error
            for r in live:
                r.emit("error", err)
        for r in batch:
            if r not in live:
                r.emit("done", {"finish_reason": "cancelled"})
