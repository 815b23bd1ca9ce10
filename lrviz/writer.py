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

    def __init__(self, store: Any, run_id: int, engine: Any, interval: float = FLUSH_INTERVAL):
        self.store = store
        self.run_id = run_id
        self.engine = engine
        self.interval = interval
        self._steps = 0
        self._events = 0
        self._vals = 0
        self._status = "running"
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
        """Write what is new since the last flush, in one transaction."""
        with self._lock:
            eng = self.engine
            store = self.store
            buf = eng.buffer
            with store.batch():
                if buf is not None:
                    n = buf.n
                    if n > self._steps:
                        view = buf.view(self._steps, n)
                        first = int(view.pop("step")[0])
                        store.append_steps(self.run_id, first, view)
                        self._steps = n
                ne = len(eng.events)
                if ne > self._events:
                    store.add_events(self.run_id, eng.events[self._events:ne])
                    self._events = ne
                nv = len(eng.validation)
                if nv > self._vals:
                    store.add_validation(self.run_id, eng.validation[self._vals:nv])
                    self._vals = nv
                status = "paused" if eng.state == "paused" else "running"
                if status != self._status:
                    store.set_status(self.run_id, status)
                    self._status = status
                store.heartbeat(self.run_id)

    def close(self, state: str, summary: dict[str, Any], error: str | None) -> None:
        """Stop the thread, write the rest and the final status."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
        self.store.set_status(self.run_id, state, error=error, summary=summary)
