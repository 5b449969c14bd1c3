"""The QMP monitor: the wire format against QEMU's messages, the server against a fake run
(with QEMU's own client, qemu.qmp, and with raw sockets for what a well-behaved client
never sends), and the event translation. Real runs: tests/test_qmp_kvm.py."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from faultline.qmp import control as ctl
from faultline.qmp.events import Translator
from faultline.qmp.protocol import (
    JsonStreamer,
    QmpError,
    check_arguments,
    check_request,
    encode,
    event,
)
from faultline.qmp.server import QmpServer, QmpSetupError
from tests.qmp.raw import Raw

# --- the wire format ------------------------------------------------------------------------


def test_streamer_frames_by_braces_not_lines() -> None:
    s = JsonStreamer()
    got = s.feed(b'{"execute": "a"}{"execute": "b", "arguments": {"x": [1, {"y": "}"}]}}  ')
    assert [p.value for p in got] == [
        {"execute": "a"}, {"execute": "b", "arguments": {"x": [1, {"y": "}"}]}}]


def test_streamer_any_chunking_gives_the_same_values() -> None:
    wire = b'{"execute": "q\\"}{", "id": "a\\\\"}\r\n[1, 2] 42 {"k": "\\u00e9"}'
    whole = [(p.value, p.error) for p in JsonStreamer().feed(wire)]
    assert whole == [({"execute": 'q"}{', "id": "a\\"}, None), ([1, 2], None), (42, None),
                     ({"k": "\u00e9"}, None)]
    for cut in range(1, len(wire)):
        s = JsonStreamer()
        parts = s.feed(wire[:cut]) + s.feed(wire[cut:]) + s.feed(b" ")
        assert [(p.value, p.error) for p in parts] == whole, cut


def test_streamer_errors_in_qemus_words_and_recovers() -> None:
    s = JsonStreamer()
    got = s.feed(b'{"execute": }\n{"a": NaN}\n{"x": 1\x01{"execute": "ok"}}')
    assert [p.error for p in got] == ["JSON parse error, expecting value",
                                      "JSON parse error, invalid keyword 'NaN'",
                                      "JSON parse error, stray '\x01'", None,
                                      "JSON parse error, expecting value"]
    assert got[3].value == {"execute": "ok"}  # a control character resets the parser
    assert not any(p.fatal for p in got)


def test_streamer_refuses_oversized_and_too_deep_messages() -> None:
    s = JsonStreamer(max_message=1000)
    [p] = s.feed(b'{"execute": "' + b"x" * 2000)
    assert (p.error, p.fatal) == ("JSON token size limit exceeded", True)
    [p] = JsonStreamer().feed(b"[" * 1025)
    assert (p.error, p.fatal) == ("JSON nesting depth limit exceeded", True)


def test_check_request_as_qmp_dispatch_check_obj() -> None:
    req = check_request({"execute": "stop", "id": {"n": 1}})
    assert (req.command, req.arguments, req.id, req.has_id) == ("stop", {}, {"n": 1}, True)
    for bad, desc in [
        ([], "QMP input must be a JSON object"),
        ({"execute": 1}, "QMP input member 'execute' must be a string"),
        ({"execute": "x", "arguments": []}, "QMP input member 'arguments' must be an object"),
        ({"execute": "x", "exec-oob": "y"}, "QMP input member 'exec-oob' is unexpected"),
        ({"arguments": {}}, "QMP input lacks member 'execute'"),
    ]:
        with pytest.raises(QmpError) as e:
            check_request(bad)
        assert (e.value.cls, e.value.desc) == ("GenericError", desc)


def test_check_arguments_as_qemus_input_visitor() -> None:
    schema = {"index": ("int", True), "name": ("str", False)}
    check_arguments(schema, {"index": 3})
    for args, desc in [
        ({"index": True}, "Invalid parameter type for 'index', expected: integer"),
        ({"index": 1, "name": 2}, "Invalid parameter type for 'name', expected: string"),
        ({"index": 1, "extra": 0}, "Parameter 'extra' is unexpected"),
        ({}, "Parameter 'index' is missing"),
    ]:
        with pytest.raises(QmpError, match="^" + desc.replace("(", r"\(") + "$"):
            check_arguments(schema, args)


def test_encode_and_event_format() -> None:
    assert encode({"return": {}}) == b'{"return": {}}\r\n'
    assert encode({"x": "\u00e9"}).isascii()
    ev = event("STOP", when=1267041730.281295)
    assert ev == {"event": "STOP",
                  "timestamp": {"seconds": 1267041730, "microseconds": 281295}}


# --- event translation ----------------------------------------------------------------------

_RESOLVE = {"kind": "vmm_resolve", "vcpu": 0, "gpa": "0x100002000", "hva": "0x7f0000002000",
            "path": "/dev/shm/r/dax0", "offset": 8192, "file_size": 8192,
            "cause": "beyond-eof", "source": "bare-efault"}


def _fault(decision: str | None) -> tuple[str, dict[str, Any]]:
    return ("FAULTLINE_FAULT", {"vcpu": 0, "gpa": 0x100002000, "hva": 0x7F0000002000,
                                "path": "/dev/shm/r/dax0", "offset": 8192, "file-size": 8192,
                                "cause": "beyond-eof", "source": "bare-efault",
                                "decision": decision})


def _mf(action: str, ar: bool) -> tuple[str, dict[str, Any]]:
    return ("MEMORY_FAILURE", {"recipient": "guest", "action": action,
                               "flags": {"action-required": ar, "recursive": False}})


def _translate(events: list[dict[str, Any]], quit_requested: bool = False) -> list[Any]:
    t = Translator()
    t.quit_requested = quit_requested
    return [e for ev in events for e in t.translate(ev)]


def test_translate_mce_srar() -> None:
    got = _translate([_RESOLVE, {"kind": "vmm_queue_mce", "vcpu": 0, "ar": True},
                      {"kind": "vmm_inject_mce", "vcpu": 0, "mce": "SRAR"},
                      {"kind": "vm_stop", "vm": "completed", "reason": ""},
                      {"kind": "outcome", "outcome": {"vm": "completed"}}])
    assert got == [_fault("mce-srar"), _mf("inject", True),
                   ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}),
                   ("FAULTLINE_OUTCOME", {"vm": "completed"})]


def test_translate_abort_notify_srao_and_causes() -> None:
    assert _translate([_RESOLVE, {"kind": "vm_abort", "vcpu": None, "reason": "policy"},
                       {"kind": "vm_stop", "vm": "aborted", "reason": "policy"}]) == [
        _fault("abort"), _mf("fatal", True),
        ("SHUTDOWN", {"guest": False, "reason": "host-error"})]
    assert _translate([_RESOLVE, {"kind": "vmm_notify", "vcpu": 0, "ar_gpa": "0x100002000"},
                       {"kind": "vmm_notify", "vcpu": None, "ar_gpa": None}]) == [
        _fault("notify"), _mf("inject", True), _mf("inject", False)]
    assert _translate([{"kind": "vmm_inject_mce", "vcpu": 1, "mce": "SRAO"}]) == [
        _mf("inject", False)]
    assert _translate([_RESOLVE, {"kind": "vmm_notify", "vcpu": 0, "cause": "read-only",
                                  "ar_gpa": "0x100002000"}]) == [_fault("refuse-write")]
    assert _translate([_RESOLVE, {"kind": "vm_stop", "vm": "aborted",
                                  "reason": "interrupted"}]) == [
        _fault(None), ("SHUTDOWN", {"guest": False, "reason": "host-signal"})]
    assert _translate([{"kind": "vm_stop", "vm": "aborted", "reason": "quit (QMP)"}],
                      quit_requested=True) == [
        ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
    assert _translate([{"kind": "vm_stop", "vm": "aborted",
                        "reason": "guest panic on vCPU 0 (code 1)"}]) == [
        ("SHUTDOWN", {"guest": True, "reason": "guest-panic"})]
    assert _translate([{"kind": "vm_stop", "vm": "panic",
                        "reason": "guest panic on vCPU 0: bad boot info"}]) == [
        ("SHUTDOWN", {"guest": True, "reason": "guest-panic"})]
    assert _translate([{"kind": "vm_stop", "vm": "reset",
                        "reason": "vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)"}]) == [
        ("SHUTDOWN", {"guest": True, "reason": "guest-reset"})]


# --- the server, against a fake run ----------------------------------------------------------


class FakeRun:
    """A run's control interface without a VM: the states and what was asked of it."""

    def __init__(self) -> None:
        self.state = ctl.PRELAUNCH
        self.calls: list[str] = []

    def run_state(self) -> str:
        return self.state

    def pause(self) -> None:
        self.calls.append("pause")
        self.state = ctl.PAUSED

    def resume(self) -> None:
        self.calls.append("resume")
        self.state = ctl.RUNNING

    def request_stop(self, reason: str) -> None:
        self.calls.append(f"stop {reason}")

    def host_events(self) -> list[dict[str, Any]]:
        return [{"index": 0, "action": "truncate", "file": "dax0", "trigger": "toucher:1"}]

    def fire_host_event(self, index: int) -> dict[str, Any]:
        if index == 99:
            raise RuntimeError("a bug")
        if index != 0:
            raise ctl.ControlError(f"the scenario has no host event {index} (it has 1)")
        self.calls.append("fire 0")
        return {"action": "truncate", "size-before": 16384, "size-after": 8192}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[QmpServer, FakeRun]]:
    run = FakeRun()
    srv = QmpServer(tmp_path / "qmp.sock", run, out_limit=64 * 1024)
    srv.start()
    try:
        yield srv, run
    finally:
        srv.close()


