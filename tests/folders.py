"""A folder the test's user cannot write into, for the tests of what happens then."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: Skips a test where permissions do not stop a write (not POSIX, or root).
needs_permissions = pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                                       reason="needs file permissions to apply (not root, POSIX)")


@contextmanager
def read_only_folder(parent: Path) -> Iterator[Path]:
    """``parent/ro``, readable but not writable in the block; writable again after it (so it can be removed)."""
    folder = parent / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        yield folder
    finally:
        folder.chmod(0o700)
