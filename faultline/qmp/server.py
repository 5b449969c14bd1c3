"""The QMP server: a Unix socket, one thread, any number of clients (up to a bound).

The vCPU threads never wait for it. The event log hands each event to :meth:`feed`
(an append to a deque, on whatever thread emitted it); the server's thread picks them up
at its next poll, translates them (events.py) and queues the QMP events per client. Each
client's output queue is bounded: a client that stops reading is disconnected when its
queue fills, and nobody else notices. Commands run on the server's thread, one at a time
(as QEMU's monitor runs them), through :class:`~faultline.qmp.control.VmControl`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faultline import __version__
from faultline.qmp import control as ctl
from faultline.qmp.events import KINDS, Translator, filled
from faultline.qmp.protocol import (
    COMMAND_NOT_FOUND,
    MAX_MESSAGE,
    JsonStreamer,
    QmpError,
    check_arguments,
    check_request,
    encode,
    error_reply,
    event,
    greeting,
    reply,
    request_id,
)

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


class QmpSetupError(Exception):
    """The monitor's socket cannot be created (one line for the CLI, exit 2)."""


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    streamer: JsonStreamer
    negotiated: bool = False
    out: bytearray = field(default_factory=bytearray)
    hangup: bool = False  # its input is refused: close once the last reply is out
    shut: bool = False  # our side shut down (the client sees EOF); its input is drained
    drained: int = 0
    closed: bool = False


def _version() -> dict[str, Any]:
    """query-version's answer. QMP clients expect a 'qemu' triple: it carries faultline's
    version, and 'package' says whose it is."""
    major, minor, micro = [*map(int, __version__.split(".")[:3]), 0, 0, 0][:3]
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"faultline {__version__}"}


# name -> (arguments: name -> (QAPI type, required), handler)
_Handler = Callable[["QmpServer", _Client, dict[str, Any]], Any]
COMMANDS: dict[str, tuple[dict[str, tuple[str, bool]], _Handler]] = {}


def _command(name: str, **schema: tuple[str, bool]) -> Callable[[_Handler], _Handler]:
    def register(fn: _Handler) -> _Handler:
        COMMANDS[name] = (schema, fn)
        return fn
    return register


