"""Shared code of the 2-D loss-surface examples (``surface_*.py``): a point descending a function.

The model is nothing but a point ``(x, y)`` (one ``nn.Parameter`` of shape (2,)); the loss is the
function's value there, so every step is one full-gradient step and the path the point takes is
what the learning rate, momentum and the optimizer do, without any data noise.

Each surface script exports, besides the script contract:

- ``SURFACE``: ``{"fn", "xlim", "ylim", "minima", "name", "start", "log_levels"}`` for the app's
  contour view, where ``fn(x, y)`` works elementwise on tensors (grids), ``minima`` lists the
  points to mark, ``start`` is the default starting point and ``log_levels`` says the values span
  decades (draw log-spaced contour levels);
- ``SURFACES``: every surface by name, so the contour can follow the ``surface`` knob;
- ``probe(model) -> {"x": ..., "y": ...}``: the point now, for drawing the trajectory live.

Files starting with ``_`` are not listed as examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rosenbrock(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rosenbrock's banana: a long curved valley with its floor at (1, 1); 0 there."""
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def himmelblau(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Himmelblau's function: four minima of value 0 around a hill."""
    return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2


def saddle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x^2 - y^2 near the origin (a saddle), bounded by y^4/4: minima (0, +-sqrt 2) of value 0."""
    return x**2 - y**2 + y**4 / 4 + 1


RASTRIGIN_A = 10.0


def rastrigin(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rastrigin's function: a bowl covered in bumps, a local minimum near every integer point; 0 at (0, 0)."""
    two_pi = 2 * math.pi
    return (x**2 + y**2 + RASTRIGIN_A * (2 - torch.cos(two_pi * x) - torch.cos(two_pi * y)))


#: Every surface: its function, the view for the contour plot, its minima, a starting point.
SURFACES: dict[str, dict[str, Any]] = {
    "rosenbrock": {
        "name": "Rosenbrock's valley",
        "fn": rosenbrock, "xlim": (-2.0, 2.0), "ylim": (-1.0, 3.0),
        "minima": [(1.0, 1.0)], "start": (-1.5, 2.0), "log_levels": True,
    },
    "himmelblau": {
        "name": "Himmelblau's four minima",
        "fn": himmelblau, "xlim": (-5.0, 5.0), "ylim": (-5.0, 5.0),
        "minima": [(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)],
        "start": (-0.3, -0.9), "log_levels": True,
    },
    "saddle": {
        "name": "A saddle point",
        "fn": saddle, "xlim": (-2.0, 2.0), "ylim": (-2.0, 2.0),
        "minima": [(0.0, math.sqrt(2.0)), (0.0, -math.sqrt(2.0))], "start": (-1.8, 0.001),
        "log_levels": False,
    },
    "rastrigin": {
        "name": "Rastrigin's bumpy bowl",
        "fn": rastrigin, "xlim": (-5.12, 5.12), "ylim": (-5.12, 5.12),
        "minima": [(0.0, 0.0)], "start": (3.2, 2.1), "log_levels": False,
    },
}
SURFACE_NAMES = tuple(SURFACES)


class Point(nn.Module):
    """A point ``(x, y)`` on a surface: the whole model. ``model()`` is the surface's value there."""

    def __init__(self, fn: Fn, x: float, y: float):
        super().__init__()
        self.fn = fn
        self.xy = nn.Parameter(torch.tensor([float(x), float(y)]))

    def forward(self) -> torch.Tensor:
        return self.fn(self.xy[0], self.xy[1])


def check_surface(surface: Any) -> str:
    """The surface name, or a ValueError naming the knob and the choices."""
    if surface not in SURFACES:
        raise ValueError(f"surface must be one of {', '.join(map(repr, SURFACE_NAMES))}, not {surface!r}")
    return surface


def check_coordinate(value: Any, knob: str, surface: str) -> float:
    """A finite starting coordinate inside a generous box around the surface's view."""
    if isinstance(value, bool):
        raise ValueError(f"{knob} must be a number, not {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{knob} must be a number, not {value!r}") from None
    lim = SURFACES[surface]["xlim" if knob.endswith("x") else "ylim"]
    span = lim[1] - lim[0]
    lo, hi = lim[0] - span, lim[1] + span
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{knob} must be a number between {lo:g} and {hi:g} for the {surface} surface, "
                         f"not {value!r}")
    return v


def build_model(surface: str = "rosenbrock", start_x: float | None = None, start_y: float | None = None) -> Point:
    """The point, at ``(start_x, start_y)`` (default: the surface's own start) on ``surface``."""
    surface = check_surface(surface)
    sx, sy = SURFACES[surface]["start"]
    x = sx if start_x is None else check_coordinate(start_x, "start_x", surface)
    y = sy if start_y is None else check_coordinate(start_y, "start_y", surface)
    return Point(SURFACES[surface]["fn"], x, y)


def build_data(surface: str = "rosenbrock") -> list[torch.Tensor]:
    """One dummy batch: an epoch is one full-gradient step."""
    check_surface(surface)
    return [torch.zeros(1)]


def compute_loss(model: Point, batch: Any) -> torch.Tensor:
    """The surface's value at the point (the batch carries nothing)."""
    return model()


def probe(model: Point) -> dict[str, float]:
    """Where the point is now: ``{"x": ..., "y": ...}`` (recorded every step to draw the path)."""
    x, y = model.xy.detach().cpu().tolist()
    return {"x": x, "y": y}

