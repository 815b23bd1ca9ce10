"""2-D surface: Rosenbrock's valley

A point (x, y) slides down f = (1 - x)^2 + 100 (y - x^2)^2, a long curved valley with its minimum at
(1, 1). The steep walls need a small learning rate; the flat floor then takes forever.

What to try:
1. Train as is (SGD, lr 1e-3): the point drops onto the valley floor in a few steps, then crawls
   along it; after 3000 steps it is still short of (1, 1) (about (0.78, 0.61), loss 0.05).
2. Set lr 1e-4: it crawls from the start (still at about (-1.25, 1.57) after 3000 steps).
3. Set lr 0.0018: it zigzags across the valley; 0.002 overshoots clean over the hill to x = 1.2 and
   bounces; 0.0025 diverges in 5 steps (the run stops as diverged).
4. Back to lr 1e-3 with momentum 0.9: it reaches (1, 1) in about 400 steps, swinging wide of the
   floor's curve on the way.
5. Switch to Adam: lr 0.05 reaches (1, 1) in about 700 steps, lr 1e-3 barely moves (Adam's steps
   are about lr long, whatever the slope).
"""

from lrviz.resources.examples import _surfaces
from lrviz.resources.examples._surfaces import build_data, build_model, compute_loss, probe  # noqa: F401

SURFACES = _surfaces.SURFACES  # every surface: the surface knob chooses among them
SURFACE = SURFACES["rosenbrock"]
DEFAULTS = {"lr": 1e-3, "optimizer": "sgd", "momentum": 0.0, "steps": 3000, "seed": 0}
#: The choices of the text knobs (for a drop-down list).
PARAM_CHOICES = {"surface": _surfaces.SURFACE_NAMES}
PARAMS = {"surface": "rosenbrock", "start_x": -1.5, "start_y": 2.0}