def _client_session(path: Path, run: FakeRun) -> list[Any]:
    async def go() -> list[Any]:
        qmp = QMPClient("test")
        await qmp.connect(str(path))
        assert qmp.greeting is not None
        out: list[Any] = [dict(qmp.greeting.QMP.version)]
        out.append(await qmp.execute("query-status"))
        out.append(await qmp.execute("cont"))
        out.append((await qmp.events.get())["event"])
        out.append(await qmp.execute("query-status"))
        out.append(await qmp.execute("stop"))
        out.append((await qmp.events.get())["event"])
        out.append(await qmp.execute("stop"))  # already paused: no event
        out.append(await qmp.execute("faultline-fire-event", {"index": 0}))
        for cmd, args in [("faultline-fire-event", {"index": 5}), ("nope", None),
                          ("faultline-fire-event", {"index": 99}),
                          ("faultline-fire-event", {"index": "0"})]:
            try:
                await qmp.execute(cmd, args)
            except ExecuteError as e:
                out.append((e.error_class, str(e)))
        out.append(await qmp.execute("quit"))
        await qmp.disconnect()
        return out

    return asyncio.run(go())


def test_qemu_client_drives_the_fake_run(served: tuple[QmpServer, FakeRun]) -> None:
    srv, run = served
    out = _client_session(srv.path, run)
    assert out == [
        {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "faultline 0.1.0"},
        {"running": False, "status": "prelaunch"}, {}, "RESUME",
        {"running": True, "status": "running"}, {}, "STOP", {},
        {"action": "truncate", "size-before": 16384, "size-after": 8192},
        ("GenericError", "the scenario has no host event 5 (it has 1)"),
        ("CommandNotFound", "The command nope has not been found"),
        ("GenericError", "internal error: RuntimeError: a bug"),
        ("GenericError", "Invalid parameter type for 'index', expected: integer"),
        {}]
    assert run.calls == ["resume", "pause", "fire 0", "stop quit (QMP)"]


