"""2-D surface: Rastrigin's bumpy bowl

A point (x, y) slides down f = x^2 + y^2 + 10 (2 - cos 2 pi x - cos 2 pi y): a wide bowl covered
in bumps, with a local minimum near every point of whole numbers and the global one at (0, 0).

What to try:
1. Train as is (SGD, lr 0.003): it falls into the nearest dip, (2.98, 1.99), loss 12.9, and stays.
   Smaller rates, momentum 0.9, or Adam up to lr 0.5 all stop in the same dip.
2. Set lr 0.014: now the bumps are too sharp for the step (stable only below about 0.005) and the
   point hops from dip to dip and never settles.
3. Keep lr 0.014 and set the schedule CosineAnnealingLR:T_max=2000 before starting: it hops
   while the rate is high and, as the rate decays, settles in the global minimum (0, 0).
   The same from lr 0.012 to 0.016; from 0.005 or below it stays in the first dip, and at 0.018
   the hops grow until the run is stopped as diverged.
4. Try that with other starts, e.g. start_x -2.7, start_y 3.6, or -4.5, -4.5: lr 0.014 with the
   decaying rate still finds (0, 0); lr 0.003 stops in the nearest dip every time.
"""

from lrviz.resources.examples import _surfaces
from lrviz.resources.examples._surfaces import build_data, build_model, compute_loss, probe  # noqa: F401

SURFACES = _surfaces.SURFACES  # every surface: the surface knob chooses among them
SURFACE = SURFACES["rastrigin"]
DEFAULTS = {"lr": 0.003, "optimizer": "sgd", "momentum": 0.0, "steps": 2000, "seed": 0}
#: The choices of the text knobs (for a drop-down list).
PARAM_CHOICES = {"surface": _surfaces.SURFACE_NAMES}
PARAMS = {"surface": "rastrigin", "start_x": 3.2, "start_y": 2.1}
