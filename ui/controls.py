"""The control panel: learning rate, schedule, optimizer and its hyperparameters, run settings,
and the script's own knobs (PARAMS). It only holds values and says what the user asked for; the
window's run control sends it to the run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLayout,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from lrviz.config import AMP_CHOICES, OPTIMIZER_NAMES, RunConfig, parse_clip, parse_finite
from lrviz.errors import ConfigError

from .schedule_editor import ScheduleEditor
from .widgets import (
    ErrorLabel,
    LrControl,
    ValidatedLineEdit,
    form_layout,
    format_number,
    parse_float_in,
    parse_int_at_least,
    row_layout,
)

if TYPE_CHECKING:
    from lrviz.scriptinfo import ScriptInfo


def _param_parser(default: Any, name: str):  # noqa: ANN202 - returns a parser
    """A parser for a PARAMS knob that keeps the type of its default."""

    def parse(text: str) -> Any:
        if isinstance(default, bool):
            raise ConfigError(f"{name} is a checkbox")
        if isinstance(default, int):
            try:
                return int(text)
            except ValueError:
                raise ConfigError(f"{name} must be a whole number, not {text!r}") from None
        if isinstance(default, float):
            return parse_finite(text, name)
        return text

    return parse


def _param_choices(info: ScriptInfo) -> dict[str, tuple]:
    """The script's ``PARAM_CHOICES`` (knob name -> allowed values), those that are well formed."""
    raw = info.param_choices
    return {k: tuple(v) for k, v in raw.items() if isinstance(k, str) and isinstance(v, (list, tuple)) and v}


#: The precision choices: (shown text, ``RunConfig.amp``, tooltip).
PRECISIONS = (("off (fp32)", None, "full precision"),
              ("bf16", "bf16", "autocast to bfloat16 (the CPU and recent GPUs)"),
              ("fp16", "fp16", "autocast to float16 with a gradient scaler (CUDA GPUs only); overflowing "
                               "steps are skipped and recorded"))
assert tuple(a for _, a, _ in PRECISIONS[1:]) == AMP_CHOICES
#: Why precision and accumulation are greyed out while a run trains.
FIXED_FOR_A_RUN = "fixed for a run (every update of the run is made with it): set it before Start"
AMP_TIP = "mixed precision: autocast to bf16, or to fp16 with a gradient scaler (CUDA only); off: fp32"
ACCUMULATE_TIP = "micro-batches per optimizer update (gradient accumulation): a step is one update; its loss " \
                 "is their mean"


def _apply_button(name: str, tip: str) -> QPushButton:
    """An "Apply to run" button (shown while a run trains): a change sent to the run from its next step."""
    b = QPushButton("Apply to run")
    b.setObjectName(name)
    b.setToolTip(tip)
    b.setAutoDefault(False)
    return b


def _note() -> QLabel:
    """A small grey word-wrapped note under a form."""
    label = QLabel("")
    label.setWordWrap(True)
    label.setStyleSheet("color: #777777; font-size: 8pt;")
    return label


def _form() -> QFormLayout:
    return form_layout((6, 4), 4)


def _form_group(title: str, *rows: tuple[str, QWidget | QLayout] | QWidget | QLayout) -> QGroupBox:
    """A titled group of form rows: ``(label, field)`` pairs, or a widget or layout spanning its row."""
    group = QGroupBox(title)
    f = _form()
    for row in rows:
        if isinstance(row, tuple):
            f.addRow(*row)
        else:
            f.addRow(row)
    group.setLayout(f)
    return group


def _group(title: str, widget: QWidget) -> QGroupBox:
    """A titled group holding one widget."""
    group = QGroupBox(title)
    lay = QVBoxLayout(group)
    lay.setContentsMargins(6, 4, 6, 4)
    lay.addWidget(widget)
    return group


