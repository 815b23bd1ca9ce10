"""2-D surface: Himmelblau's four minima

A point (x, y) slides down f = (x^2 + y - 11)^2 + (x + y^2 - 7)^2, which has four minima of value
0 around a hill. Which one the point ends in depends on the learning rate and the optimizer.

What to try:
1. Train as is (SGD, lr 0.01, start (0.5, -0.5)): it settles in the minimum at (3.58, -1.85)
   within about 60 steps.
2. Set lr 0.012 or 0.02: the first steps overshoot further and it settles in a different
   minimum, (3, 2); lr 1e-3 takes 400 steps to reach (3.58, -1.85).
3. Set lr 0.025: it keeps bouncing between the walls and never settles (loss stays above 1);
   at 0.05 it diverges within a few steps.
4. Switch to Adam (lr 0.05): it heads for (3, 2) in a straighter line, since Adam moves every
   coordinate by about lr whatever its slope.
5. Move the start to start_x -0.3, start_y -0.9 (near the hilltop): SGD rolls to (-3.78, -3.28),
   Adam to (-2.81, 3.13).
"""

from lrviz.resources.examples import _surfaces
from lrviz.resources.examples._surfaces import build_data, build_model, compute_loss, probe  # noqa: F401

SURFACES = _surfaces.SURFACES  # every surface: the surface knob chooses among them
SURFACE = SURFACES["himmelblau"]
DEFAULTS = {"lr": 0.01, "optimizer": "sgd", "momentum": 0.0, "steps": 500, "seed": 0}
#: The choices of the text knobs (for a drop-down list).
PARAM_CHOICES = {"surface": _surfaces.SURFACE_NAMES}
PARAMS = {"surface": "himmelblau", "start_x": 0.5, "start_y": -0.5}
