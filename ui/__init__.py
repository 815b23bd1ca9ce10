"""The Qt layer of lrviz (PySide6 + pyqtgraph). Imports the core, never the other way round."""

from . import _compat  # noqa: F401  (work around a PySide6 6.12 defect before anything emits)
