"""Work-arounds for defects of the Qt binding that would crash a long-running app.

PySide6 6.12.0 on CPython < 3.12: ``SignalInstance.emit()`` returns ``True`` without taking a
reference, so every signal emitted from Python (pyqtgraph emits many per redraw) drops one
reference to ``True``; after a few thousand emits the interpreter aborts with "bool_dealloc:
deallocating True or False". From CPython 3.12 on, ``True``, ``False`` and ``None`` are immortal
and the defect is harmless; here we make them effectively immortal the same way, once, when the
defect is detected.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_PINNED = False
_PIN = 1 << 40  # far more references than any process will drop


def _emit_leaks_true() -> bool:
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        ping = Signal()

    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(8):
        probe.ping.emit()
    after = sys.getrefcount(True)
    probe.deleteLater()
    return after < before


def pin_singletons() -> bool:
    """Detect the defect and, when present, pin True/False/None; True when pinned (idempotent)."""
    global _PINNED
    if _PINNED:
        return True
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return False
    if not _emit_leaks_true():
        return False
    for obj in (True, False, None):
        ctypes.c_ssize_t.from_address(id(obj)).value += _PIN
    _PINNED = True
    log.info("PySide6 signal emit drops references to True; pinned True/False/None (see lrviz.ui._compat)")
    return True


pin_singletons()
