"""File > Connect to a run…: the address and token that ``lrviz run --listen HOST:PORT`` printed."""

from __future__ import annotations

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit, QVBoxLayout, QWidget

from lrviz.errors import ConfigError
from lrviz.live.connection import ConnectionInfo
from lrviz.live.steer import resolve


class ConnectDialog(QDialog):
    """Asks for ``HOST:PORT`` and the token; :meth:`connection` turns them into a ConnectionInfo."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("connectDialog")
        self.setWindowTitle("Connect to a run")
        self.address = QLineEdit()
        self.address.setObjectName("connectAddress")
        self.address.setPlaceholderText("127.0.0.1:7000")
        self.token = QLineEdit()
        self.token.setObjectName("connectToken")
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("the token lrviz run --listen printed")
        note = QLabel("A run started with <code>lrviz run … --listen HOST:PORT</code> prints its address and "
                      "token. The token is the only protection: share it like a password, or tunnel over SSH.")
        note.setWordWrap(True)
        self.error = QLabel("")
        self.error.setObjectName("connectError")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #C00000;")
        form = QFormLayout()
        form.addRow("address", self.address)
        form.addRow("token", self.token)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self._on_ok)
        buttons.rejected.connect(self.reject)
        col = QVBoxLayout(self)
        col.addWidget(note)
        col.addLayout(form)
        col.addWidget(self.error)
        col.addWidget(buttons)
        self.info: ConnectionInfo | None = None

    def connection(self) -> ConnectionInfo:
        """The run the fields name; ConfigError saying what is wrong with them."""
        address = self.address.text().strip()
        if not address:
            raise ConfigError("give the run's address, HOST:PORT (lrviz run --listen printed it)")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{address!r}: give HOST:PORT, e.g. 127.0.0.1:7000")
        info, _ = resolve(address, token=self.token.text().strip() or None)
        return info

    def _on_ok(self) -> None:
        try:
            self.info = self.connection()
        except ConfigError as exc:
            self.error.setText(str(exc))
            return
        self.accept()
