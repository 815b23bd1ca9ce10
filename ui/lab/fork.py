"""Fork and resume: continue a stored run from one of its checkpoints.

Fork makes a new child run from a checkpoint (weights, optimizer, schedule, random state and data
position restored exactly), optionally with another learning rate or schedule from that step on;
its curve is drawn live over its parent's. Resume continues a stopped or interrupted run from its
last checkpoint, as the same run. Either is a run in a worker process of its own, started with a
spec whose ``origin`` names the run and checkpoint (see :func:`lrviz.live.serve.build_engine`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from lrviz.config import RunConfig, parse_lr
from lrviz.errors import ConfigError, LrvizError
from lrviz.states import EventKind, RunState

from .. import theme
from ..run_table import read_only_reason
from ..widgets import ErrorLabel, ValidatedLineEdit, row_layout
from .common import LabPanel, fmt, form, note_label, push_button

if TYPE_CHECKING:
    from lrviz.live.child import ChildRun
    from lrviz.live.run import Run

    from .panels import Lab

RESUMABLE = (RunState.STOPPED, RunState.INTERRUPTED, RunState.FAILED, RunState.DIVERGED, RunState.CREATED)
STEP_ROLE = Qt.ItemDataRole.UserRole + 1
FORK_TIP = "a new child run from the selected checkpoint, drawn over its parent"
PATH_ROLE = Qt.ItemDataRole.UserRole + 2


def checkpoints_of(store: Any, run_id: int) -> list[tuple[int, str, str, float | None]]:
    """``(step, path, reason, loss)`` of a stored run's checkpoints whose files still exist, by step."""
    out: dict[int, tuple[int, str, str, float | None]] = {}
    for e in store.load_events(run_id):
        if e.kind != EventKind.CHECKPOINT:
            continue
        path = str((e.data or {}).get("path", ""))
        if path and Path(path).exists():
            loss = (e.data or {}).get("loss")
            out[int(e.step)] = (int(e.step), path, str((e.data or {}).get("reason", "")),
                                float(loss) if isinstance(loss, (int, float)) else None)
    return [out[k] for k in sorted(out)]


def _parse_schedule(text: str) -> str:
    from lrviz.schedules import parse_schedule

    return str(parse_schedule(text))


