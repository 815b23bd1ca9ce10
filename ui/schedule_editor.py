"""The schedule picker: every schedule of :data:`lrviz.schedules.SCHEDULES`, a form for its
arguments built from their :class:`~lrviz.schedules.ArgInfo`, the spec text, and a preview of
the learning rate over the coming steps."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from lrviz.errors import ConfigError, LrvizError
from lrviz.schedules import SCHEDULES, ArgInfo, ScheduleSpec, parse_schedule

from . import theme
from .axes import StepAxis, ValueAxis
from .widgets import ErrorLabel, ValidatedLineEdit, breakable, format_number, row_layout

#: Arguments lrviz only accepts at one value: not worth a field.
_HIDDEN_ARGS = {"cycle_momentum"}
PREVIEW_MAX = 1_000_000  # steps ahead shown at most
PREVIEW_DEFAULT = 1000  # steps ahead when the run's length is not known
PREVIEW_POINTS = 400  # points drawn


def _parse_kind(kind: Any, name: str):  # noqa: ANN202 - returns a parser
    def parse(text: str) -> Any:
        try:
            if kind is int:
                return int(text)
            if kind is float:
                return float(text)
            if kind in ("list[int]", "list[float]"):
                conv = int if kind == "list[int]" else float
                return [conv(p) for p in text.split(";") if p.strip()]
        except ValueError:
            what = {int: "a whole number", float: "a number", "list[int]": "whole numbers separated by ';'",
                    "list[float]": "numbers separated by ';'"}[kind]
            raise ConfigError(f"{name} must be {what}, not {text!r}") from None
        return text

    return parse


def suggest_args(name: str, remaining: int | None, lr: float) -> dict[str, str]:
    """Sensible starting values for a schedule's required arguments, from the steps left and the rate."""
    total = max(1, remaining or 1000)
    lr = lr if lr and math.isfinite(lr) else 0.01
    r = {
        "warmup": {"steps": str(max(1, total // 20))},
        "StepLR": {"step_size": str(max(1, total // 4)), "gamma": "0.5"},
        "MultiStepLR": {"milestones": f"{max(1, total // 2)};{max(2, total * 3 // 4)}"},
        "ExponentialLR": {"gamma": f"{math.exp(math.log(0.01) / total):.6g}"},
        "CosineAnnealingLR": {"T_max": str(total)},
        "CosineAnnealingWarmRestarts": {"T_0": str(max(1, total // 4))},
        "CyclicLR": {"base_lr": format_number(lr / 10), "max_lr": format_number(lr),
                     "step_size_up": str(max(1, total // 8))},
        "OneCycleLR": {"max_lr": format_number(lr * 10), "total_steps": str(total)},
        "LinearLR": {"total_iters": str(max(1, total // 10))},
        "PolynomialLR": {"total_iters": str(total)},
        "ReduceLROnPlateau": {"factor": "0.5", "patience": "3"},
    }
    return r.get(name, {})


class ArgsForm(QWidget):
    """A schedule combo box and the form of the chosen schedule's arguments."""

    changed = Signal()

    def __init__(self, names: list[str], parent: QWidget | None = None):
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setObjectName("scheduleCombo")
        for n in names:
            self.combo.addItem("constant (no schedule)" if n == "constant" else n, n)
            self.combo.setItemData(self.combo.count() - 1, SCHEDULES[n].doc, Qt.ItemDataRole.ToolTipRole)
        self.form = QFormLayout()
        self.form.setContentsMargins(0, 0, 0, 0)
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.form.setLabelAlignment(Qt.AlignmentFlag.AlignRight)
        self.fields: dict[str, Any] = {}
        self.infos: dict[str, ArgInfo] = {}
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(3)
        lay.addWidget(self.combo)
        lay.addLayout(self.form)
        self.combo.currentIndexChanged.connect(self._on_schedule_picked)
        self._context: tuple[int | None, float] = (None, 0.01)
        self._building = False
        self._build(self.name())

    def name(self) -> str:
        return str(self.combo.currentData())

    def set_context(self, remaining: int | None, lr: float) -> None:
        self._context = (remaining, lr)

    def _on_schedule_picked(self, _index: int) -> None:
        self._build(self.name())
        self.changed.emit()

    def _build(self, name: str, values: dict[str, str] | None = None) -> None:
        self._building = True
        while self.form.rowCount():
            self.form.removeRow(0)
        self.fields.clear()
        self.infos.clear()
        info = SCHEDULES[name]
        self.combo.setToolTip(info.doc)
        if values is None:
            values = suggest_args(name, *self._context)
        for arg in info.args:
            if arg.name in _HIDDEN_ARGS:
                continue
            self.infos[arg.name] = arg
            text = values.get(arg.name)
            if arg.kind is bool:
                w: Any = QCheckBox()
                w.setChecked(bool(arg.default) if text is None else text.lower() in ("true", "1", "yes"))
                w.toggled.connect(self._on_field_changed)
            elif arg.choices:
                w = QComboBox()
                w.addItems([str(c) for c in arg.choices])
                w.setCurrentText(str(arg.default) if text is None else text)
                w.currentIndexChanged.connect(self._on_field_changed)
            else:
                if arg.default is None:
                    placeholder = "required" if arg.required else "auto"
                else:
                    placeholder = format_number(arg.default, 6) if isinstance(arg.default, float) else str(
                        arg.default)
                w = ValidatedLineEdit(_parse_kind(arg.kind, arg.name), text or "", allow_empty=not arg.required,
                                      placeholder=placeholder, tooltip=arg.help)
                w.textChanged.connect(self._on_field_changed)
            w.setObjectName(f"arg_{arg.name}")
            w.setToolTip(arg.help)
            label = QLabel(arg.name + ("*" if arg.required else ""))
            label.setToolTip(arg.help)
            self.form.addRow(label, w)
            self.fields[arg.name] = w
        self._building = False

    def _on_field_changed(self, *_: object) -> None:
        if not self._building:
            self.changed.emit()

    def text(self) -> str:
        """This part of the spec (``Name:arg=value,...``), from the fields that are set."""
        name = self.name()
        args = []
        for key, w in self.fields.items():
            info = self.infos[key]
            if isinstance(w, QCheckBox):
                if w.isChecked() != bool(info.default):
                    args.append(f"{key}={'true' if w.isChecked() else 'false'}")
            elif isinstance(w, QComboBox):
                if w.currentText() != str(info.default):
                    args.append(f"{key}={w.currentText()}")
            else:
                t = w.text().strip()
                if t:
                    args.append(f"{key}={t}")
        return name + (":" + ",".join(args) if args else "")

    def load(self, spec: ScheduleSpec) -> None:
        """Show ``spec``'s name and arguments."""
        self.combo.blockSignals(True)
        self.combo.setCurrentIndex(max(0, self.combo.findData(spec.name)))
        self.combo.blockSignals(False)
        values = {}
        for k, v in spec.args:
            if isinstance(v, tuple):
                values[k] = ";".join(format_number(x, 10) if isinstance(x, float) else str(x) for x in v)
            elif isinstance(v, bool):
                values[k] = "true" if v else "false"
            elif isinstance(v, float):
                values[k] = format_number(v, 10)
            else:
                values[k] = str(v)
        self._build(spec.name, values)

    def mark_error(self, message: str) -> bool:
        """Put ``message`` on the field it names; False when it names none."""
        for key, w in self.fields.items():
            if isinstance(w, ValidatedLineEdit) and re.search(rf"\b{re.escape(key)}\b", message):
                w.set_error(message)
                return True
        return False

    def clear_errors(self) -> None:
        """Forget errors put on fields by :meth:`mark_error` (their own parse errors stay)."""
        for w in self.fields.values():
            if isinstance(w, ValidatedLineEdit):
                w.set_error(None)

    def field_error(self) -> str | None:
        for w in self.fields.values():
            if isinstance(w, ValidatedLineEdit) and w.error():
                return w.error()
        return None


def preview_y_range(values: np.ndarray) -> tuple[float, float]:
    """The rate axis of the preview: from 0 (a rate's natural floor) to a little above the highest
    rate, so a constant rate is a flat line near the top, never centred on an axis around it."""
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    bottom = min(0.0, float(finite.min())) if finite.size else 0.0
    if top <= bottom:
        top = bottom + (abs(bottom) or 1e-3)
    return bottom, top + 0.12 * (top - bottom)


class ScheduleEditor(QWidget):
    """Pick a schedule, fill its arguments (or type the spec), preview it, apply it.

    ``applyRequested(str)`` carries the canonical spec text ("" for no schedule). The owner calls
    :meth:`set_context` with the current rates and the steps left so the preview and the suggested
    arguments fit the run, and :meth:`set_status` to say what is in force.
    """

    applyRequested = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        names = list(SCHEDULES)
        self.main = ArgsForm(names)
        self.then_label = QLabel("then")
        self.then = ArgsForm([n for n in names if n not in ("warmup", "ReduceLROnPlateau")])
        self.then.combo.setObjectName("thenCombo")
        self.spec_edit = ValidatedLineEdit(self._parse_text, "constant", tooltip=(
            "the schedule as text, e.g. StepLR:step_size=100,gamma=0.5 or warmup:steps=100+CosineAnnealingLR:T_max=900"))
        self.spec_edit.setObjectName("specEdit")
        self.errors = ErrorLabel()
        self.errors.watch(self.spec_edit)
        self.doc = QLabel()
        self.doc.setWordWrap(True)
        self.doc.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.doc.setStyleSheet(f"color: {theme.GREY}; font-size: 8pt;")
        self.preview = pg.PlotWidget(background=theme.BACKGROUND,
                                     axisItems={"left": ValueAxis("left"), "bottom": StepAxis("bottom")})
        self.preview.setObjectName("schedulePreview")
        self.preview.setFixedHeight(105)
        self.preview.setMenuEnabled(False)
        self.preview.setMouseEnabled(False, False)
        self.preview.hideButtons()
        self.preview.showGrid(x=True, y=True, alpha=theme.GRID_ALPHA)
        for side in ("left", "bottom"):
            ax = self.preview.getAxis(side)
            ax.setStyle(tickFont=self.font(), tickTextOffset=2)
        self.preview.getAxis("left").setWidth(46)
        self.preview.getAxis("bottom").setHeight(20)
        self._preview_curve = self.preview.plot([], [], pen=theme.pen(theme.GREEN, 1.8))
        self.apply_button = QPushButton("Apply schedule")
        self.apply_button.setObjectName("applySchedule")
        self.apply_button.setAutoDefault(False)
        self.clear_button = QPushButton("None")
        self.clear_button.setObjectName("clearSchedule")
        self.clear_button.setToolTip("no schedule: keep the current rate")
        self.clear_button.setAutoDefault(False)
        self.status = QLabel("")
        self.status.setObjectName("scheduleStatus")
        self.status.setWordWrap(True)
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(4)
        lay.addWidget(self.main)
        lay.addWidget(self.doc)
        then_box = QWidget()
        then_lay = QVBoxLayout(then_box)
        then_lay.setContentsMargins(12, 0, 0, 0)
        then_lay.addWidget(self.then_label)
        then_lay.addWidget(self.then)
        self._then_box = then_box
        lay.addWidget(then_box)
        lay.addLayout(row_layout(QLabel("spec"), self.spec_edit, grow=self.spec_edit))
        lay.addWidget(self.errors)
        lay.addWidget(self.preview)
        lay.addLayout(row_layout(self.apply_button, self.clear_button, grow=self.apply_button))
        lay.addWidget(self.status)

        self._lrs: list[float] = [0.01]
        self._start_step = 0
        self._remaining: int | None = None
        self._syncing = False
        self.main.changed.connect(self._on_form_changed)
        self.then.changed.connect(self._on_form_changed)
        self.spec_edit.textEdited.connect(self._on_text_edited)
        self.apply_button.clicked.connect(self._on_apply)
        self.clear_button.clicked.connect(self._on_clear)
        self._on_form_changed()

    # ---- context --------------------------------------------------------------------------------
    def set_context(self, lrs: list[float], start_step: int = 0, remaining: int | None = None) -> None:
        """The rates the schedule would start from, at which step, and how many steps are left."""
        lrs = [float(x) for x in lrs] or [0.01]
        if lrs == self._lrs and start_step == self._start_step and remaining == self._remaining:
            return
        self._lrs = lrs
        self._start_step = start_step
        self._remaining = remaining
        for form in (self.main, self.then):
            form.set_context(remaining, lrs[0])
        self.spec_edit.set_parser(self._parse_text)  # per-group values depend on the groups
        self._validate()

    def set_status(self, text: str) -> None:
        self.status.setText(breakable(text))
        self.status.setToolTip(text)

    # ---- spec text ---------------------------------------------------------------------------------
    def _parse_text(self, text: str) -> ScheduleSpec:
        spec = parse_schedule(text)
        if spec.name != "constant":
            spec.bind(self._lrs)  # per-group values must match the groups
        return spec

    def text(self) -> str:
        """The spec typed or built in the form (may be invalid; see :meth:`spec`)."""
        return self.spec_edit.text().strip()

    def spec(self) -> str | None:
        """The canonical spec text, None for no schedule; raises ConfigError when invalid."""
        spec = self.spec_edit.value()
        return None if spec.name == "constant" else str(spec)

    def set_spec(self, text: str | None) -> None:
        """Show ``text`` (None: no schedule) in the form and the text field."""
        self.spec_edit.setText(text or "constant")
        self.spec_edit.setCursorPosition(0)
        self._on_text_edited(text or "constant")

    def _form_text(self) -> str:
        t = self.main.text()
        if self.main.name() == "warmup" and self.then.name() != "constant":
            t += "+" + self.then.text()
        return t

    def _on_form_changed(self) -> None:
        if self._syncing:
            return
        self._then_box.setVisible(self.main.name() == "warmup")
        self.doc.setText(SCHEDULES[self.main.name()].doc)
        self._syncing = True
        try:
            self.spec_edit.setText(self._form_text())
            self.spec_edit.setCursorPosition(0)  # show the schedule's name, not the end of its arguments
        finally:
            self._syncing = False
        self._validate()

    def _on_text_edited(self, text: str) -> None:
        try:
            spec = parse_schedule(text)
        except LrvizError:
            self._validate()
            return
        self._syncing = True
        try:
            self.main.load(spec)
            self._then_box.setVisible(spec.name == "warmup")
            self.doc.setText(SCHEDULES[spec.name].doc)
            if spec.then is not None:
                self.then.load(spec.then)
            elif spec.name == "warmup":
                self.then.combo.setCurrentIndex(0)
        finally:
            self._syncing = False
        self._validate()

    def _validate(self) -> None:
        self.main.clear_errors()
        self.then.clear_errors()
        err = self.spec_edit.error()
        if err and not self.main.mark_error(err) and self._then_box.isVisible():
            self.then.mark_error(err)
        self.apply_button.setEnabled(err is None)
        self._update_preview()

    def _update_preview(self) -> None:
        if not self.spec_edit.is_valid():
            self._preview_curve.setData([], [])
            return
        n = max(1, min(PREVIEW_MAX, self._remaining if self._remaining else PREVIEW_DEFAULT))
        try:
            schedule = parse_schedule(self.text()).bind(self._lrs)
            if n <= PREVIEW_POINTS:
                t = np.arange(n)
                values = schedule.preview(n)[:, 0]
            else:  # every k-th step: the same curve at a fraction of the cost
                t = np.unique(np.append(np.arange(0, n, n // PREVIEW_POINTS), n - 1))
                values = np.array([schedule.lrs(int(i))[0] for i in t])
        except LrvizError as exc:
            self.spec_edit.set_error(str(exc))
            self._preview_curve.setData([], [])
            return
        x = t.astype(np.float64) + self._start_step
        self._preview_curve.setData(x, values)
        self.preview.setRange(xRange=(x[0], max(x[-1], x[0] + 1)), yRange=preview_y_range(values), padding=0)

    def preview_values(self) -> np.ndarray:
        """The preview's learning rates of group 0 (for tests)."""
        _, y = self._preview_curve.getData()
        return np.asarray(y if y is not None else [])

    # ---- apply ---------------------------------------------------------------------------------
    def _on_apply(self) -> None:
        try:
            spec = self.spec()
        except ConfigError as exc:
            self.spec_edit.set_error(str(exc))
            return
        self.applyRequested.emit(spec or "")

    def _on_clear(self) -> None:
        self.set_spec(None)
        self.applyRequested.emit("")

    def show_error(self, message: str) -> None:
        """An error about the spec found elsewhere (e.g. by the engine)."""
        self.spec_edit.set_error(message)
        self.main.mark_error(message)
