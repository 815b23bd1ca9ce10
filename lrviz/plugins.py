"""The parts of lrviz that live outside the core, found by name: the desktop app and the plot renderer
(both Qt, in the ui/ folder) are entry points of the group ``lrviz.plugins`` in
``pyproject.toml``. The core never imports or names them; it asks for ``app`` or ``plots`` here.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

GROUP = "lrviz.plugins"


def load_plugin(name: str) -> Any:
    """The object the entry point ``name`` names (``plots``: the renderer module, which registers itself
    with :func:`lrviz.export.use_plot_renderer` when loaded; ``app``: the function that runs the app).

    ImportError when it is not installed or cannot be imported (Qt missing): the caller says what to do.
    """
    found = entry_points(group=GROUP, name=name)
    if not found:
        raise ImportError(f"lrviz's {name!r} component is not installed (reinstall lrviz: pip install -e .)")
    return next(iter(found)).load()
