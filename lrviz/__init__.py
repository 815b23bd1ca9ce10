"""lrviz: a learning-rate laboratory for PyTorch (the core; never imports Qt)."""

__version__ = "0.1.0"

__all__ = ["StopTraining", "TrackedRun", "track"]


def __getattr__(name: str):  # lrviz.track without importing torch for `import lrviz`
    if name in __all__:
        from . import tracking as _tracking

        return getattr(_tracking, name)
    raise AttributeError(f"module 'lrviz' has no attribute {name!r}")
