"""Qt made unimportable, as on a machine without PySide6: the core must import, train and store so.

``SOURCE`` is the blocker as code (a child process runs it first: ``python -c SOURCE + code``);
``install()`` blocks Qt in this process. The test command runs the core's tests once this way
(``LRVIZ_TEST_NO_QT=1``, see tests/conftest.py and .ci/test).
"""

from __future__ import annotations

import textwrap

SOURCE = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockQt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('PySide6', 'shiboken6', 'pyqtgraph', 'PyQt5', 'PyQt6') \\
                    or name.startswith('lrviz.ui'):
                raise ImportError(f'{name} is blocked: the core must not import Qt')
            return None

    sys.meta_path.insert(0, BlockQt())
    """
)


def install() -> None:
    """Block Qt (and lrviz.ui) for every later import in this process."""
    exec(SOURCE, {"__name__": "qt_block"})
