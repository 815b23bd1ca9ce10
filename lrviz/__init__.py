"""lrviz: a learning-rate laboratory for PyTorch (the core; never imports Qt)."""

__version__ = "0.1.0"
