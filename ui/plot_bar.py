"""The bar above the plots: loss smoothing, log axes, what is shown (``viewing run #3``), Fit."""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QPushButton, QSlider

from . import theme
from .plots import TrainingPlots
from .widgets import ElidedLabel


class PlotBar(QHBoxLayout):
    """Controls of how the plots draw (not of the run): they act on ``plots`` directly."""

    def __init__(self, plots: TrainingPlots):
        super().__init__()
        self.plots = plots
        self.setSpacing(6)
        self.smoothing = QSlider(Qt.Orientation.Horizontal)
        self.smoothing.setObjectName("smoothingSlider")
        self.smoothing.setRange(0, 99)
        self.smoothing.setValue(60)
        self.smoothing.setFixedWidth(90)
        self.smoothing.setToolTip("smoothing of the training loss: a debiased exponential moving average "
                                  "(as in TensorBoard); 0 is off")
        self.smoothing_label = QLabel("smoothing 0.60")
        self.smoothing_label.setMinimumWidth(self.smoothing_label.fontMetrics().horizontalAdvance("smoothing 0.00"))
        self.log_checks: dict[str, QCheckBox] = {}
        self.addWidget(self.smoothing_label)
        self.addWidget(self.smoothing)
        self.addSpacing(6)
        self.addWidget(QLabel("log y:"))
        for plot, text in (("loss", "loss"), ("lr", "LR"), ("grad", "grad")):
            box = QCheckBox(text)
            box.setObjectName(f"log_{plot}")
            box.setToolTip(f"logarithmic y axis for the {text} plot")
            box.setChecked(plots.log_y(plot))
            box.toggled.connect(lambda on, p=plot: plots.set_log_y(p, on))
            self.log_checks[plot] = box
            self.addWidget(box)
        self.view_label = ElidedLabel("")
        self.view_label.setObjectName("viewLabel")
        self.view_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.view_label.setStyleSheet(f"color: {theme.PURPLE};")
        self.addWidget(self.view_label, 1)
        fit = QPushButton("Fit")
        fit.setObjectName("fitButton")
        fit.setToolTip("show all steps and follow new ones (also: the A button in a plot's corner)")
        fit.clicked.connect(plots.reset_view)
        fit.setAutoDefault(False)
        self.addWidget(fit)
        # the slider redraws the whole smoothed history: once it settles, not at every pixel it moves
        self._settle = QTimer(plots)
        self._settle.setSingleShot(True)
        self._settle.setInterval(120)
        self._settle.timeout.connect(self.apply_smoothing)
        self.smoothing.valueChanged.connect(self._on_smoothing_moved)

    def _on_smoothing_moved(self, value: int) -> None:
        self.smoothing_label.setText(f"smoothing {value / 100:.2f}")
        self._settle.start()

    def apply_smoothing(self) -> None:
        """Smooth the loss with the slider's weight now."""
        self.plots.set_smoothing(self.smoothing.value() / 100)
        self.plots.refresh(force=True)
