"""QMP's wire format, as QEMU speaks it (docs/interop/qmp-spec.rst in QEMU's tree).

Pure: no sockets, no threads. :class:`JsonStreamer` splits a byte stream into JSON values
the way QEMU's json-streamer does (by counting braces, not by lines); :func:`check_request`
and :func:`check_arguments` validate a request with QEMU's error messages; the builders
make replies and events. Every message the server sends is one line of ASCII JSON ended
by CRLF.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

# QEMU caps one request at 64 MiB of tokens (qobject/json-streamer.c MAX_TOKEN_SIZE); a
# monitor with a handful of small commands needs far less, and a smaller cap bounds what
# one client can make the server hold. QEMU's nesting cap (MAX_NESTING) is kept.
MAX_MESSAGE = 1 << 20
MAX_NESTING = 1024

# Outside a string: structure, the start of a string, and control characters (other than
# tab, CR, LF), which QEMU's lexer rejects: a client sends one to reset the parser.
_OUTSIDE = re.compile(rb'[{}\[\]"\x00-\x08\x0b\x0c\x0e-\x1f]')
_INSIDE = re.compile(rb'["\\\x00-\x1f]')  # inside a string: its end, an escape, a control
_SCALAR_END = re.compile(rb"[ \t\r\n{\[]")
_WS = b" \t\r\n"


class QmpError(Exception):
    """A command failed: becomes ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, cls: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


@dataclass(frozen=True, slots=True)
class Parsed:
    """One value off the stream, or why there is none. ``fatal``: the stream cannot be
    resynchronised (an oversized message): the server replies, then hangs up."""

    value: Any = None
    error: str | None = None
    fatal: bool = False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")  # NaN / Infinity are not JSON


def _loads(raw: bytes) -> Parsed:
    try:
        return Parsed(json.loads(raw.decode("utf-8"), parse_constant=_reject_constant))
    except UnicodeDecodeError:
        return Parsed(error="JSON parse error, invalid UTF-8 sequence")
    except ValueError as e:
        # json's "Expecting value: line 1 column 13 (char 12)" -> QEMU's wording,
        # "JSON parse error, expecting value" (qobject/json-parser.c parse_error)
        msg = str(e).split(":", 1)[0]
        return Parsed(error=f"JSON parse error, {msg[:1].lower()}{msg[1:]}")


