"""Micro-batching: concurrent requests' classifier inputs share one forward pass.

`BatchingEngine` wraps a classifier engine. Each `logits(batch)` call (one row for a single-pill photo, K rows
for the K crops of a combination photo) is queued. A caller that finds no pass running leads: it runs the pass
itself, in its own thread, over everything queued (up to max_rows rows). Callers that arrive meanwhile wait; when
the pass ends, the first of them leads the next pass over all of them. So a lone request never waits for
anything (no hand-off to another thread), and under load requests share passes, which raises throughput.
"""
from __future__ import annotations

import threading
from typing import List, Optional

import numpy as np


class _Call:
    __slots__ = ("batch", "out", "error", "done", "lead")

    def __init__(self, batch: np.ndarray):
        self.batch, self.out, self.error = batch, None, None
        self.done, self.lead = threading.Event(), False


class BatchingEngine:
    def __init__(self, engine, max_rows: int = 32):
        self.engine, self.name = engine, engine.name
        self.max_rows = max(1, max_rows)
        self._queue: List[_Call] = []
        self._lock = threading.Lock()
        self._running = False
        self.passes = 0  # forward passes run; fewer than calls means passes were shared
        self.calls = 0

    @property
    def runs_on(self) -> str:
        return self.engine.runs_on

    def logits(self, batch: np.ndarray) -> np.ndarray:
        call = _Call(batch)
        with self._lock:
            self._queue.append(call)
            self.calls += 1
            call.lead, self._running = not self._running, True
        if not call.lead:
            call.done.wait()  # woken with a result (served), or to lead the next pass
        if call.lead:
            while call.out is None and call.error is None:
                self._run_pass()
            self._hand_over()
        if call.error is not None:
            raise call.error
        return call.out

    def _run_pass(self) -> None:
        with self._lock:
            taken, rows = [], 0
            while self._queue and (not taken or rows + len(self._queue[0].batch) <= self.max_rows):
                taken.append(self._queue.pop(0))
                rows += len(taken[-1].batch)
        error: Optional[BaseException] = None
        try:
            out = self.engine.logits(np.concatenate([c.batch for c in taken]))
        except Exception as e:  # noqa: BLE001 - every caller of this pass gets the model's error
            error = e
        self.passes += 1
        start = 0
        for c in taken:
            if error is None:
                c.out = out[start:start + len(c.batch)]
                start += len(c.batch)
            else:
                c.error = error
            if not c.lead:
                c.done.set()

    def _hand_over(self) -> None:
        """The leader's own answer is in: the first waiting caller leads the next pass, or nobody runs."""
        with self._lock:
            if self._queue:
                self._queue[0].lead = True
                self._queue[0].done.set()
            else:
                self._running = False
