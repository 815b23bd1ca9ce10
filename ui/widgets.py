"""Small input widgets that refuse invalid values at the field, with the reason shown."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QPoint, QRect, QSize, Qt, Signal
from PySide6.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLayout,
    QLayoutItem,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from lrviz.config import parse_lr
from lrviz.errors import ConfigError, LrvizError
from lrviz.export import format_number  # noqa: F401  (the UI formats numbers as the core does)

from . import theme


def breakable(text: str) -> str:
    """``text`` with zero-width spaces after ``, : + ;`` so a word-wrapped label can break long specs."""
    for ch in ",:+;":
        text = text.replace(ch, ch + "\u200b")
    return text


def form_layout(margins: tuple[int, int], row_spacing: int) -> QFormLayout:
    """A compact form: labels right-aligned, fields growing; ``margins`` (left/right, top/bottom)."""
    f = QFormLayout()
    f.setContentsMargins(margins[0], margins[1], margins[0], margins[1])
    f.setHorizontalSpacing(8)
    f.setVerticalSpacing(row_spacing)
    f.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    f.setLabelAlignment(Qt.AlignmentFlag.AlignRight)
    return f


def row_layout(*items: QWidget | None, grow: QWidget | None = None) -> QHBoxLayout:
    """A row of widgets, left to right; ``None`` is a stretch (what is after it goes to the right),
    ``grow`` the widget that takes the row's spare width."""
    row = QHBoxLayout()
    for item in items:
        if item is None:
            row.addStretch(1)
        else:
            row.addWidget(item, 1 if item is grow else 0)
    return row


class ErrorLabel(QLabel):
    """A word-wrapped red message under a form; hidden while empty."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWordWrap(True)
        # long messages wrap inside the panel instead of widening it
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setStyleSheet(f"color: {theme.ERROR_COLOUR};")
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.hide()

    def show_error(self, message: str | None) -> None:
        self.setText(breakable(message or ""))
        self.setToolTip(message or "")
        self.setVisible(bool(message))

    def watch(self, *fields: ValidatedLineEdit) -> None:
        """Show the first error of ``fields`` (kept up to date as they change)."""
        self._fields = [*getattr(self, "_fields", []), *fields]
        for f in fields:
            f.errorChanged.connect(self._on_field_error)
        self._on_field_error()

    def _on_field_error(self, *_: object) -> None:
        errors = [f.error() for f in self._fields if f.isEnabled() and f.error()]
        self.show_error(errors[0] if errors else None)


class ValidatedLineEdit(QLineEdit):
    """A line edit whose text is checked by ``parse`` (which raises ConfigError with the reason).

    Invalid text gets a red border and the reason as tooltip (an :class:`ErrorLabel` can show it too);
    ``value()`` returns the parsed value or raises. Empty text means ``None`` when ``allow_empty``.
    """

    validityChanged = Signal(bool)
    errorChanged = Signal(str)

    def __init__(
        self,
        parse: Callable[[str], Any],
        text: str = "",
        *,
        allow_empty: bool = False,
        placeholder: str = "",
        tooltip: str = "",
        parent: QWidget | None = None,
    ):
        super().__init__(text, parent)
        self._parse = parse
        self._allow_empty = allow_empty
        self._tooltip = tooltip
        self._error: str | None = None
        self._external: str | None = None
        if placeholder:
            self.setPlaceholderText(placeholder)
        self.setToolTip(tooltip)
        self.textChanged.connect(self._on_text_changed)
        self._on_text_changed(text)

    def set_parser(self, parse: Callable[[str], Any]) -> None:
        self._parse = parse
        self._on_text_changed(self.text())

    def _check(self, text: str) -> str | None:
        if not text.strip():
            return None if self._allow_empty else "a value is required"
        try:
            self._parse(text.strip())
        except LrvizError as exc:
            return str(exc)
        except (TypeError, ValueError) as exc:
            return str(exc)
        return None

    def _on_text_changed(self, text: str) -> None:
        was = self.is_valid()
        self._external = None
        self._error = self._check(text)
        self._show()
        if was != self.is_valid():
            self.validityChanged.emit(self.is_valid())

    def _show(self) -> None:
        msg = self.error()
        self.setStyleSheet(f"QLineEdit {{ {theme.ERROR_STYLE} }}" if msg else "")
        self.setToolTip(msg or self._tooltip)
        self.errorChanged.emit(msg or "")

    def set_hint(self, tooltip: str) -> None:
        """The tooltip shown while the text is valid (an error shows instead)."""
        self._tooltip = tooltip
        self._show()

    def set_error(self, message: str | None) -> None:
        """Mark the field invalid for a reason found elsewhere (e.g. by the engine); cleared on edit."""
        was = self.is_valid()
        self._external = message
        self._show()
        if was != self.is_valid():
            self.validityChanged.emit(self.is_valid())

    def error(self) -> str | None:
        return self._error or self._external

    def is_valid(self) -> bool:
        return getattr(self, "_error", None) is None and getattr(self, "_external", None) is None

    def value(self) -> Any:
        """The parsed value (None for empty text when allowed); raises ConfigError when invalid."""
        text = self.text().strip()
        if not text and self._allow_empty:
            return None
        if self._error:
            raise ConfigError(self._error)
        return self._parse(text)


def parse_float_in(low: float, high: float | None, what: str, high_open: bool = False) -> Callable[[str], float]:
    """A parser for a number in ``[low, high]`` (or ``[low, high)``) raising ConfigError naming ``what``."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise ConfigError(f"{what} must be a number, not {text!r}") from None
        bad = not math.isfinite(v) or v < low
        if high is not None:
            bad = bad or (v >= high if high_open else v > high)
        if bad:
            rng = f"in [{low:g}, {high:g}{')' if high_open else ']'}" if high is not None else f">= {low:g}"
            raise ConfigError(f"{what} must be {rng}, not {text!r}")
        return v

    return parse


