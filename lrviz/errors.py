"""The few named exceptions every user-facing failure is raised as.

Each carries a message a person can act on; the CLI prints it (no traceback unless
``--debug``) and the app shows it in a dialog with the traceback behind "details".
"""

from __future__ import annotations


class LrvizError(Exception):
    """Base of every error lrviz reports to a person."""

    exit_status = 1


class ScriptError(LrvizError):
    """The experiment script failed to load, lacks a name, or returned the wrong thing.

    ``path`` and ``line`` point at the place in the user's script when known.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        self.detail = message
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        super().__init__(where + message)


class ConfigError(LrvizError):
    """A setting (learning rate, schedule text, optimizer name, path...) is invalid."""


class StoreError(LrvizError):
    """The run store cannot be opened or does not hold what was asked for.

    ``kind`` says why when it is one of the store's conditions: ``"busy"`` (another writer held the
    lock too long), ``"damaged"`` (not a database, or a malformed one), ``"read-only"`` (it cannot be
    written); None otherwise.
    """

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind


class UsageError(LrvizError):
    """The command line names no known command; exit status 2, as argparse's usage errors."""

    exit_status = 2


class DivergedError(LrvizError):
    """Training was stopped because the loss or the gradients became non-finite or exploded."""

    exit_status = 2