class ControlPanel(QScrollArea):
    """Every setting of a run, in groups; scrolls when the window is short.

    Signals: ``lrCommitted(float)`` (the LR entry or slider), ``scheduleApplied(str)`` (the schedule
    editor's Apply; "" for none), ``hyperparamsApplied(dict)`` (momentum/weight decay mid-run),
    ``clipApplied(object)`` (the gradient-clipping threshold mid-run: a float, or None for no clipping).
    """

    lrCommitted = Signal(float)
    scheduleApplied = Signal(str)
    hyperparamsApplied = Signal(dict)
    clipApplied = Signal(object)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFrameShape(QScrollArea.Shape.NoFrame)
        body = QWidget()
        body.setObjectName("controlBody")
        col = QVBoxLayout(body)
        col.setContentsMargins(4, 4, 4, 4)
        col.setSpacing(6)

        # Learning rate
        self.lr = LrControl(0.01)
        self.lr_group = _group("Learning rate", self.lr)
        col.addWidget(self.lr_group)

        # Schedule
        self.schedule = ScheduleEditor()
        self.schedule_group = _group("Schedule", self.schedule)
        col.addWidget(self.schedule_group)

        # Optimizer
        self.optimizer = QComboBox()
        self.optimizer.setObjectName("optimizerCombo")
        self.optimizer.addItems(list(OPTIMIZER_NAMES))
        self.momentum = ValidatedLineEdit(parse_float_in(0.0, 1.0, "momentum", high_open=True), "0",
                                          tooltip="momentum (beta1 for Adam and AdamW), in [0, 1)")
        self.momentum.setObjectName("momentumEdit")
        self.weight_decay = ValidatedLineEdit(parse_float_in(0.0, None, "weight decay"), "0",
                                              tooltip="weight decay (L2 penalty), >= 0")
        self.weight_decay.setObjectName("weightDecayEdit")
        self.nesterov = QCheckBox("Nesterov")
        self.nesterov.setToolTip("Nesterov momentum (SGD with momentum > 0)")
        self.apply_hyper = _apply_button("applyHyperparams", "change momentum and weight decay of the running "
                                                             "optimizer from the next step")
        self.optimizer_note = _note()
        self.optimizer_errors = ErrorLabel()
        self.optimizer_errors.watch(self.momentum, self.weight_decay)
        self.opt_group = _form_group("Optimizer", ("optimizer", self.optimizer), ("momentum", self.momentum),
                                     ("weight decay", self.weight_decay),
                                     row_layout(self.nesterov, None, self.apply_hyper), self.optimizer_note,
                                     self.optimizer_errors)
        col.addWidget(self.opt_group)

        # The optimizer update: precision, accumulation, clipping (lrviz's own runner)
        self.amp = QComboBox()
        self.amp.setObjectName("ampCombo")
        for i, (text, amp, tip) in enumerate(PRECISIONS):
            self.amp.addItem(text, amp)
            self.amp.setItemData(i, tip, Qt.ItemDataRole.ToolTipRole)
        self.accumulate = ValidatedLineEdit(parse_int_at_least(1, "accumulate"), "1", tooltip=ACCUMULATE_TIP)
        self.accumulate.setObjectName("accumulateEdit")
        self.clip = ValidatedLineEdit(parse_clip, "", allow_empty=True, placeholder="off",
                                      tooltip="clip the gradient norm to this before each update (a number > 0; "
                                              "empty or off: no clipping); mid-run: Apply")
        self.clip.setObjectName("clipEdit")
        self.apply_clip = _apply_button("applyClip", "clip with this threshold (empty: stop clipping) from the next "
                                                     "step")
        self.clip_status = _note()
        self.clip_status.setObjectName("clipStatus")
        self.clip_status.hide()
        self.step_errors = ErrorLabel()
        self.step_errors.watch(self.accumulate, self.clip)
        self.step_group = _form_group("Update step", ("precision", self.amp), ("accumulate", self.accumulate),
                                      ("clip grad norm", row_layout(self.clip, self.apply_clip, grow=self.clip)),
                                      self.clip_status, self.step_errors)
        self.step_group.setObjectName("stepGroup")
        col.addWidget(self.step_group)

        # Run settings
        self.device = QComboBox()
        self.device.setObjectName("deviceCombo")
        self.device.addItems(["auto", "cpu"])
        self.length_kind = QComboBox()
        self.length_kind.setObjectName("lengthKind")
        self.length_kind.addItems(["steps", "epochs"])
        self.length = QSpinBox()
        self.length.setObjectName("lengthSpin")
        self.length.setRange(1, 1_000_000_000)
        self.length.setValue(10)
        self.length.setGroupSeparatorShown(True)
        self.batch_size = QSpinBox()
        self.batch_size.setObjectName("batchSizeSpin")
        self.batch_size.setRange(1, 1_000_000)
        self.batch_size.setValue(32)
        self.batch_size.setGroupSeparatorShown(True)
        self.seed = QSpinBox()
        self.seed.setObjectName("seedSpin")
        self.seed.setRange(0, 2**31 - 1)
        self.eval_every = ValidatedLineEdit(parse_int_at_least(1, "eval every"), "", allow_empty=True,
                                            placeholder="once per epoch",
                                            tooltip="validate every this many steps (empty: once per epoch)")
        self.eval_every.setObjectName("evalEveryEdit")
        self.run_errors = ErrorLabel()
        self.run_errors.watch(self.eval_every)
        self.run_group = _form_group("Run", ("device", self.device),
                                     ("length", row_layout(self.length, self.length_kind, grow=self.length)),
                                     ("batch size", self.batch_size), ("seed", self.seed),
                                     ("eval every", self.eval_every), self.run_errors)
        col.addWidget(self.run_group)

        # Script knobs
        self.params_group = QGroupBox("Script parameters")
        self.params_form = _form()
        self.params_group.setLayout(self.params_form)
        self.params_errors = ErrorLabel()
        self.param_fields: dict[str, Any] = {}
        col.addWidget(self.params_group)
        self.params_group.hide()

        self.config_errors = ErrorLabel()
        self.config_errors.setObjectName("configErrors")
        col.addWidget(self.config_errors)
        col.addStretch(1)
        self.setWidget(body)
        # Wide enough for the forms plus the vertical scroll bar: nothing is clipped on the right.
        self.setMinimumWidth(max(310, body.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width() + 6))

        self._custom_optimizer = False
        self._batch_size_settable = True
        self._running = False
        self.lr.lrCommitted.connect(self.lrCommitted)
        self.schedule.applyRequested.connect(self.scheduleApplied)
        self.apply_hyper.clicked.connect(self._on_apply_hyperparams)
        self.apply_clip.clicked.connect(self._on_apply_clip)
        self.clip.returnPressed.connect(self._on_apply_clip)
        self.optimizer.currentTextChanged.connect(self._update_enabled)
        self.momentum.textChanged.connect(self._update_enabled)
        self.set_running(False)

    # ---- experiment ---------------------------------------------------------------------------
    def set_devices(self, devices: list[str]) -> None:
        current = self.device.currentText()
        self.device.clear()
        self.device.addItems(devices)
        if current in devices:
            self.device.setCurrentText(current)

    def set_script(self, exp: ScriptInfo) -> None:
        """Fill the controls from the script's DEFAULTS and build the PARAMS form."""
        cfg = RunConfig(**exp.defaults)
        self._custom_optimizer = exp.has_custom_optimizer
        self.optimizer_note.setText("this script builds its own optimizer (build_optimizer)"
                                    if self._custom_optimizer else "")
        self.optimizer_note.setVisible(self._custom_optimizer)
        self._set_batch_size_field(exp, cfg.batch_size)
        self._choices = _param_choices(exp)
        self._build_params(exp.params, self._choices)
        self.show_config(cfg)
        self.config_errors.show_error(None)
        self._update_enabled()

    def show_config(self, cfg: RunConfig) -> None:
        """Show these settings in the fields (the script's DEFAULTS, or the settings of a run watched)."""
        self.lr.set_value(float(cfg.lr))
        if str(cfg.optimizer).lower() in OPTIMIZER_NAMES:
            self.optimizer.setCurrentText(str(cfg.optimizer).lower())
        self.momentum.setText(format_number(float(cfg.momentum), 6))
        self.weight_decay.setText(format_number(float(cfg.weight_decay), 6))
        self.nesterov.setChecked(bool(cfg.nesterov))
        if cfg.steps is not None:
            self.length_kind.setCurrentText("steps")
            self.length.setValue(int(cfg.steps))
        else:
            self.length_kind.setCurrentText("epochs")
            self.length.setValue(int(cfg.epochs or 10))
        if self._batch_size_settable and cfg.batch_size is not None:
            self.batch_size.setValue(int(cfg.batch_size))
        self.seed.setValue(int(cfg.seed or 0))
        self.eval_every.setText("" if cfg.eval_every is None else str(cfg.eval_every))
        self.amp.setCurrentIndex(max(0, self.amp.findData(cfg.amp)))
        self.accumulate.setText(str(cfg.accumulate or 1))
        self.show_clip(cfg.clip_grad_norm)
        if cfg.device in [self.device.itemText(i) for i in range(self.device.count())]:
            self.device.setCurrentText(cfg.device)
        self.schedule.set_spec(cfg.schedule)
        for name, value in (cfg.params or {}).items():
            w = self.param_fields.get(name, (None,))[0]
            if isinstance(w, QCheckBox):
                w.setChecked(bool(value))
            elif isinstance(w, QComboBox):
                w.setCurrentText(str(value))
            elif w is not None:
                w.setText(str(value))

    def show_clip(self, clip: float | None, status: str = "") -> None:
        """Show this clipping threshold (None: off), with ``status`` (e.g. "in force from step 120") below."""
        self.clip.setText("" if clip is None else format_number(float(clip), 6))
        self.clip_status.setText(status)
        self.clip_status.setVisible(bool(status))

    def _set_batch_size_field(self, exp: ScriptInfo, default: int | None) -> None:
        """The batch size lrviz passes to ``build_data``; a script whose ``build_data`` takes none
        batches its data itself, and the field says so instead of showing a number nobody uses."""
        field = self.batch_size
        self._batch_size_settable = exp.accepts_batch_size
        if not exp.accepts_batch_size:
            field.setRange(0, 0)
            field.setSpecialValueText("set by the script")
            field.setValue(0)
            field.setEnabled(False)
            field.setToolTip("this script's build_data() takes no batch_size: it batches its data itself")
            return
        if default is None:
            default = exp.batch_size_default
        field.setSpecialValueText("")
        field.setRange(1, 1_000_000)
        field.setValue(int(default or 32))  # build_data(batch_size) without a default: lrviz passes 32
        field.setEnabled(not self._running)
        field.setToolTip("")

    def _build_params(self, params: dict[str, Any], choices: dict[str, tuple] | None = None) -> None:
        while self.params_form.rowCount():
            self.params_form.removeRow(0)
        self.param_fields = {}
        choices = choices or {}
        for name, default in params.items():
            if isinstance(default, bool):
                w: Any = QCheckBox()
                w.setChecked(default)
            elif name in choices:
                w = QComboBox()
                w.addItems([str(c) for c in choices[name]])
                if str(default) not in [str(c) for c in choices[name]]:
                    w.insertItem(0, str(default))
                w.setCurrentText(str(default))
                w.setToolTip(f"one of {', '.join(str(c) for c in choices[name])}")
            else:
                w = ValidatedLineEdit(_param_parser(default, name), str(default), tooltip=f"default {default!r}")
            w.setObjectName(f"param_{name}")
            self.param_fields[name] = (w, default)
            self.params_form.addRow(name, w)
        self.params_errors = ErrorLabel()
        self.params_errors.watch(*[w for w, _ in self.param_fields.values() if isinstance(w, ValidatedLineEdit)])
        self.params_form.addRow(self.params_errors)
        self.params_group.setVisible(bool(params))

    # ---- state -----------------------------------------------------------------------------------
    def set_running(self, running: bool) -> None:
        """Before a run everything is editable; during one only what the engine can change live."""
        self._running = running
        for w in (self.device, self.length, self.length_kind, self.seed, self.eval_every, self.params_group):
            w.setEnabled(not running)
        # precision and accumulation shape every update of a run: they cannot change mid-run
        self.amp.setEnabled(not running)
        self.amp.setToolTip(FIXED_FOR_A_RUN if running else AMP_TIP)
        self.accumulate.setEnabled(not running)
        self.accumulate.set_hint(FIXED_FOR_A_RUN if running else ACCUMULATE_TIP)
        self.apply_clip.setVisible(running)
        if not running:
            self.clip_status.hide()
        self.batch_size.setEnabled(not running and self._batch_size_settable)
        self._update_enabled()

    def _update_enabled(self, *_: object) -> None:
        custom = self._custom_optimizer
        self.optimizer.setEnabled(not self._running and not custom)
        try:
            mom = float(self.momentum.text())
        except ValueError:
            mom = 0.0
        self.nesterov.setEnabled(not self._running and not custom and self.optimizer.currentText() == "sgd"
                                 and mom > 0)
        if not self.nesterov.isEnabled() and not self._running:
            self.nesterov.setChecked(False)
        self.apply_hyper.setVisible(self._running)
        self.momentum.setEnabled(not custom or self._running)
        self.weight_decay.setEnabled(not custom or self._running)

    def _on_apply_clip(self) -> None:
        if not self._running:
            return  # before a run the field is read at Start
        try:
            clip = self.clip.value()
        except ConfigError:
            self.clip.setFocus()
            return
        self.clipApplied.emit(clip)

    def _on_apply_hyperparams(self) -> None:
        try:
            values = {"momentum": self.momentum.value(), "weight_decay": self.weight_decay.value()}
        except ConfigError:
            return
        self.hyperparamsApplied.emit(values)

    # ---- reading -----------------------------------------------------------------------------------
    def param_value(self, name: str) -> Any:
        """The value of script knob ``name`` as set in the form (ConfigError when the text is invalid)."""
        w, default = self.param_fields[name]
        if isinstance(w, QCheckBox):
            return w.isChecked()
        if isinstance(w, QComboBox):
            text = w.currentText()
            raw = getattr(self, "_choices", {}).get(name, ())
            for c in raw:  # give back the choice itself (e.g. an int), not its text
                if str(c) == text:
                    return c
            return type(default)(text) if isinstance(default, (int, float)) and not isinstance(default, bool) \
                else text
        return w.value()

    def add_section(self, widget: QWidget) -> None:
        """Add a group of settings (e.g. the divergence guard's) below the others."""
        lay = self.widget().layout()
        lay.insertWidget(lay.indexOf(self.config_errors), widget)

    def invalid_fields(self) -> list[ValidatedLineEdit]:
        fields = [self.lr.edit, self.momentum, self.weight_decay, self.eval_every, self.accumulate, self.clip]
        fields += [w for w, _ in self.param_fields.values() if isinstance(w, ValidatedLineEdit)]
        return [f for f in fields if f.isEnabled() and not f.is_valid()]

    def config(self, exp: ScriptInfo, schedule: str | None = None) -> RunConfig:
        """The run configuration: the script's DEFAULTS overridden by the controls (checked), with
        ``schedule`` (the one applied before the start; None for none).

        Raises ConfigError naming the setting (and marks the field) when something is invalid.
        """
        bad = self.invalid_fields()
        if bad:
            bad[0].setFocus()
            raise ConfigError(bad[0].error() or "invalid value")
        base = RunConfig(**exp.defaults)
        overrides: dict[str, Any] = {
            "lr": self.lr.value(),
            "device": self.device.currentText(),
            "seed": self.seed.value(),
            "schedule": None,
        }
        if not self._custom_optimizer:
            overrides.update(optimizer=self.optimizer.currentText(), momentum=self.momentum.value(),
                             weight_decay=self.weight_decay.value(), nesterov=self.nesterov.isChecked())
        if exp.accepts_batch_size:
            overrides["batch_size"] = self.batch_size.value()
        params = {}
        for name, (_, default) in self.param_fields.items():
            value = self.param_value(name)
            if value != default:
                params[name] = value
        overrides["params"] = params
        cfg = base.merged(overrides)
        # merged() skips None, so the length, eval interval and update step are set directly (None clears them).
        steps = self.length.value() if self.length_kind.currentText() == "steps" else None
        epochs = self.length.value() if steps is None else None
        cfg.steps, cfg.epochs = steps, epochs
        cfg.eval_every = self.eval_every.value()
        cfg.amp = self.amp.currentData()
        cfg.accumulate = self.accumulate.value()
        cfg.clip_grad_norm = self.clip.value()
        cfg.schedule = schedule
        try:
            cfg = cfg.validated()
        except ConfigError as exc:
            self.config_errors.show_error(str(exc))
            raise
        self.config_errors.show_error(None)
        return cfg
