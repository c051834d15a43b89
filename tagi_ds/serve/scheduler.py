"""The one engine thread: requests that arrive within ``--batch_window_ms`` of the first waiting one (at most
``--max_batch``) are decoded together, whatever their instructions; batches that start while others run decode
beside them, their steps interleaved.

Every forward runs on this thread (the adapted layers share one adapter slot, so forwards must not interleave
*within* a step); the HTTP event loop only queues requests and reads their events. A batch first resolves its
adapters (the new instructions of the batch in one hypernetwork forward), then decodes a step at a time. While
batches run, the requests that are waiting at a step boundary start a new batch at once (no window: the running
ones would stall) whenever fewer than ``--max_batch`` rows are running (rows are capped, not batches): so a short
request never waits for a long one to end, only for free rows. Rows of different batches are not merged into one
forward (each batch keeps its own KV cache). Adapter-only requests (``POST /v1/adapters``) ride in the same
batches. An error in a batch is sent to its requests and the thread goes on; a batch that cannot be built
(resolved, laid out, prefilled) is built again one request at a time, so only the request that fails alone gets
the error.
"""

from __future__ import annotations

import queue
import threading
import time

from tagi_ds.serve.decode import Decoding
from tagi_ds.serve.engine import Engine, Request


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int, window_s: float) -> None:
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tagi-serve-engine", daemon=True)
        self.batches = 0
        self.failure: BaseException | None = None  # an error outside any batch: the thread is gone, /health says so
        self._stopping = False
        self._depth = threading.Lock()
        self.running: list[Decoding] = []  # the batches decoding now (the engine thread's; read by tests)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Requests queued, not yet in a batch."""
        return self._queue.qsize()

    def submit(self, request: Request) -> None:
        with self._depth:
            self._queue.put(request)
            self._count_waiting()

    def _count_waiting(self) -> None:
        # under self._depth: a put and its gauge update are one step, so the engine thread's update after a take
        # cannot land after a newer put's and leave the gauge at 0 while a request waits
        self.engine.metrics.set("queue_depth", self._queue.qsize())

    def _take(self, limit: int, wait_s: float | None) -> list[Request]:
        """Up to ``limit`` waiting requests: the first blocking (``wait_s`` None: none waits, take what is there),
        the others within ``wait_s`` of it."""
        batch: list[Request] = []
        if wait_s is not None:
            first = self._queue.get()
            if first is None:
                self._stopping = True
                return batch
            batch.append(first)
        deadline = time.perf_counter() + (wait_s or 0.0)
        while len(batch) < limit:
            left = deadline - time.perf_counter()
            try:
                nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._stopping = True
                break
            batch.append(nxt)
        with self._depth:
            self._count_waiting()
        return batch

    def _loop(self) -> None:
        running = self.running
        try:
            while not self._stopping:
                room = self.max_batch - sum(d.running for d in running)
                if not running:
                    batch = self._take(self.max_batch, self.window_s)
                elif room > 0:  # rows, not batches, are capped: a newcomer starts whenever a row is free
                    batch = self._take(room, None)
                else:
                    batch = []
                if batch:
                    running += self._start(batch)
                for d in list(running):
                    try:
                        finished = d.step()
                    except Exception as err:  # this batch's requests get the error; the others go on
                        d.fail(err)
                        finished = True
                    if finished:
                        running.remove(d)
                        self.batches += 1
        except BaseException as err:  # a bug in the loop itself: recorded, /health turns 503
            self.failure = err
            raise

    def _start(self, batch: list[Request]) -> list[Decoding]:
        """Resolve the batch's adapters, answer its adapter-only requests, prefill the rest: their decodings (one;
        or, when building the batch failed, one per request that builds alone: a request the engine cannot serve
        gets its error, not its batch-mates)."""
        live = [r for r in batch if not r.cancelled.is_set()]
        for r in batch:
            if r not in live:  # its client left while it waited: counted as a cancel, as a row's is
                self.engine.metrics.inc("requests_cancelled_total")
                r.emit("done", {"finish_reason": "cancelled"})
        if not live:
            return []
        try:
            return self._build(live)
        except Exception as err:
            if len(live) == 1:
                live[0].emit("error", err)
                return []
        started = []
        for r in live:  # one at a time: only the request that fails alone gets the error
            try:
                started += self._build([r])
            except Exception as err:
                r.emit("error", err)
        return started

    def _build(self, live: list[Request]) -> list[Decoding]:
        if self.engine.generates:
            self.engine.resolve(live)
        rows = [r for r in live if not r.adapter_only]
        decoding = None
        if rows:
            decoding = Decoding(self.engine, rows)
            decoding.prefill()
        for r in live:  # answered only once the whole batch is built: a fallback must not answer them twice
            if r.adapter_only:
                r.emit("done", {"adapter": r.adapter, "cache": r.cache})
        if decoding is None:
            self.batches += 1
            return []
        m = self.engine.metrics
        m.observe("batch_size", len(rows))
        m.observe("batch_instructions", len({r.adapter.id if r.adapter else "" for r in rows}))
        return [decoding]