class QmpServer:
    """Serve QMP on ``path`` for the run behind ``control``. :meth:`bind` creates the
    socket (mode 0600; clients wait in its backlog), :meth:`start` binds it if need be and
    starts serving (``control`` set by then); :meth:`close` delivers what is still queued
    (SHUTDOWN) and removes the socket. ``feed`` is the event log's subscriber."""

    def __init__(self, path: str | Path, control: ctl.VmControl | None = None, *,
                 max_clients: int = 8,
                 out_limit: int = 1 << 20, max_message: int = MAX_MESSAGE,
                 poll_s: float = 0.01) -> None:
        self.path = Path(path)
        self.control = control
        self.max_clients = max_clients
        self.out_limit = out_limit
        self.max_message = max_message
        self.poll_s = poll_s
        self.translator = Translator()
        self.disconnected = 0  # clients dropped for a full queue or an oversized message
        self._inbox: collections.deque[tuple[float, dict[str, Any]]] = collections.deque()
        self._sel: selectors.BaseSelector | None = None  # from bind() to close()
        self._listener: socket.socket | None = None
        self._ino: int | None = None
        self._clients: list[_Client] = []
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._head_wait: float | None = None
        self._flush_s = 2.0
        self._shutdown_sent = False
        self._interrupted = False

    # --- life cycle -------------------------------------------------------------------------
    @property
    def client_count(self) -> int:
        return len(self._clients)

    @property
    def vm(self) -> ctl.VmControl:
        assert self.control is not None, "QmpServer started without a control"
        return self.control

    def bind(self) -> None:
        """Create the listening socket (QmpSetupError with one line if it cannot be)."""
        path = str(self.path)
        # Bound under a temporary name and renamed into place once listening: a client
        # that sees the path can connect (no ECONNREFUSED between bind and listen).
        tmp = f"{path}.{os.getpid()}~"
        if len(os.fsencode(tmp)) > SUN_PATH_MAX:
            raise QmpSetupError(f"--qmp {path}: longer than a Unix socket path can be "
                                f"(about {SUN_PATH_MAX - 8} bytes)")
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise QmpSetupError(f"--qmp {path}: exists and is not a socket")
            if _listening(path):
                raise QmpSetupError(f"--qmp {path}: another server is listening there")
            # else: a stale socket left by a killed run, replaced by the rename
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # The socket file is created by bind() with the umask's mode: 0600 from the start,
        # never briefly open to others. (The umask is process-wide: this runs before the
        # vCPU threads exist.)
        old = os.umask(0o177)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            sock.listen(8)
            os.rename(tmp, path)
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise QmpSetupError(f"--qmp {path}: {e.strerror or e}") from None
        finally:
            os.umask(old)
        self._ino = os.stat(path).st_ino
        sock.setblocking(False)
        self._listener = sock
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ, None)

    def start(self) -> None:
        if self._listener is None:
            self.bind()
        assert self.control is not None, "QmpServer started without a control"
        self._thread = threading.Thread(target=self._loop, name="qmp", daemon=True)
        self._thread.start()

    def feed(self, ev: dict[str, Any]) -> None:
        """Event-log subscriber: called on the emitting thread (a vCPU's, often), so it
        only stamps the time and queues (no syscall, no lock, no wake-up)."""
        if ev.get("kind") in KINDS:
            self._inbox.append((time.time(), ev))

    def close(self, flush_s: float = 2.0, *, interrupted: bool = False) -> None:
        """Deliver the events still queued (the run's SHUTDOWN) for up to ``flush_s``,
        then hang up on every client and remove the socket. Idempotent. A run that ended
        without its vm_stop (interrupted while the VM was being built, say) still gets
        a SHUTDOWN: reason host-signal if ``interrupted``, else host-error."""
        self._flush_s = flush_s
        self._interrupted = interrupted
        self._closing.set()
        try:
            if self._thread is not None:
                self._thread.join(flush_s + 5.0)
                self._thread = None
        finally:  # a second Ctrl-C during the join: the socket still goes
            self._shutdown_sockets()

    def __enter__(self) -> QmpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _shutdown_sockets(self) -> None:
        for c in list(self._clients):
            self._drop(c)
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            # Only our own socket: the path may have been replaced meanwhile.
            with contextlib.suppress(OSError):
                if os.lstat(self.path).st_ino == self._ino:
                    os.unlink(self.path)

    # --- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._closing.is_set():
                for key, mask in sel.select(self.poll_s):
                    if key.data is None:
                        self._accept()
                        continue
                    c: _Client = key.data
                    try:
                        if mask & selectors.EVENT_READ and not c.closed:
                            self._read(c)
                        if mask & selectors.EVENT_WRITE and not c.closed:
                            self._flush(c)
                    except Exception:  # a bug with one client: drop it, serve the rest
                        self._drop(c)
                self._pump(final=False)
            self._pump(final=True)
            if not self._shutdown_sent:
                self.broadcast("SHUTDOWN", {
                    "guest": False,
                    "reason": "host-signal" if self._interrupted else "host-error"})
            self._drain(self._flush_s)
        finally:
            self._shutdown_sockets()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if len(self._clients) >= self.max_clients:
            sock.close()  # a bound on what clients can make the server hold
            return
        sock.setblocking(False)
        c = _Client(sock, JsonStreamer(self.max_message))
        self._clients.append(c)
        assert self._sel is not None
        self._sel.register(sock, selectors.EVENT_READ, c)
        self._send(c, greeting(_version()))

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)  # whatever it sent half of dies with it
            return
        if c.hangup:
            # Discard what it still sends until it sees our EOF: closing with unread input
            # would reset the connection and lose the error reply. Bounded.
            c.drained += len(data)
            if c.drained > 16 * self.max_message:
                self._drop(c)
            return
        for item in c.streamer.feed(data):
            if item.error is not None:
                self._send(c, error_reply(QmpError(item.error)))
                if item.fatal:
                    # The stream cannot be resynchronised: say why, then hang up.
                    self.disconnected += 1
                    c.hangup = True
                    self._flush(c)
                    return
                continue
            self._send(c, self._execute(c, item.value))
            if c.closed:
                return

    def _execute(self, c: _Client, value: Any) -> dict[str, Any]:
        has_id, rid = request_id(value)
        try:
            req = check_request(value)
            if not c.negotiated and req.command != "qmp_capabilities":
                # monitor/qmp.c monitor_qmp_dispatch(): the one command allowed before
                raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               COMMAND_NOT_FOUND)
            entry = COMMANDS.get(req.command)
            if entry is None:
                raise QmpError(f"The command {req.command} has not been found",
                               COMMAND_NOT_FOUND)
            schema, handler = entry
            check_arguments(schema, req.arguments)
            return reply(handler(self, c, req.arguments), has_id, rid)
        except QmpError as e:
            return error_reply(e, has_id, rid)
        except ctl.ControlError as e:
            return error_reply(QmpError(str(e)), has_id, rid)
        except Exception as e:  # a bug behind a command must not take the monitor down
            return error_reply(QmpError(f"internal error: {type(e).__name__}: {e}"),
                               has_id, rid)

    # --- output ---------------------------------------------------------------------------------
    def _send(self, c: _Client, msg: dict[str, Any]) -> None:
        if c.closed:
            return
        c.out += encode(msg)
        if len(c.out) > self.out_limit:
            self.disconnected += 1  # it stopped reading: its queue is full
            self._drop(c)
            return
        self._flush(c)

    def broadcast(self, name: str, data: dict[str, Any] | None = None,
                  when: float | None = None) -> None:
        """An event to every client past negotiation (the spec: none before)."""
        msg = event(name, data, when)
        for c in list(self._clients):
            if c.negotiated:
                self._send(c, msg)

    def _flush(self, c: _Client) -> None:
        if c.closed:
            return
        if c.out:
            try:
                n = c.sock.send(c.out)
                del c.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(c)
                return
        if c.hangup and not c.out and not c.shut:
            c.shut = True
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_WR)
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        sel = self._sel
        if sel is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            if sel.get_key(c.sock).events != want:
                sel.modify(c.sock, want, c)

    def _drop(self, c: _Client) -> None:
        if c.closed:
            return
        c.closed = True
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(c.sock)
        c.sock.close()
        with contextlib.suppress(ValueError):
            self._clients.remove(c)

    def _drain(self, flush_s: float) -> None:
        """At the end: write what is queued while clients read it, up to ``flush_s``."""
        deadline = time.monotonic() + flush_s
        sel = self._sel
        assert sel is not None
        while any(c.out for c in self._clients) and time.monotonic() < deadline:
            for key, mask in sel.select(0.05):
                if key.data is not None and mask & selectors.EVENT_WRITE:
                    self._flush(key.data)

    # --- events ---------------------------------------------------------------------------------
    def _pump(self, final: bool) -> None:
        inbox = self._inbox
        while inbox:
            when, ev = inbox[0]
            if not final and not filled(ev):
                # a fault's record is filled in by the event log after the injection is
                # queued: wait for it (briefly), keeping the order
                now = time.monotonic()
                if self._head_wait is None:
                    self._head_wait = now
                if now - self._head_wait < 1.0:
                    return
            self._head_wait = None
            inbox.popleft()
            for name, data in self.translator.translate(ev):
                self._shutdown_sent |= name == "SHUTDOWN"
                self.broadcast(name, data, when)


