"""The store writer: persists an engine's records in batches, off the training thread."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

#: A killed process loses at most this much (plus one flush's duration) of the run.
FLUSH_INTERVAL = 0.5


class StoreWriter:
    """Every ``interval`` seconds, writes the engine's new steps, events and validation points.

    Each flush is one transaction, so the database is intact whenever the process dies.
    """

    def __init__(self, store: Any, run_id: int, engine: Any, interval: float = FLUSH_INTERVAL,
                 start: tuple[int, int, int] = (0, 0, 0)):
        self.store = store
        self.run_id = run_id
        self.engine = engine
        self.interval = interval
        # rows, events and validation points already stored (a resumed run)
        self._steps, self._events, self._vals = start
        self._status = "running"
        self._scalars: dict[str, int] = {}  # points of each extra scalar series already stored
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="lrviz-store-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed.wait(self.interval):
            try:
                self.flush()
            except Exception:  # keep training; the final flush will retry and report
                log.exception("writing the run to the store failed; will retry")

    def flush(self) -> None:
        """Write what is new since the last flush, in one transaction.

        The counters move only after the transaction committed, so a failed flush is retried whole.
        """
        with self._lock:
            eng = self.engine
            store = self.store
            buf = eng.buffer
            n, ne, nv = self._steps, len(eng.events), len(eng.validation)
            status = "paused" if eng.state == "paused" else "running"
            with store.batch():
                if buf is not None and buf.n > self._steps:
                    n = buf.n
                    view = buf.view(self._steps, n)
                    first = int(view.pop("step")[0])
                    store.append_steps(self.run_id, first, view)
                if ne > self._events:
                    store.add_events(self.run_id, eng.events[self._events:ne])
                if nv > self._vals:
                    store.add_validation(self.run_id, eng.validation[self._vals:nv])
                scalars = getattr(eng, "scalars", None)
                written = {}
                for name, (steps, values, times) in list((scalars or {}).items()):
                    k, done = len(steps), self._scalars.get(name, 0)
                    if k > done:
                        store.add_scalars(self.run_id, name, steps[done:k], values[done:k], times[done:k])
                        written[name] = k
                if status != self._status:
                    store.set_status(self.run_id, status)
                store.heartbeat(self.run_id)
            self._steps, self._events, self._vals, self._status = n, ne, nv, status
            self._scalars.update(written)
        if buf is not None:
            buf.seal()  # stored chunks are kept compressed in memory too (off the training thread)

    def close(self, state: str, summary: dict[str, Any], error: str | None) -> None:
        """Stop the thread, write the rest and the final status."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
        self.store.set_status(self.run_id, state, error=error, summary=summary)