def test_raw_protocol_errors(served: tuple[QmpServer, FakeRun]) -> None:
    srv, run = served
    c = Raw(srv.path)
    greeting = c.recv()
    assert greeting == {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0},
                                            "package": "faultline 0.1.0"},
                                "capabilities": []}}
    assert c.cmd(b'{"execute": "query-status", "id": 1}') == {"error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}
    assert c.cmd(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}') == {
        "error": {"class": "GenericError", "desc": "Capability 'oob' not available"}}
    assert c.cmd(b'{"execute": "qmp_capabilities", "id": "n"}') == {"return": {}, "id": "n"}
    assert c.cmd(b'{"execute": }') == {"error": {"class": "GenericError",
                                                 "desc": "JSON parse error, expecting value"}}
    assert c.cmd(b'{"execute": "stop", "idd": 1}')["error"]["desc"] == \
        "QMP input member 'idd' is unexpected"
    assert c.cmd(b'{"execute": "qmp_capabilities"}')["error"] == {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored"}
    assert c.cmd(b'{"execute": "query-status"}') == {
        "return": {"running": False, "status": "prelaunch"}}
    names = {x["name"] for x in c.cmd(b'{"execute": "query-commands"}')["return"]}
    assert {"qmp_capabilities", "query-status", "query-version", "stop", "cont", "quit",
            "faultline-fire-event", "faultline-query-host-events"} <= names
    c.close()
    assert run.calls == []  # nothing above reached the run


def test_oversized_message_gets_the_error_then_a_hangup(tmp_path: Path) -> None:
    run = FakeRun()
    with QmpServer(tmp_path / "q.sock", run, max_message=4096) as srv:
        c = Raw(srv.path)
        c.recv()
        c.sock.sendall(b'{"execute": "' + b"a" * 8192 + b'"}')
        assert c.recv() == {"error": {"class": "GenericError",
                                      "desc": "JSON token size limit exceeded"}}
        assert c.file.readline() == b""  # then the server hangs up
        c.close()
        # ... and serves the next client as before
        d = Raw(srv.path)
        d.recv()
        assert d.cmd(b'{"execute": "qmp_capabilities"}') == {"return": {}}
        d.close()
        assert srv.disconnected == 1


def _wait(cond: Any, what: str) -> None:
    deadline = time.monotonic() + 20
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def test_a_client_that_never_reads_is_disconnected_alone(tmp_path: Path) -> None:
    with QmpServer(tmp_path / "q.sock", FakeRun(), out_limit=8192) as srv:
        deaf, good = Raw(srv.path), Raw(srv.path)
        for c in (deaf, good):
            c.recv()
            assert c.cmd(b'{"execute": "qmp_capabilities"}') == {"return": {}}
        got: list[dict[str, Any]] = []
        n = 6000  # ~800 KB of events: more than the kernel buffers plus the queue
        for i in range(n):
            srv.feed({"kind": "outcome", "outcome": {"i": i, "pad": "x" * 64}})
            if i % 50 == 49:  # the good client keeps up with each burst
                got.extend(good.recv() for _ in range(50))
        _wait(lambda: srv.disconnected == 1, "the deaf client dropped")
        assert [e["data"]["i"] for e in got] == list(range(n))  # the reader got all
        assert {e["event"] for e in got} == {"FAULTLINE_OUTCOME"}
        deaf.sock.settimeout(10)
        while deaf.sock.recv(65536):  # what was in flight, then EOF: it was hung up on
            pass
        deaf.close()
        good.close()


def test_events_go_only_to_negotiated_clients(served: tuple[QmpServer, FakeRun]) -> None:
    srv, _ = served
    early, ready = Raw(srv.path), Raw(srv.path)
    early.recv()
    ready.recv()
    ready.cmd(b'{"execute": "qmp_capabilities"}')
    srv.feed({"kind": "vm_stop", "vm": "completed", "reason": ""})
    assert ready.recv()["event"] == "SHUTDOWN"
    # the first thing the early client gets is its reply, not the event
    assert early.cmd(b'{"execute": "query-status"}')["error"]["class"] == "CommandNotFound"
    early.close()
    ready.close()


def test_socket_mode_and_removal(tmp_path: Path) -> None:
    path = tmp_path / "q.sock"
    srv = QmpServer(path, FakeRun())
    srv.start()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    srv.close()
    assert not path.exists()
    srv.close()  # idempotent


def test_socket_path_problems(tmp_path: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(QmpSetupError, match="exists and is not a socket"):
        QmpServer(regular, FakeRun()).start()
    assert regular.read_text() == "keep me"
    with pytest.raises(QmpSetupError, match="longer than a Unix socket path"):
        QmpServer(tmp_path / ("x" * 120), FakeRun()).start()
    with QmpServer(tmp_path / "q.sock", FakeRun()), \
            pytest.raises(QmpSetupError, match="another server is listening"):
        QmpServer(tmp_path / "q.sock", FakeRun()).start()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # a socket file nobody listens on: replaced
    with QmpServer(tmp_path / "stale.sock", FakeRun()) as srv:
        c = Raw(srv.path)
        assert "QMP" in c.recv()
        c.close()
    assert len(os.listdir("/proc/self/fd")) == fds  # refused or closed, nothing left open


def test_clients_beyond_the_bound_are_turned_away(tmp_path: Path) -> None:
    with QmpServer(tmp_path / "q.sock", FakeRun(), max_clients=2) as srv:
        a, b = Raw(srv.path), Raw(srv.path)
        assert "QMP" in a.recv() and "QMP" in b.recv()
        c = Raw(srv.path)
        assert c.file.readline() == b""  # closed at once, no greeting
        c.close()
        a.close()  # a place frees up
        _wait(lambda: srv.client_count == 1, "the server saw the hang-up")
        d = Raw(srv.path)
        assert "QMP" in d.recv()
        for x in (b, d):
            x.close()

