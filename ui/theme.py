"""Colours, pens and pyqtgraph defaults shared by the app's plots (dark on light, colour-blind safe)."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtGui import QColor

# Okabe & Ito's palette: distinguishable with every common colour-vision deficiency.
BLACK = "#000000"
ORANGE = "#E69F00"
SKY_BLUE = "#56B4E9"
GREEN = "#009E73"
YELLOW = "#F0E442"
BLUE = "#0072B2"
VERMILLION = "#D55E00"
PURPLE = "#CC79A7"
GREY = "#777777"

BACKGROUND = "#FFFFFF"
FOREGROUND = "#222222"
GRID_ALPHA = 0.15

#: The live (or opened) run's series.
LOSS_RAW = SKY_BLUE
LOSS_SMOOTH = BLUE
VAL_LOSS = VERMILLION
ACCURACY = GREEN
GRAD_NORM = PURPLE
#: One colour per param group of the learning-rate plot.
LR_GROUPS = (GREEN, BLUE, ORANGE, PURPLE, VERMILLION, SKY_BLUE)
#: Overlaid runs compared on their own, in order (no yellow: too faint on white).
OVERLAYS = (BLUE, ORANGE, GREEN, PURPLE, BLACK, VERMILLION, SKY_BLUE)
#: Overlaid on a live run: avoid the live run's own blues, vermillion and green.
OVERLAYS_ON_LIVE = (ORANGE, BLACK, PURPLE, GREY)

#: Event markers: colour and whether the line is dashed.
EVENT_STYLE: dict[str, tuple[str, bool]] = {
    "set_lr": (BLUE, False),
    "set_schedule": (GREEN, False),
    "set_hyperparams": (PURPLE, False),
    "lr_reduced": (GREEN, True),
    "pause": (GREY, True),
    "diverged": (VERMILLION, False),
    "error": (VERMILLION, False),
    "stop": (GREY, True),
    "rejected": (VERMILLION, True),
}

ERROR_COLOUR = VERMILLION
ERROR_STYLE = f"border: 1px solid {VERMILLION}; background: #FFF3EC;"


def configure_pyqtgraph() -> None:
    """Global pyqtgraph options: white background, dark text, antialiased lines."""
    pg.setConfigOptions(background=BACKGROUND, foreground=FOREGROUND, antialias=True)


def colour(hex_colour: str, alpha: int = 255) -> QColor:
    c = QColor(hex_colour)
    c.setAlpha(alpha)
    return c


def pen(hex_colour: str, width: float = 1.5, alpha: int = 255, dashed: bool = False) -> object:
    from PySide6.QtCore import Qt

    p = pg.mkPen(colour(hex_colour, alpha), width=width)
    if dashed:
        p.setStyle(Qt.PenStyle.DashLine)
    p.setCosmetic(True)
    return p


def panel_colour(key: str) -> str:
    """The colour a run's own curve takes in a panel of one per-step column (grey for a panel with none of its own)."""
    return {"grad": GRAD_NORM}.get(key, GREY)
