"""The divergence guard in the app: its run options, and the banner that explains what it caught.

App runs use ``divergence='pause'``: when the guard sees the loss explode, oscillate with growing
swings, the gradient norm spike or a NaN, the run pauses and :class:`DivergenceBanner` (above the
plots, not a modal) says what happened and why, in words, with two buttons: roll back to the last
good checkpoint with the rate divided by 10, or resume anyway. With "automatic roll-back" the run
does that by itself (``divergence='rollback'``) and the banner reports each roll-back.

The banner reads the run through the :class:`~lrviz.live.run.Run` interface (``detection``,
``events``, ``config``) and steers it with commands: a roll-back's ack says what was restored.
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
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from lrviz.states import EventKind, RunState

from .. import theme
from ..widgets import FlowLayout
from .common import Answers, fmt, form, is_live, note_label, push_button

if TYPE_CHECKING:
    from lrviz.config import RunConfig
    from lrviz.live.run import Run

    from .panels import Lab

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


def _count_box(name: str, top: int, value: int, zero_text: str, suffix: str, tip: str) -> QSpinBox:
    """A spin box of a count from 0 (shown as ``zero_text``) to ``top``."""
    box = QSpinBox()
    box.setObjectName(name)
    box.setRange(0, top)
    box.setValue(value)
    box.setSpecialValueText(zero_text)
    box.setSuffix(suffix)
    box.setToolTip(tip)
    return box


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
        self.checkpoint_every = _count_box(
            "checkpointEvery", 10_000_000, CHECKPOINT_EVERY, "only at pauses", " steps",
            "save a checkpoint every this many steps (to roll back to or fork from); the last 5 are kept, "
            "plus one at every pause")
        self.early_stopping = _count_box(
            "earlyStopping", 100_000, 0, "off", " validations",
            "stop when the validation loss has not improved for this many validation passes (patience); "
            "off: train to the end")
        self.layer_stats = _count_box(
            "layerStatsEvery", 1_000_000, LAYER_STATS_EVERY, "off", " steps",
            "record each layer's gradient norm and update/weight ratio every this many steps (the Diagnostics "
            "panel)")
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

    def engine_options(self) -> dict[str, Any]:
        """The ``engine`` options of an app run's spec (per-layer statistics)."""
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
        self.answers = Answers(self)
        self._run: Any = None
        self._key: Any = None
        self._n_events = 0
        self._first_step = 0
        self._last_detection: dict[str, Any] | None = None
        self._reported: set[tuple[int, Any]] = set()  # roll-backs shown: (step, restored step)

        self.icon = QLabel("⚠")
        self.icon.setObjectName("bannerIcon")
        self.icon.setStyleSheet(f"color: {theme.VERMILLION}; font-size: 18pt; border: none; background: none;")
        self.icon.setAlignment(Qt.AlignmentFlag.AlignTop)
        self.title = note_label("", theme.FOREGROUND, name="bannerTitle")
        self.title.setStyleSheet("border: none; background: none; font-size: 10pt;")
        self.explanation = note_label("", theme.FOREGROUND, name="bannerExplanation")
        self.explanation.setStyleSheet("border: none; background: none; font-size: 9pt;")
        self.rollback_button = push_button("Roll back to the last good checkpoint with LR / 10", "bannerRollback",
            "restore the weights, optimizer and schedule of the last checkpoint before the trouble, and "
            "continue with the learning rate divided by 10")
        self.resume_button = push_button("Resume anyway", "bannerResume",
            "continue with the current weights and rate (the guard stays on)")
        self.resume_after = QCheckBox("resume after roll-back")
        self.resume_after.setObjectName("bannerResumeAfter")
        self.resume_after.setChecked(True)
        self.resume_after.setStyleSheet("border: none; background: none;")
        self.resume_after.setToolTip("off: stay paused after the roll-back, to look at the restored run first")
        self.dismiss_button = push_button("Dismiss", "bannerDismiss")
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
    def tick(self, run: Run | None) -> None:
        """Follow the run: show a detection while it is paused by one; report roll-backs."""
        if run is not self._run:
            self._follow(run)
        if run is None:
            return
        events = run.events
        n = len(events)
        for e in list(events[self._n_events:n]):
            if e.step < self._first_step and e.kind in (EventKind.DIVERGED, EventKind.ROLLBACK):
                continue  # history: from before the run was resumed or attached to
            if e.kind == EventKind.DIVERGED:
                self._last_detection = dict(e.data or {})
            elif e.kind == EventKind.ROLLBACK:
                self._show_rollback(e.step, dict(e.data or {}), run)
        self._n_events = n
        det = run.detection
        paused = run.state == RunState.PAUSED
        if paused and det is not None and (run.config or {}).get("divergence") == "pause":
            key = (det.get("step"), det.get("kind"))
            if key != self._key:
                self._key = key
                self._show_detection(det, run)
        elif self.mode == "detection" and (det is None or not paused) and not self.answers:
            self._hide()
        if self.mode == "rolled_back" and not paused and not run.pause_requested:
            self.resume_button.hide()

    def _follow(self, run: Run | None) -> None:
        """Start following another run: what it did before now (or before its resume) is history."""
        self._run = run
        self._key = None
        self._last_detection = None
        self._reported = set()
        self._n_events = 0
        origin = (getattr(run, "spec", None) or {}).get("origin") if run is not None else None
        self._first_step = max(int(run.step) if run is not None else 0, int(origin["step"]) if origin else 0)
        self._hide()

    # ---- showing ------------------------------------------------------------------------------------
    def _show_detection(self, det: dict[str, Any], run: Run) -> None:
        self.mode = "detection"
        self.setStyleSheet(_ALARM_STYLE)
        self.icon.setText("⚠")
        self.icon.setStyleSheet(f"color: {theme.VERMILLION}; font-size: 18pt; border: none; background: none;")
        kind = str(det.get("kind") or "")
        what = KIND_TITLES.get(kind, kind)
        lr = run.lrs[0] if run.lrs else None
        self.title.setText(f"<b style='color:{theme.VERMILLION}'>Training paused at step {int(det['step']):,}: "
                           f"{what}.</b> {html.escape(str(det.get('message') or ''))}"
                           + (f" (learning rate {fmt(lr)})" if lr else ""))
        self.explanation.setText(html.escape(str(det.get("explanation") or "")))
        self.explanation.setVisible(True)
        have = any(e.kind == EventKind.CHECKPOINT for e in list(run.events))
        self.rollback_button.setEnabled(have)
        self.rollback_button.setToolTip("" if have else "no checkpoint to roll back to (runs keep them only "
                                        "when saved in a run store)")
        self.rollback_button.setVisible(True)
        self.resume_after.setVisible(True)
        self.resume_button.setText("Resume anyway")
        self.resume_button.setEnabled(True)
        self.resume_button.setVisible(True)
        self.dismiss_button.setVisible(False)
        self.show()

    def _show_rollback(self, step: int, d: dict[str, Any], run: Run) -> None:
        """Say what a roll-back restored (from its ack, or from its event when another client or the
        automatic policy rolled back); each roll-back once."""
        key = (int(step), d.get("to_step"))
        if key in self._reported:
            return
        self._reported.add(key)
        auto = bool(d.get("auto"))
        self.setStyleSheet(_INFO_STYLE)
        self.icon.setText("↶")
        self.icon.setStyleSheet(f"color: {theme.BLUE}; font-size: 18pt; border: none; background: none;")
        cause = self._last_detection or {}
        lr = d.get("lr")
        if isinstance(lr, (int, float)):
            self.lab.show_lr(float(lr))
        restored = restored_text(d)
        if auto:
            self.mode = "auto"
            msg = cause.get("message") or "the guard caught a divergence"
            self.title.setText(f"<b style='color:{theme.BLUE}'>Automatic roll-back at step {step:,}:</b> "
                               f"{html.escape(str(msg))}; {restored}.")
        else:
            self.mode = "rolled_back"
            paused = run.state == RunState.PAUSED and not self.resume_after.isChecked()
            tail = " Still paused: press Resume to continue." if paused else " Training goes on."
            self.title.setText(f"<b style='color:{theme.BLUE}'>Rolled back at step {step:,}:</b> {restored} "
                               "(weights, optimizer, schedule)." + tail)
        self.explanation.setText(html.escape(str(cause.get("explanation") or "")))
        self.explanation.setVisible(bool(cause.get("explanation")))
        self.rollback_button.setVisible(False)
        self.resume_after.setVisible(False)
        paused = run.state == RunState.PAUSED or run.pause_requested
        self.resume_button.setText("Resume")
        self.resume_button.setEnabled(True)
        self.resume_button.setVisible(self.mode == "rolled_back" and paused)
        self.dismiss_button.setVisible(True)
        self.show()

    def _hide(self) -> None:
        self.mode = ""
        self.explanation.setVisible(True)
        self.hide()

    # ---- buttons ------------------------------------------------------------------------------------
    def _on_rollback(self) -> None:
        run = self.lab.run
        if not is_live(run):
            return
        resume = self.resume_after.isChecked()
        self.answers.add(run.rollback(ROLLBACK_FACTOR), lambda ack: self._rolled_back(ack, run),
                         self._rollback_refused)
        if resume:
            self.answers.add(run.resume(), lambda ack: None, lambda why: self.lab.status(f"cannot resume: {why}"))
        self.rollback_button.setEnabled(False)
        self.title.setText(self.title.text() + " <i>Rolling back…</i>")
        self.lab.status("rolling back to the last good checkpoint with the learning rate / 10")

    def _rolled_back(self, ack: dict[str, Any], run: Run) -> None:
        self.lab.status(f"rolled back: {restored_text(ack.get('data') or {})}")
        if run is self._run:
            self._show_rollback(int(ack["step"]), dict(ack.get("data") or {}), run)

    def _rollback_refused(self, reason: str) -> None:
        self.lab.status(f"cannot roll back: {reason}")
        self.title.setText(self.title.text().replace(" <i>Rolling back…</i>", "")
                           + f" <b>Cannot roll back:</b> {html.escape(reason)}")
        self.rollback_button.setEnabled(False)

    def _on_resume(self) -> None:
        run = self.lab.run
        if is_live(run):
            self.answers.add(run.resume(), lambda ack: self.lab.status(f"resumed at step {ack['step']:,}"),
                             lambda why: self.lab.status(f"cannot resume: {why}"))
        if self.mode == "rolled_back":
            self.resume_button.hide()
        else:
            self._hide()

    def _on_dismiss(self) -> None:
        self._hide()


def restored_text(d: dict[str, Any]) -> str:
    """What a roll-back restored, from its ack's or event's data: ``restored step 1,200, lr 0.005``."""
    to_step, lr = d.get("to_step"), d.get("lr")
    where = f"restored step {to_step:,}" if isinstance(to_step, int) else "restored the last good checkpoint"
    return where + (f", lr {fmt(float(lr))}" if isinstance(lr, (int, float)) else "")
