"""A hand-driven QMP client for the tests: bytes out, lines in (what qemu.qmp's client
would never send)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class Raw:
    def __init__(self, path: Path, *, greeted: bool = False) -> None:
        """Connect; ``greeted``: read the greeting now."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        if greeted:
            assert "QMP" in self.recv()

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return dict(json.loads(line))

    def cmd(self, raw: bytes) -> dict[str, Any]:
        self.sock.sendall(raw)
        return self.recv()

    def close(self) -> None:
        self.file.close()
        self.sock.close()
