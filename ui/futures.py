"""Futures that complete in other threads (a worker's answer, a run's ack), handed to the GUI thread.

A :class:`concurrent.futures.Future` calls its done-callbacks in whatever thread completes it (a
worker's pipe reader, a live connection's reader). Widgets may only be touched on the GUI thread,
so :meth:`GuiFutures.when_done` queues the callback into the Qt event loop instead of calling it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal

log = logging.getLogger(__name__)


class GuiFutures(QObject):
    """Runs ``fn(future)`` on the GUI thread once ``future`` is done (always later, never inline)."""

    _done = Signal(object, object)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._done.connect(self._call, Qt.ConnectionType.QueuedConnection)
        self.pending = 0

    def when_done(self, future: Future, fn: Callable[[Future], Any]) -> None:
        self.pending += 1

        def relay(f: Future) -> None:
            try:
                self._done.emit(f, fn)
            except RuntimeError:  # the window is gone: nobody to tell
                pass

        future.add_done_callback(relay)

    def _call(self, future: Future, fn: Callable[[Future], Any]) -> None:
        self.pending -= 1
        try:
            fn(future)
        except Exception:  # one handler's bug must not take the app down
            log.exception("handling an answer failed")