class JsonStreamer:
    """Bytes in, complete JSON values out, as QEMU's json-streamer frames them: an object
    or array ends when its braces balance (no newline needed); a top-level scalar ends at
    whitespace. A control character outside a string is a lexical error that resets the
    parser (the spec's way for a client to get back to a known-good state). A message over
    ``max_message`` bytes or ``MAX_NESTING`` deep is refused with QEMU's messages."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._pos = 0  # next byte to scan
        self._depth = 0
        self._in_str = False

    def _reset(self, upto: int) -> None:
        del self._buf[:upto]
        self._pos = 0
        self._depth = 0
        self._in_str = False

    def feed(self, data: bytes) -> list[Parsed]:
        out: list[Parsed] = []
        buf = self._buf
        buf += data
        i = self._pos
        while i < len(buf):
            n = len(buf)
            if self._in_str:
                m = _INSIDE.search(buf, i)
                if m is None:
                    i = n
                    break
                j = m.start()
                c = buf[j]
                if c == 0x5C:  # backslash: the next byte is escaped (wait for it)
                    if j + 1 >= n:
                        i = j
                        break
                    i = j + 2
                elif c == 0x22:
                    self._in_str = False
                    i = j + 1
                else:
                    out.append(Parsed(error=f"JSON parse error, stray '{chr(c)}'"))
                    self._reset(j + 1)
                    i = 0
                continue
            if self._depth == 0:
                while i < n and buf[i] in _WS:
                    i += 1
                del buf[:i]
                i = 0
                if not buf:
                    break
                c = buf[0]
                if c in b"{[":
                    self._depth = 1
                    i = 1
                    continue
                if c < 0x20 and c not in _WS:
                    out.append(Parsed(error=f"JSON parse error, stray '{chr(c)}'"))
                    self._reset(1)
                    continue
                if c in b"}]":  # closes nothing
                    out.append(Parsed(error="JSON parse error, expecting value"))
                    self._reset(1)
                    continue
                m = _SCALAR_END.search(buf, 1)
                if m is None:  # a scalar runs to the end of what came so far
                    if len(buf) > self.max_message:
                        out.append(Parsed(error="JSON token size limit exceeded", fatal=True))
                        self._reset(len(buf))
                    break
                out.append(_loads(bytes(buf[:m.start()])))
                self._reset(m.start())
                continue
            m = _OUTSIDE.search(buf, i)
            if m is None:
                i = n
                break
            j = m.start()
            c = buf[j]
            i = j + 1
            if c in b"{[":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    out.append(Parsed(error="JSON nesting depth limit exceeded", fatal=True))
                    self._reset(len(buf))
                    i = 0
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    if i > self.max_message:  # complete, but too big all the same
                        out.append(Parsed(error="JSON token size limit exceeded", fatal=True))
                    else:
                        out.append(_loads(bytes(buf[:i])))
                    self._reset(i)
                    i = 0
            elif c == 0x22:
                self._in_str = True
            else:
                out.append(Parsed(error=f"JSON parse error, stray '{chr(c)}'"))
                self._reset(i)
                i = 0
        self._pos = i
        if (self._depth or self._in_str) and len(buf) > self.max_message:
            out.append(Parsed(error="JSON token size limit exceeded", fatal=True))
            self._reset(len(buf))
        return out


@dataclass(frozen=True, slots=True)
class Request:
    command: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


def request_id(value: Any) -> tuple[bool, Any]:
    """Whether a parsed value carries an ``id`` the reply must echo, and the id."""
    if isinstance(value, dict) and "id" in value:
        return True, value["id"]
    return False, None


def check_request(value: Any) -> Request:
    """A parsed value as a command request, checked as QEMU's qmp_dispatch_check_obj()
    does (qapi/qmp-dispatch.c); ``exec-oob`` is refused, since no ``oob`` is offered."""
    if not isinstance(value, dict):
        raise QmpError("QMP input must be a JSON object")
    command: str | None = None
    for key, v in value.items():
        if key == "execute":
            if not isinstance(v, str):
                raise QmpError("QMP input member 'execute' must be a string")
            command = v
        elif key == "arguments":
            if not isinstance(v, dict):
                raise QmpError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QmpError(f"QMP input member '{key}' is unexpected")
    if command is None:
        raise QmpError("QMP input lacks member 'execute'")
    has_id, rid = request_id(value)
    return Request(command, dict(value.get("arguments", {})), rid, has_id)


# Argument types by QAPI name, with the word QEMU's input visitor uses in its error
# ("Invalid parameter type for 'x', expected: integer"). bool is not an int here.
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "string"),
    "int": ((int,), "integer"),
    "bool": ((bool,), "boolean"),
    "list": ((list,), "array"),
}


def check_arguments(schema: Mapping[str, tuple[str, bool]], args: dict[str, Any]) -> None:
    """Check ``args`` against ``schema`` (name -> (QAPI type, required)) with the messages
    of QEMU's qobject input visitor (qapi/qobject-input-visitor.c)."""
    for name, value in args.items():
        spec = schema.get(name)
        if spec is None:
            raise QmpError(f"Parameter '{name}' is unexpected")
        types, word = _TYPES[spec[0]]
        if not isinstance(value, types) or (spec[0] == "int" and isinstance(value, bool)):
            raise QmpError(f"Invalid parameter type for '{name}', expected: {word}")
    for name, (_, required) in schema.items():
        if required and name not in args:
            raise QmpError(f"Parameter '{name}' is missing")


def encode(message: Mapping[str, Any]) -> bytes:
    """One message on the wire: ASCII JSON, CRLF-terminated (the spec's 'General
    Definitions')."""
    return json.dumps(message, ensure_ascii=True).encode("ascii") + b"\r\n"


def reply(ret: Any, has_id: bool = False, rid: Any = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"return": ret}
    if has_id:
        msg["id"] = rid
    return msg


def error_reply(err: QmpError, has_id: bool = False, rid: Any = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"error": {"class": err.cls, "desc": err.desc}}
    if has_id:
        msg["id"] = rid
    return msg


def event(name: str, data: Mapping[str, Any] | None = None,
          when: float | None = None) -> dict[str, Any]:
    """An asynchronous event; ``when`` (Unix time) defaults to now."""
    t = time.time() if when is None else when
    sec = int(t)
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = dict(data)
    msg["timestamp"] = {"seconds": sec, "microseconds": int((t - sec) * 1_000_000)}
    return msg


def greeting(version: Mapping[str, Any]) -> dict[str, Any]:
    """The server greeting: query-version's answer and no capabilities (no ``oob``)."""
    return {"QMP": {"version": dict(version), "capabilities": []}}