class ForkPanel(LabPanel):
    """Pick a stored run and a checkpoint; fork with a new LR/schedule, or resume the run."""

    def __init__(self, lab: Lab, parent: QWidget | None = None):
        super().__init__(lab, parent)
        self.setObjectName("forkPanel")
        #: The run the last Fork or Resume started.
        self.started: ChildRun | None = None
        self.run_combo = QComboBox()
        self.run_combo.setObjectName("forkRun")
        self.run_combo.setToolTip("a stored run (selecting one in Runs picks it here too)")
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setAutoDefault(False)
        self.checkpoints = QListWidget()
        self.checkpoints.setObjectName("forkCheckpoints")
        self.checkpoints.setToolTip("the run's checkpoints: the step a fork continues from")
        self.checkpoints.setMinimumHeight(80)
        self.checkpoints.setMaximumHeight(150)
        self.lr = ValidatedLineEdit(parse_lr, "", allow_empty=True, placeholder="keep the parent's",
                                    tooltip="the learning rate from the fork's step on (empty: as the parent)")
        self.lr.setObjectName("forkLr")
        self.schedule = ValidatedLineEdit(_parse_schedule, "", allow_empty=True, placeholder="keep the parent's",
                                          tooltip="a schedule from the fork's step on, e.g. "
                                                  "CosineAnnealingLR:T_max=500 or none (constant)")
        self.schedule.setObjectName("forkSchedule")
        self.errors = ErrorLabel()
        self.errors.watch(self.lr, self.schedule)
        self.fork_button = push_button("Fork from checkpoint", "forkButton", FORK_TIP)
        self.resume_button = push_button("Resume run", "resumeButton",
            "continue the run itself from its last checkpoint")
        self.info = note_label(name="forkInfo")

        f = form()
        f.addRow("run", row_layout(self.run_combo, self.refresh_button, grow=self.run_combo))
        f.addRow("checkpoint", self.checkpoints)
        f.addRow("new LR", self.lr)
        f.addRow("schedule", self.schedule)
        buttons = row_layout(self.fork_button, self.resume_button, None)
        col = QVBoxLayout(self)
        col.setContentsMargins(4, 4, 4, 4)
        col.addLayout(f)
        col.addWidget(self.errors)
        col.addLayout(buttons)
        col.addWidget(self.info)
        col.addStretch(1)

        self.refresh_button.clicked.connect(self.refresh)
        self.run_combo.currentIndexChanged.connect(self._on_run_picked)
        self.checkpoints.currentRowChanged.connect(lambda _r: self._update_buttons())
        self.fork_button.clicked.connect(self._on_fork)
        self.resume_button.clicked.connect(self._on_resume)
        self.refresh()

    # ---- the run list ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the stored runs again, keeping the picked one."""
        store = self.lab.store
        keep = self.run_id()
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        if store is not None:
            try:
                runs = store.list_runs()
            except LrvizError as exc:
                runs = []
                self.errors.show_error(f"cannot list the runs: {exc}")
            for info in runs:
                lr = (info.config or {}).get("lr")
                text = f"#{info.id} {info.name or ''} · {info.status}" + (f" · lr {fmt(lr)}" if lr else "")
                self.run_combo.addItem(text, info.id)
        self.run_combo.blockSignals(False)
        if keep is not None and self.run_combo.findData(keep) >= 0:
            self.run_combo.setCurrentIndex(self.run_combo.findData(keep))
        self._on_run_picked()

    def run_id(self) -> int | None:
        data = self.run_combo.currentData()
        return int(data) if data is not None else None

    def select_run(self, run_id: int) -> None:
        """Pick ``run_id`` (e.g. when it is selected in the run browser)."""
        i = self.run_combo.findData(int(run_id))
        if i < 0:
            self.refresh()
            i = self.run_combo.findData(int(run_id))
        if i >= 0:
            self.run_combo.setCurrentIndex(i)

    def select_checkpoint(self, step: int) -> bool:
        for r in range(self.checkpoints.count()):
            if self.checkpoints.item(r).data(STEP_ROLE) == step:
                self.checkpoints.setCurrentRow(r)
                return True
        return False

    def _on_run_picked(self, *_: Any) -> None:
        self.checkpoints.clear()
        rid = self.run_id()
        store = self.lab.store
        self._info = None
        if rid is None or store is None:
            self.info.setText("No stored runs yet: train one (runs keep a checkpoint every 200 steps)."
                              if store is not None else "No run store: runs are not saved in this session.")
            self._update_buttons()
            return
        try:
            self._info = store.get_run(rid)
            points = checkpoints_of(store, rid)
        except LrvizError as exc:
            self.errors.show_error(str(exc))
            self._update_buttons()
            return
        for step, path, reason, loss in points:
            tail = f" · loss {fmt(loss, 4)}" if loss is not None and math.isfinite(loss) else ""
            item = QListWidgetItem(f"step {step:,} · {reason}{tail}")
            item.setData(STEP_ROLE, step)
            item.setData(PATH_ROLE, path)
            item.setToolTip(path)
            self.checkpoints.addItem(item)
        if points:
            self.checkpoints.setCurrentRow(len(points) - 1)
        info = self._info
        parent = f", forked from #{info.parent_id} at step {info.fork_step:,}" if info.parent_id else ""
        self.info.setText(f"Run #{info.id} ({info.status}, {info.steps:,} steps{parent}): "
                          f"{len(points)} checkpoint{'s' if len(points) != 1 else ''}."
                          + ("" if points else " Runs keep checkpoints every N steps (Controls) and at pauses."))
        reason = read_only_reason(info)
        if reason:
            self.info.setText(f"{reason[0].upper()}{reason[1:]}.")
        self._update_buttons()

    def _update_buttons(self) -> None:
        info = getattr(self, "_info", None)
        has_ckpt = self.checkpoints.currentRow() >= 0
        idle = not self.lab.active()
        self.fork_button.setEnabled(idle and info is not None and has_ckpt)
        self.resume_button.setEnabled(idle and info is not None and self.checkpoints.count() > 0
                                      and info.status in RESUMABLE)
        tip = "continue the run itself from its last checkpoint"
        if info is not None and info.status not in RESUMABLE:
            tip = f"run #{info.id} is {info.status}; only stopped or interrupted runs are resumed (fork it instead)"
        self.resume_button.setToolTip(tip)
        self.fork_button.setToolTip(FORK_TIP)
        reason = read_only_reason(info) if info is not None else None
        if reason:  # imported from another tool's logs: nothing to train on
            for b in (self.fork_button, self.resume_button):
                b.setEnabled(False)
                b.setToolTip(reason)

    def run_changed(self, run: Run | None) -> None:
        if run is None or run.is_terminal:  # a run that ended may have new checkpoints to fork from
            self.refresh()
        else:
            self._update_buttons()

    # ---- fork and resume ---------------------------------------------------------------------------
    def _spec(self, info: Any, origin: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """A spec for a run of the stored run's script, with its settings and the app's run options."""
        cfg = self.lab.options.apply(RunConfig.from_dict(dict(info.config)))
        return self.lab.run_spec(cfg, script=info.script_path, origin=origin, **extra)

    def fork(self) -> bool:
        """Fork the picked run from the picked checkpoint (the Fork button); False when refused."""
        info = getattr(self, "_info", None)
        item = self.checkpoints.currentItem()
        if info is None or item is None:
            return False
        if self.lab.active():
            self.errors.show_error("stop the current run first")
            return False
        step, path = int(item.data(STEP_ROLE)), str(item.data(PATH_ROLE))
        try:
            lr = self.lr.value()
            schedule = self.schedule.value()
            extra = []
            if schedule is not None:
                extra.append([step, EventKind.SET_SCHEDULE.value, {"spec": schedule}])
            if lr is not None:
                extra.append([step, EventKind.SET_LR.value, {"lr": lr}])
            change = ", ".join(x for x in (f"lr {fmt(lr)}" if lr is not None else "",
                                           schedule.split(':')[0] if schedule else "") if x)
            name = f"fork of #{info.id} at {step}" + (f" ({change})" if change else "")
            spec = self._spec(info, {"kind": "fork", "run_id": info.id, "checkpoint": path, "step": step},
                              name=name, interventions=extra)
            self.started = self.lab.start_run(spec)
        except (LrvizError, OSError) as exc:
            self.errors.show_error(str(exc))
            return False
        self.errors.show_error(None)
        self.lab.overlay([info.id])
        self.info.setText(f"Forked run #{info.id} at step {step:,}" + (f" with {change}" if change else "")
                          + f"; the parent is drawn in <span style='color:{theme.ORANGE}'>orange</span>.")
        self._update_buttons()
        return True

    def resume(self) -> bool:
        """Continue the picked run from its last checkpoint (the Resume button); False when refused."""
        info = getattr(self, "_info", None)
        if info is None or self.checkpoints.count() == 0:
            return False
        if self.lab.active():
            self.errors.show_error("stop the current run first")
            return False
        last = self.checkpoints.item(self.checkpoints.count() - 1)
        step, path = int(last.data(STEP_ROLE)), str(last.data(PATH_ROLE))
        try:
            if info.status not in RESUMABLE:
                raise ConfigError(f"run #{info.id} is {info.status}; fork it instead")
            spec = self._spec(info, {"kind": "resume", "run_id": info.id, "checkpoint": path, "step": step},
                              name=info.name or None)
            self.started = self.lab.start_run(spec)
        except (LrvizError, OSError) as exc:
            self.errors.show_error(str(exc))
            return False
        self.errors.show_error(None)
        self.info.setText(f"Resuming run #{info.id} from its checkpoint at step {step:,}.")
        self._update_buttons()
        return True

    def _on_fork(self) -> None:
        self.fork()

    def _on_resume(self) -> None:
        self.resume()
