"""The divergence guard in the app: its run options, and the banner that explains what it caught.

App runs use ``divergence='pause'``: when the guard sees the loss explode, oscillate with growing
swings, the gradient norm spike or a NaN, the engine pauses and :class:`DivergenceBanner` (above the
plots, not a modal) says what happened and why, in words, with two buttons: roll back to the last
good checkpoint with the rate divided by 10, or resume anyway. With "automatic roll-back" the
engine does that by itself (``divergence='rollback'``) and the banner reports each roll-back.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from lrviz.errors import LrvizError

from . import (
    _compat,  # noqa: F401  (must run first: PySide6 6.12 signal refcount defect)
    theme,
)
from .lab_common import fmt, form, note_label
from .widgets import FlowLayout

if TYPE_CHECKING:
    from lrviz.config import RunConfig

    from .lab import Lab

#: Checkpoints every this many steps in app runs (and at every pause), so there is something to roll back to.
CHECKPOINT_EVERY = 200
#: Per-layer gradient norms and update ratios every this many steps in app runs.
LAYER_STATS_EVERY = 25
ROLLBACK_FACTOR = 0.1

KIND_TITLES = {
    "nonfinite": "the loss became NaN or infinite",
    "loss_explosion": "the loss exploded",
    "grad_spike": "the gradient norm spiked",
    "oscillation": "the loss oscillates with growing swings",
}

_ALARM_STYLE = (f"QFrame#divergenceBanner {{ background: #FFF1E8; border: 2px solid {theme.VERMILLION}; "
                "border-radius: 4px; }")
_INFO_STYLE = (f"QFrame#divergenceBanner {{ background: #EAF4FB; border: 2px solid {theme.BLUE}; "
               "border-radius: 4px; }")


class RunOptions(QGroupBox):
    """Guard and stopping settings of app runs: roll-back policy, checkpoints, early stopping, layer stats."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__("Divergence guard and stopping", parent)
        self.setObjectName("runOptions")
        self.auto_rollback = QCheckBox("automatic roll-back (LR / 10)")
        self.auto_rollback.setObjectName("autoRollback")
        self.auto_rollback.setToolTip(
            "when the guard sees the run diverge: off = pause and explain (you choose); on = go back to the "
            "last good checkpoint with the learning rate divided by 10 and carry on (at most 3 times)")
        self.checkpoint_every = QSpinBox()
        self.checkpoint_every.setObjectName("checkpointEvery")
        self.checkpoint_every.setRange(0, 10_000_000)
        self.checkpoint_every.setValue(CHECKPOINT_EVERY)
        self.checkpoint_every.setSpecialValueText("only at pauses")
        self.checkpoint_every.setSuffix(" steps")
        self.checkpoint_every.setToolTip("save a checkpoint every this many steps (to roll back to or fork "
                                         "from); the last 5 are kept, plus one at every pause")
        self.early_stopping = QSpinBox()
        self.early_stopping.setObjectName("earlyStopping")
        self.early_stopping.setRange(0, 100_000)
        self.early_stopping.setValue(0)
        self.early_stopping.setSpecialValueText("off")
        self.early_stopping.setSuffix(" validations")
        self.early_stopping.setToolTip("stop when the validation loss has not improved for this many "
                                       "validation passes (patience); off: train to the end")
        self.layer_stats = QSpinBox()
        self.layer_stats.setObjectName("layerStatsEvery")
        self.layer_stats.setRange(0, 1_000_000)
        self.layer_stats.setValue(LAYER_STATS_EVERY)
        self.layer_stats.setSpecialValueText("off")
        self.layer_stats.setSuffix(" steps")
        self.layer_stats.setToolTip("record each layer's gradient norm and update/weight ratio every this many "
                                    "steps (the Diagnostics panel)")
        f = form()
        f.addRow(self.auto_rollback)
        f.addRow("checkpoint every", self.checkpoint_every)
        f.addRow("early stopping", self.early_stopping)
        f.addRow("layer stats every", self.layer_stats)
        self.setLayout(f)

    def apply(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with the guard policy, checkpoint interval and early stopping of these options."""
        cfg.divergence = "rollback" if self.auto_rollback.isChecked() else "pause"
        cfg.checkpoint_every = self.checkpoint_every.value() or None
        cfg.early_stopping = self.early_stopping.value() or None
        return cfg.validated()

    def engine_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the app's TrainingEngine."""
        return {"layer_stats_every": self.layer_stats.value() or None}

    def set_running(self, running: bool) -> None:
        """The options apply at the start of a run."""
        self.setEnabled(not running)


class DivergenceBanner(QFrame):
    """A banner above the plots: what the guard caught, why, and what to do, with the buttons to do it."""

    def __init__(self, lab: Lab, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("divergenceBanner")
        self.lab = lab
        self.mode = ""  # "", "detection", "rolled_back", "auto"
        self._engine: Any = None
        self._key: Any = None
        self._n_events = 0
        self._first_step = 0
        self._last_detection: dict[str, Any] | None = None
        self._awaiting_rollback = False

        self.icon = QLabel("⚠")
        self.icon.setObjectName("bannerIcon")
        self.icon.setStyleSheet(f"color: {theme.VERMILLION}; font-size: 18pt; border: none; background: none;")
        self.icon.setAlignment(Qt.AlignmentFlag.AlignTop)
        self.title = note_label("", theme.FOREGROUND)
        self.title.setObjectName("bannerTitle")
        self.title.setStyleSheet("border: none; background: none; font-size: 10pt;")
        self.explanation = note_label("", theme.FOREGROUND)
        self.explanation.setObjectName("bannerExplanation")
        self.explanation.setStyleSheet("border: none; background: none; font-size: 9pt;")
        self.rollback_button = QPushButton("Roll back to the last good checkpoint with LR / 10")
        self.rollback_button.setObjectName("bannerRollback")
        self.rollback_button.setToolTip("restore the weights, optimizer and schedule of the last checkpoint "
                                        "before the trouble, and continue with the learning rate divided by 10")
        self.resume_button = QPushButton("Resume anyway")
        self.resume_button.setObjectName("bannerResume")
        self.resume_button.setToolTip("continue with the current weights and rate (the guard stays on)")
        self.resume_after = QCheckBox("resume after roll-back")
        self.resume_after.setObjectName("bannerResumeAfter")
        self.resume_after.setChecked(True)
        self.resume_after.setStyleSheet("border: none; background: none;")
        self.resume_after.setToolTip("off: stay paused after the roll-back, to look at the restored run first")
        self.dismiss_button = QPushButton("Dismiss")
        self.dismiss_button.setObjectName("bannerDismiss")
        for b in (self.rollback_button, self.resume_button, self.dismiss_button):
            b.setAutoDefault(False)
        self.rollback_button.setStyleSheet(f"QPushButton {{ font-weight: 600; color: {theme.VERMILLION}; }}")

        text = QVBoxLayout()
        text.setSpacing(3)
        text.addWidget(self.title)
        text.addWidget(self.explanation)
        # The buttons wrap onto a second row when the plots are narrow: the banner never widens the window.
        buttons = FlowLayout(spacing=6)
        for w in (self.rollback_button, self.resume_button, self.resume_after, self.dismiss_button):
            buttons.addWidget(w)
        text.addLayout(buttons)
        row = QHBoxLayout(self)
        row.setContentsMargins(8, 4, 8, 4)
        row.setSpacing(6)
        row.addWidget(self.icon)
        row.addLayout(text, 1)

        self.rollback_button.clicked.connect(self._on_rollback)
        self.resume_button.clicked.connect(self._on_resume)
        self.dismiss_button.clicked.connect(self._on_dismiss)
        self.hide()

    # ---- the timer ----------------------------------------------------------------------------------
    def tick(self, engine: Any) -> None:
        """Follow the engine: show a detection while it is paused by one; report roll-backs."""
        if engine is not self._engine:
            self._engine = engine
            self._n_events = 0
            self._key = None
            self._last_detection = None
            self._awaiting_rollback = False
            origin = getattr(engine, "origin", None)
            self._first_step = int(origin.step) if origin is not None else 0
            self._hide()
        if engine is None:
            return
        events = engine.events
        n = len(events)
        for e in list(events[self._n_events:n]):
            if e.step < self._first_step and e.kind in ("diverged", "rollback"):
                continue  # the history of a resumed run
            if e.kind == "diverged":
                self._last_detection = dict(e.data or {})
            elif e.kind == "rollback":
                self._on_rollback_event(e, engine)
        self._n_events = n
        det = engine.detection
        if engine.state == "paused" and det is not None and engine.config.divergence == "pause":
            key = (det.step, det.kind)
            if key != self._key:
                self._key = key
                self._show_detection(det, engine)
        elif self.mode == "detection" and (det is None or engine.state != "paused"):
            if not self._awaiting_rollback:
                self._hide()
        if self.mode in ("rolled_back",) and engine.state != "paused":
            self.resume_button.hide()

    # ---- showing ------------------------------------------------------------------------------------
    def _show_detection(self, det: Any, engine: Any) -> None:
        self.mode = "detection"
        self._awaiting_rollback = False
        self.setStyleSheet(_ALARM_STYLE)
        self.icon.setText("⚠")
        self.icon.setStyleSheet(f"color: {theme.VERMILLION}; font-size: 18pt; border: none; background: none;")
        what = KIND_TITLES.get(det.kind, det.kind)
        lr = engine.lrs[0] if engine.lrs else None
        self.title.setText(f"<b style='color:{theme.VERMILLION}'>Training paused at step {det.step:,}: {what}.</b> "
                           f"{html.escape(det.message)}" + (f" (learning rate {fmt(lr)})" if lr else ""))
        self.explanation.setText(html.escape(det.explanation))
        have = [c for c in engine.checkpoints if c.path.exists()]
        self.rollback_button.setEnabled(bool(have))
        self.rollback_button.setToolTip("" if have else "no checkpoint to roll back to (runs keep them only "
                                        "when saved in a run store)")
        self.rollback_button.setVisible(True)
        self.resume_after.setVisible(True)
        self.resume_button.setText("Resume anyway")
        self.resume_button.setVisible(True)
        self.dismiss_button.setVisible(False)
        self.show()

    def _on_rollback_event(self, e: Any, engine: Any) -> None:
        d = e.data or {}
        auto = engine.config.divergence == "rollback" and not self._awaiting_rollback
        self._awaiting_rollback = False
        self.setStyleSheet(_INFO_STYLE)
        self.icon.setText("↶")
        self.icon.setStyleSheet(f"color: {theme.BLUE}; font-size: 18pt; border: none; background: none;")
        cause = self._last_detection or {}
        to_step = d.get("to_step")
        lr = d.get("lr")
        if isinstance(lr, (int, float)):
            self.lab.show_lr(float(lr))
        restored = (f"restored the checkpoint of step {to_step:,}" if isinstance(to_step, int)
                    else "restored the last good checkpoint")
        if auto:
            self.mode = "auto"
            msg = cause.get("message") or "the guard caught a divergence"
            self.title.setText(f"<b style='color:{theme.BLUE}'>Automatic roll-back at step {e.step:,}:</b> "
                               f"{html.escape(str(msg))}; {restored} and lowered the learning rate to "
                               f"<b>{fmt(lr)}</b>.")
        else:
            self.mode = "rolled_back"
            paused = engine.state == "paused" and not self.resume_after.isChecked()
            tail = " Still paused: press Resume to continue." if paused else " Training goes on."
            self.title.setText(f"<b style='color:{theme.BLUE}'>Rolled back at step {e.step:,}:</b> {restored} "
                               f"(weights, optimizer, schedule); the learning rate is now <b>{fmt(lr)}</b>."
                               + tail)
        self.explanation.setText(html.escape(str(cause.get("explanation") or "")))
        self.explanation.setVisible(bool(cause.get("explanation")))
        self.rollback_button.setVisible(False)
        self.resume_after.setVisible(False)
        paused = engine.state == "paused" or engine._pause_requested
        self.resume_button.setText("Resume")
        self.resume_button.setVisible(self.mode == "rolled_back" and paused)
        self.dismiss_button.setVisible(True)
        self.show()

    def _hide(self) -> None:
        self.mode = ""
        self.explanation.setVisible(True)
        self.hide()

    # ---- buttons ------------------------------------------------------------------------------------
    def _on_rollback(self) -> None:
        eng = self.lab.engine
        if eng is None or not self.lab.active():
            return
        try:
            eng.rollback(ROLLBACK_FACTOR)
        except LrvizError as exc:
            self.lab.status(f"cannot roll back: {exc}")
            return
        self._awaiting_rollback = True
        if self.resume_after.isChecked():
            self.lab.resume()
        self.rollback_button.setEnabled(False)
        self.resume_button.setEnabled(True)
        self.title.setText(self.title.text() + " <i>Rolling back…</i>")
        self.lab.status("rolling back to the last good checkpoint with the learning rate / 10")
        self.lab.refresh_actions()
        self.lab.wake()

    def _on_resume(self) -> None:
        eng = self.lab.engine
        if eng is not None and self.lab.active():
            self.lab.resume()
            self.lab.status("resumed")
            self.lab.refresh_actions()
        if self.mode == "rolled_back":
            self.resume_button.hide()
        else:
            self._hide()

    def _on_dismiss(self) -> None:
        self._hide()