def parse_int_at_least(low: int, what: str) -> Callable[[str], int]:
    """A parser for a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise ConfigError(f"{what} must be a whole number, not {text!r}") from None
        if v < low:
            raise ConfigError(f"{what} must be >= {low}, not {v}")
        return v

    return parse


class LrControl(QWidget):
    """A learning-rate entry (accepts ``3e-4``) and a log-scale slider that stay in sync.

    ``lrCommitted(float)`` is emitted on Enter, on the Set button, and when the slider is released.
    """

    lrCommitted = Signal(float)
    LOG_MIN = -6.0
    LOG_MAX = 1.0
    TICKS = 700

    def __init__(self, lr: float = 0.01, parent: QWidget | None = None):
        super().__init__(parent)
        self.error_label = ErrorLabel(self)
        self.edit = ValidatedLineEdit(parse_lr, format_number(lr, 4), tooltip="learning rate, e.g. 0.01 or 3e-4")
        self.error_label.watch(self.edit)
        self.edit.setObjectName("lrEdit")
        self.edit.setMaximumWidth(90)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setObjectName("lrSlider")
        self.slider.setRange(0, self.TICKS)
        self.slider.setToolTip("learning rate, log scale from 1e-6 to 10")
        self.slider.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.set_button = QPushButton("Set")
        self.set_button.setObjectName("lrSet")
        self.set_button.setToolTip("use this rate (mid-run: from the next step on)")
        self.set_button.setAutoDefault(False)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit)
        row.addWidget(self.slider, 1)
        row.addWidget(self.set_button)
        self.slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.slider.setTickInterval(self.TICKS // int(self.LOG_MAX - self.LOG_MIN))  # one tick a decade
        scale = QHBoxLayout()
        scale.setContentsMargins(0, 0, 0, 0)
        for text, align in (("1e-6", Qt.AlignmentFlag.AlignLeft), ("10", Qt.AlignmentFlag.AlignRight)):
            lab = QLabel(text)
            lab.setAlignment(align)
            lab.setStyleSheet(f"color: {theme.GREY}; font-size: 8pt;")
            scale.addWidget(lab, 1)
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(2)
        col.addLayout(row)
        slider_row = QHBoxLayout()
        slider_row.setContentsMargins(self.edit.maximumWidth() + 6, 0, self.set_button.sizeHint().width() + 6, 0)
        slider_row.addLayout(scale)
        col.addLayout(slider_row)
        col.addWidget(self.error_label)
        self._syncing = False
        self._sync_slider(lr)
        self.edit.textChanged.connect(self._on_text_changed)
        self.edit.returnPressed.connect(self._on_commit)
        self.set_button.clicked.connect(self._on_commit)
        self.slider.valueChanged.connect(self._on_slider_moved)
        self.slider.sliderReleased.connect(self._on_commit)

    def value(self) -> float:
        """The rate in the entry; raises ConfigError when it is not a valid rate."""
        return self.edit.value()

    def set_value(self, lr: float) -> None:
        self._syncing = True
        try:
            self.edit.setText(format_number(lr, 4))
            self._sync_slider(lr)
        finally:
            self._syncing = False

    def _sync_slider(self, lr: float) -> None:
        if not (lr > 0 and math.isfinite(lr)):  # a watched run's rate can be 0 (a warm-up from 0)
            lr = 10.0 ** self.LOG_MIN
        pos = (math.log10(lr) - self.LOG_MIN) / (self.LOG_MAX - self.LOG_MIN) * self.TICKS
        self.slider.blockSignals(True)
        self.slider.setValue(int(round(min(max(pos, 0), self.TICKS))))
        self.slider.blockSignals(False)

    def _on_text_changed(self, text: str) -> None:
        if self._syncing or not self.edit.is_valid():
            return
        self._sync_slider(self.edit.value())

    def _on_slider_moved(self, pos: int) -> None:
        if self._syncing:
            return
        exponent = self.LOG_MIN + (self.LOG_MAX - self.LOG_MIN) * pos / self.TICKS
        lr = float(f"{10 ** exponent:.2g}")  # round to 2 significant digits: 3e-4, not 2.98e-4
        self._syncing = True
        try:
            self.edit.setText(format_number(lr))
        finally:
            self._syncing = False
        if not self.slider.isSliderDown():  # keyboard or wheel: commit at once
            self._on_commit()

    def _on_commit(self) -> None:
        if not self.edit.is_valid():
            self.edit.setFocus()
            return
        self.lrCommitted.emit(self.edit.value())

    def show_error(self, message: str | None) -> None:
        self.edit.set_error(message)


class FlowLayout(QLayout):
    """Widgets in a row that wraps onto more rows when the space is too narrow (Qt's flow layout).

    Its minimum width is that of its widest widget, so a row of buttons never makes a window wider.
    """

    def __init__(self, parent: QWidget | None = None, spacing: int = 6):
        super().__init__(parent)
        self._items: list[QLayoutItem] = []
        self._spacing = spacing
        self.setContentsMargins(0, 0, 0, 0)

    def addItem(self, item: QLayoutItem) -> None:  # noqa: N802
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int) -> QLayoutItem | None:  # noqa: N802
        return self._items[index] if 0 <= index < len(self._items) else None

    def takeAt(self, index: int) -> QLayoutItem | None:  # noqa: N802
        return self._items.pop(index) if 0 <= index < len(self._items) else None

    def expandingDirections(self) -> Qt.Orientation:  # noqa: N802
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:  # noqa: N802
        return True

    def heightForWidth(self, width: int) -> int:  # noqa: N802
        return self._place(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect: QRect) -> None:  # noqa: N802
        super().setGeometry(rect)
        self._place(rect, move=True)

    def sizeHint(self) -> QSize:  # noqa: N802
        shown = [i for i in self._items if not i.isEmpty()]
        width = sum(i.sizeHint().width() for i in shown) + self._spacing * max(0, len(shown) - 1)
        height = max((i.sizeHint().height() for i in shown), default=0)
        m = self.contentsMargins()
        return QSize(width + m.left() + m.right(), height + m.top() + m.bottom())

    def minimumSize(self) -> QSize:  # noqa: N802
        size = QSize()
        for item in self._items:
            if not item.isEmpty():
                size = size.expandedTo(item.minimumSize())
        m = self.contentsMargins()
        return size + QSize(m.left() + m.right(), m.top() + m.bottom())

    def _place(self, rect: QRect, move: bool) -> int:
        m = self.contentsMargins()
        area = rect.adjusted(m.left(), m.top(), -m.right(), -m.bottom())
        x, y, line = area.x(), area.y(), 0
        for item in self._items:
            if item.isEmpty():
                continue
            hint = item.sizeHint()
            if x > area.x() and x + hint.width() > area.right() + 1:
                x, y, line = area.x(), y + line + self._spacing, 0
            if move:
                item.setGeometry(QRect(QPoint(x, y), hint))
            x += hint.width() + self._spacing
            line = max(line, hint.height())
        return y + line - rect.y() + m.bottom()


class ElidedLabel(QLabel):
    """A one-line label that ends in "…" where its text does not fit, instead of widening its panel
    or being cut mid-letter; the whole text is its tooltip."""

    def __init__(self, text: str = "", parent: QWidget | None = None):
        super().__init__(text, parent)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setTextFormat(Qt.TextFormat.PlainText)

    def setText(self, text: str) -> None:  # noqa: N802
        super().setText(text)
        self.setToolTip(text)

    def shown_text(self) -> str:
        """The text as drawn."""
        return self.fontMetrics().elidedText(self.text(), Qt.TextElideMode.ElideRight, self.contentsRect().width())

    def paintEvent(self, event: Any) -> None:  # noqa: N802
        from PySide6.QtGui import QPainter

        painter = QPainter(self)
        self.style().drawItemText(painter, self.contentsRect(), int(self.alignment()), self.palette(),
                                  self.isEnabled(), self.shown_text(), self.foregroundRole())