def _listening(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
        return True
    except OSError as e:
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        s.close()


# --- commands (QEMU's names and answers: qapi/control.json, qapi/misc.json, run-state) -------
@_command("qmp_capabilities", enable=("list", False))
def _qmp_capabilities(srv: QmpServer, c: _Client, args: dict[str, Any]) -> Any:
    # QEMU's qmp_qmp_capabilities() and qmp_caps_check() (monitor/qmp-cmds-control.c)
    if c.negotiated:
        raise QmpError("Capabilities negotiation is already complete, command ignored",
                       COMMAND_NOT_FOUND)
    for i, cap in enumerate(args.get("enable", [])):
        if not isinstance(cap, str):
            raise QmpError(f"Invalid parameter type for 'enable[{i}]', expected: string")
        if cap != "oob":
            raise QmpError(f"Parameter 'enable[{i}]' does not accept value '{cap}'")
        raise QmpError(f"Capability '{cap}' not available")
    c.negotiated = True
    return {}


@_command("query-version")
def _query_version(srv: QmpServer, c: _Client, args: dict[str, Any]) -> Any:
    return _version()


@_command("query-commands")
def _query_commands(srv: QmpServer, c: _Client, args: dict[str, Any]) -> Any:
    return [{"name": name} for name in COMMANDS]


@_command("query-status")
def _query_status(srv: QmpServer, c: _Client, args: dict[str, Any]) -> Any:
    state = srv.vm.run_state()
    return {"running": state == ctl.RUNNING, "status": state}


@_command("stop")
def _stop(srv: QmpServer, c: _Client, args: dict[str, Any]) -> Any:
    # As QEMU's do_vm_stop() (system/cpus.c): only a running VM stops, and says so with
    # STOP before the command returns.
    if srv.vm.run_state() == ctl.RUNNING:
        srv.vm.pause()
        srv.broadcast("STOP")
    return {}


@_command("cont")
def _cont(srv: QmpServer, c: _Client, args: dict[str, Any]) -> Any:
    state = srv.vm.run_state()
    if state == ctl.SHUTDOWN:
        raise QmpError("Resetting the Virtual Machine is required")  # qmp_cont()
    if state in (ctl.PRELAUNCH, ctl.PAUSED):  # vm_start(): RESUME only if it was not running
        srv.vm.resume()
        srv.broadcast("RESUME")
    return {}


@_command("quit")
def _quit(srv: QmpServer, c: _Client, args: dict[str, Any]) -> Any:
    srv.translator.quit_requested = True
    srv.vm.request_stop("quit (QMP)")
    return {}


@_command("faultline-query-host-events")
def _query_host_events(srv: QmpServer, c: _Client, args: dict[str, Any]) -> Any:
    return srv.vm.host_events()


@_command("faultline-fire-event", index=("int", True))
def _fire_event(srv: QmpServer, c: _Client, args: dict[str, Any]) -> Any:
    if srv.vm.run_state() == ctl.SHUTDOWN:
        raise QmpError("The run has ended")
    return srv.vm.fire_host_event(args["index"])
