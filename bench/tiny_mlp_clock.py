"""The benchmark MLP (``tiny_mlp.py``) with a probe that records the monotonic clock at the end of
every step: ``bench/ui_responsiveness.py`` compares it with when the window drew the step."""

import time

from tiny_mlp import DEFAULTS, build_data, build_model, loss_fn  # noqa: F401

DEFAULTS = {**DEFAULTS}


def probe(model):
    return {"clock": time.perf_counter()}
