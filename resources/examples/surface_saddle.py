"""2-D surface: a saddle point

A point (x, y) slides down f = x^2 - y^2 + y^4/4 + 1: a saddle at (0, 0) (uphill along x, downhill
along y), with minima at (0, +-1.41) where the y^4 term stops the fall. It starts at
(-1.8, 0.001), almost exactly on the ridge line, so the push off the saddle is tiny at first.

What to try:
1. Train as is (SGD, lr 0.01): it runs to the saddle and lingers there about 200 steps before it
   slides off to (0, 1.41).
2. Set momentum 0.9: it lingers only about 35 steps. Or switch to Adam (lr 0.03): it never goes
   near the saddle at all; it scales the tiny y slope up and heads diagonally for the minimum.
3. Set lr 0.3: the saddle hardly slows it down (minimum reached in under 20 steps).
4. Set lr 1.0: along x the curvature is 2, and 2 / 2 = 1.0 is the edge of stability: x flips
   between -1.8 and 1.8 every step, and the point ends up jumping between (-1.8, 2) and (1.8, -2)
   forever (loss stuck at 4.24). At lr 1.1 it diverges within 12 steps.
5. Set start_y 0: exactly on the ridge the y gradient is zero and no optimizer ever leaves the
   saddle.
"""

from lrviz.resources.examples import _surfaces
from lrviz.resources.examples._surfaces import build_data, build_model, compute_loss, probe  # noqa: F401

SURFACES = _surfaces.SURFACES  # every surface: the surface knob chooses among them
SURFACE = SURFACES["saddle"]
DEFAULTS = {"lr": 0.01, "optimizer": "sgd", "momentum": 0.0, "steps": 600, "seed": 0}
#: The choices of the text knobs (for a drop-down list).
PARAM_CHOICES = {"surface": _surfaces.SURFACE_NAMES}
PARAMS = {"surface": "saddle", "start_x": -1.8, "start_y": 0.001}
