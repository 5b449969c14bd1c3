"""The scenario format shared by both backends: parse, validate strictly, compile.

A scenario is a TOML file (see ``scenarios/*.toml`` and ``docs/scenarios.md``). Every
error is a :class:`ScenarioError` naming the file and the key, so the CLI can print
one line and exit 2.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from faultline import abi
from faultline.vmm.policy import POLICIES  # one list: the decision module's

DESIGNS = ("upstream", "memory-fault-exit", "error-gfn", "request", "apf-error-to-guest")
BACKENDS = ("kvm", "model", "qemu")
# What the model describes (docs/linux-qemu.md): a Linux guest under QEMU, or faultline's own
# VMM and guest (what the kvm backend is). The kvm backend is always "faultline-vmm"; the
# qemu backend (faultline's guest under the system's QEMU, docs/qemu.md) is "qemu".
PROFILES = ("linux-qemu", "faultline-vmm")
DEFAULT_PROFILE = {"kvm": "faultline-vmm", "model": "linux-qemu", "qemu": "qemu"}
# The guest kernel's preemption model (linux-qemu only): CONFIG_PREEMPT_NONE,
# CONFIG_PREEMPT_VOLUNTARY, CONFIG_PREEMPT (full).
PREEMPTS = ("none", "voluntary", "full")
# The guest CPU QEMU presents (linux-qemu only): its machine-check encoding, broadcast and
# the guest's grading of a machine check differ (docs/linux-qemu.md, section 9).
GUEST_CPUS = ("intel", "amd")
EVENT_ACTIONS = ("truncate", "extend", "punch-hole", "poison", "write")
PATTERNS = ("offset", "zero", "ret")
FATES = ("exited", "sigbus", "sigsegv", "killed", "hung", "lost")
# How a run ends (Outcome.vm): completed, hung, or early: aborted (the VMM stopped the VM),
# crashed (the VMM process exited), reset (the VMM reset the guest), panic (the guest
# kernel panicked).
VM_STATES = ("completed", "aborted", "hung", "crashed", "reset", "panic")
MAX_FILE_BYTES = 1 << 40
MAX_VCPUS = 8
MAX_TASKS = 64
# A scenario is a few KiB of TOML; the largest legal one (64 tasks of 256 instructions) is
# well under this. Anything bigger is refused before it is read.
MAX_SCENARIO_BYTES = 1 << 20


class ScenarioError(Exception):
    """A scenario that cannot be run: one line, naming the file and the key."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


@dataclass(frozen=True, slots=True)
class FileSpec:
    name: str
    index: int  # window number: selects the task virtual range and default GPA
    size: int  # initial file size in bytes
    pattern: str
    fill: int | None  # byte value for "byte:0xNN" patterns
    window_gpa: int
    window_bytes: int
    readonly: bool
    path: str  # relative to the run directory

    @property
    def pages(self) -> int:
        return self.window_bytes // abi.PAGE_SIZE

    def gpa(self, page: int) -> int:
        return self.window_gpa + page * abi.PAGE_SIZE


@dataclass(frozen=True, slots=True)
class Mapping:
    """One page of a task's address space: what the guest's page tables map."""

    slot: int
    region: str  # "anon" or a file name
    page: int  # anon index or page within the window
    vaddr: int
    gpa: int
    writable: bool
    executable: bool
    window: int | None  # window index, None for anon

    @property
    def ref(self) -> str:
        return f"{self.region}[{self.page}]"


@dataclass(frozen=True, slots=True)
class Insn:
    op: int
    slot: int
    flags: int
    arg: int
    imm: int
    text: str  # the source line, for traces

    def encode(self) -> bytes:
        return abi.INSN.pack(self.op, self.slot, self.flags, self.arg, self.imm)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    name: str
    index: int
    vcpu: int
    program: tuple[Insn, ...]
    maps: tuple[Mapping, ...]
    early_kill: bool
    # The vCPUs the guest's scheduler may run the task on (sched_setaffinity()); None:
    # any (a Linux task's default). Only the model's linux-qemu profile moves tasks
    # (difference 7); faultline's guest runs each task on `vcpu` only.
    cpus: tuple[int, ...] | None = None

    def map_for_vaddr(self, vaddr: int) -> Mapping | None:
        page = vaddr & ~(abi.PAGE_SIZE - 1)
        for m in self.maps:
            if m.vaddr == page:
                return m
        return None


@dataclass(frozen=True, slots=True)
class Trigger:
    task: str | None  # None: before the guest starts
    step: int  # after the task's step-th completed step (1-based)

    def __str__(self) -> str:
        return "start" if self.task is None else f"{self.task}:{self.step}"


@dataclass(frozen=True, slots=True)
class HostEvent:
    index: int
    action: str
    file: str
    size: int | None
    offset: int
    length: int
    value: int
    trigger: Trigger
    by: str  # "runner" or "subprocess": who changes the file on the host


@dataclass(frozen=True, slots=True)
class TaskExpect:
    fate: str | None = None
    code: int | None = None
    signal: str | None = None
    vaddr: int | None = None


@dataclass(frozen=True, slots=True)
class Expectation:
    backends: tuple[str, ...] | None
    designs: tuple[str, ...] | None
    policies: tuple[str, ...] | None
    vm: str | None
    tasks: dict[str, TaskExpect]
    offlined: tuple[int, ...] | None
    exits: dict[str, int]
    faults: tuple[dict[str, Any], ...] | None  # None: not constrained
    files_match_writes: bool | None
    profiles: tuple[str, ...] | None = None

    def applies(self, backend: str, design: str, policy: str,
                profile: str | None = None) -> bool:
        """``profile`` None: the backend's default profile."""
        profile = profile or DEFAULT_PROFILE.get(backend, "faultline-vmm")
        return (
            (self.backends is None or backend in self.backends)
            and (self.designs is None or design in self.designs)
            and (self.policies is None or policy in self.policies)
            and (self.profiles is None or profile in self.profiles)
        )


@dataclass(frozen=True)
class Scenario:
    name: str
    source: str
    description: str
    vcpus: int
    ram_bytes: int
    apf: bool
    verbose: bool
    files: tuple[FileSpec, ...]
    tasks: tuple[TaskSpec, ...]
    events: tuple[HostEvent, ...]
    policies: tuple[str, ...]
    design: str
    expectations: tuple[Expectation, ...]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    profile: str | None = None  # [vm] profile: the model's default profile for this scenario
    preempt: str | None = None  # [vm] preempt: the linux-qemu guest's preemption model
    # [vm] cpu / amd_succor / mcg_ser_p: the linux-qemu guest CPU's machine-check set-up
    # (faultline.model.params: guest_cpu, amd_succor, mcg_ser_p); None: the default.
    cpu: str | None = None
    amd_succor: bool | None = None
    mcg_ser_p: bool | None = None

    def file(self, name: str) -> FileSpec:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def expectation(self, backend: str, design: str, policy: str,
                    profile: str | None = None) -> Expectation | None:
        """All [[expect]] blocks that apply, merged in file order (later keys win)."""
        merged: Expectation | None = None
        for e in self.expectations:
            if not e.applies(backend, design, policy, profile):
                continue
            # A block naming no backend says what faultline's fix does; QEMU is held to it
            # only where nothing goes wrong (no host event), else to blocks naming qemu.
            if backend == "qemu" and e.backends is None and self.events:
                continue
            if merged is None:
                merged = e
                continue
            merged = Expectation(
                None, None, None,
                e.vm if e.vm is not None else merged.vm,
                {**merged.tasks, **e.tasks},
                e.offlined if e.offlined is not None else merged.offlined,
                {**merged.exits, **e.exits},
                e.faults if e.faults is not None else merged.faults,
                e.files_match_writes if e.files_match_writes is not None
                else merged.files_match_writes,
            )
        return merged

    def page_gpa(self, ref: str) -> int:
        """GPA of a window page reference like ``dax0[2]`` (anon pages are per task)."""
        region, page, off = _parse_ref_text(self.source, "ref", ref)
        return self.file(region).gpa(page) + off


# --- parsing helpers --------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+|0x[0-9a-fA-F]+)\s*([KMGT]i?B?)?\s*$")
_UNITS = {"K": 10, "M": 20, "G": 30, "T": 40}
_REF_RE = re.compile(
    r"^(?P<region>[A-Za-z_][\w-]*)\[(?P<a>\d+)(?::(?P<b>\d+))?\](?:\+(?P<off>0x[0-9a-fA-F]+|\d+))?$"
)
_NAME_RE = re.compile(r"^[A-Za-z_][\w-]{0,31}$")


def _size(source: str, key: str, value: Any, *, limit: int = MAX_FILE_BYTES) -> int:
    if isinstance(value, bool):
        raise ScenarioError(source, key, f"expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ScenarioError(source, key, f"not a size: {value!r} (e.g. 16384, 0x4000, 16KiB)")
        n = int(m.group(1), 0)
        if m.group(2):
            n <<= _UNITS[m.group(2)[0]]
    else:
        raise ScenarioError(source, key, f"expected a size, got {type(value).__name__}")
    if n < 0 or n > limit:
        raise ScenarioError(source, key, f"size {value!r} out of range (0 .. {limit:#x})")
    return n


def _int(source: str, key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise ScenarioError(source, key, f"expected an integer, got {value!r}") from None
        else:
            raise ScenarioError(source, key, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ScenarioError(source, key, f"{value} out of range ({lo} .. {hi})")
    return value


def _str(source: str, key: str, value: Any, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise ScenarioError(source, key, f"expected a string, got {value!r}")
    if choices is not None and value not in choices:
        raise ScenarioError(source, key, f"unknown value {value!r} (one of: {', '.join(choices)})")
    return value


def _bool(source: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ScenarioError(source, key, f"expected true or false, got {value!r}")
    return value


def _table(source: str, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(source, key, f"expected a table, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            where = f"{key}.{k}" if key else k
            raise ScenarioError(source, where, f"unknown key (allowed: {', '.join(allowed)})")
    return value


def _list(source: str, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ScenarioError(source, key, f"expected an array, got {type(value).__name__}")
    return value


def _names(source: str, key: str, value: Any, choices: tuple[str, ...]) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else _list(source, key, value)
    return tuple(_str(source, key, v, choices) for v in items)


def _parse_ref_text(source: str, key: str, text: str) -> tuple[str, int, int]:
    m = _REF_RE.match(text.strip())
    if not m or m.group("b") is not None:
        raise ScenarioError(source, key, f"bad page reference {text!r} (e.g. dax0[2]+0x10)")
    off = int(m.group("off"), 0) if m.group("off") else 0
    return m.group("region"), int(m.group("a")), off


# --- the loader ---------------------------------------------------------------------

_TOP_KEYS = ("name", "description", "policies", "design", "vm", "files", "tasks", "events",
             "expect")
_VM_KEYS = ("vcpus", "ram", "apf", "verbose", "profile", "preempt", "cpu", "amd_succor",
            "mcg_ser_p")
_FILE_KEYS = ("name", "size", "pattern", "window_gpa", "window_size", "access", "path")
_TASK_KEYS = ("name", "vcpu", "program", "maps", "early_kill", "cpus")
_EVENT_KEYS = ("action", "file", "size", "offset", "length", "value", "after", "by")
_EXPECT_KEYS = ("backend", "design", "policy", "profile", "vm", "tasks", "offlined", "exits",
                "faults", "files_match_writes")
_TASK_EXPECT_KEYS = ("fate", "code", "signal", "vaddr")
_FAULT_EXPECT_KEYS = ("page", "gpa", "cause", "offset", "file_size", "source", "path")


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    p = Path(path)
    source = str(path)
    return loads(read_text(p, source), source=source, default_name=p.stem)


def read_text(p: Path, source: str) -> str:
    """The file's text, read with bounded memory: a regular file of at most
    MAX_SCENARIO_BYTES, or a FIFO (a shell's ``<(...)``) read up to that limit. Devices
    (/dev/zero, /dev/urandom), directories and sockets are refused before any read."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer must not block; cleared before reading.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ScenarioError(source, "", f"cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if st.st_size > MAX_SCENARIO_BYTES:
                raise ScenarioError(source, "", f"{st.st_size} bytes: a scenario file is at "
                                                f"most {MAX_SCENARIO_BYTES} bytes")
        elif not stat.S_ISFIFO(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ScenarioError(source, "", f"cannot read: {kind}")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError as e:
                raise ScenarioError(source, "", f"cannot read: {e.strerror or e}") from None
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_SCENARIO_BYTES:  # a file that grew, or an endless FIFO
                raise ScenarioError(source, "", f"more than {MAX_SCENARIO_BYTES} bytes: a "
                                                "scenario file is at most that")
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode()
    except UnicodeDecodeError:
        raise ScenarioError(source, "", "not a UTF-8 text file") from None


def loads(text: str, *, source: str = "<scenario>", default_name: str = "scenario") -> Scenario:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(source, "", f"malformed TOML: {e}") from None
    return from_dict(raw, source=source, default_name=default_name)


def from_dict(raw: dict[str, Any], *, source: str = "<scenario>",
              default_name: str = "scenario") -> Scenario:
    _table(source, "", raw, _TOP_KEYS)
    name = _str(source, "name", raw.get("name", default_name))
    description = _str(source, "description", raw.get("description", ""))

    vm = _table(source, "vm", raw.get("vm", {}), _VM_KEYS)
    vcpus = _int(source, "vm.vcpus", vm.get("vcpus", 1), 1, MAX_VCPUS)
    ram_bytes = _size(source, "vm.ram", vm.get("ram", abi.DEFAULT_RAM_BYTES), limit=1 << 32)
    if ram_bytes % abi.PAGE_SIZE or ram_bytes < abi.ANON_POOL_GPA + abi.PAGE_SIZE:
        raise ScenarioError(source, "vm.ram", f"must be page-aligned and > {abi.ANON_POOL_GPA:#x}")
    apf = _bool(source, "vm.apf", vm.get("apf", True))
    verbose = _bool(source, "vm.verbose", vm.get("verbose", False))
    profile = _str(source, "vm.profile", vm["profile"], PROFILES) if "profile" in vm else None
    preempt = _str(source, "vm.preempt", vm["preempt"], PREEMPTS) if "preempt" in vm else None
    cpu = _str(source, "vm.cpu", vm["cpu"], GUEST_CPUS) if "cpu" in vm else None
    amd_succor = (_bool(source, "vm.amd_succor", vm["amd_succor"]) if "amd_succor" in vm
                  else None)
    mcg_ser_p = _bool(source, "vm.mcg_ser_p", vm["mcg_ser_p"]) if "mcg_ser_p" in vm else None

    policies = _names(source, "policies", raw.get("policies", ["mce"]), POLICIES)
    if not policies:
        raise ScenarioError(source, "policies", "must list at least one policy")
    design = _str(source, "design", raw.get("design", "memory-fault-exit"), DESIGNS)

    files = _parse_files(source, _list(source, "files", raw.get("files", [])), ram_bytes)
    by_name = {f.name: f for f in files}
    tasks = _parse_tasks(source, _list(source, "tasks", raw.get("tasks", [])), vcpus, by_name,
                         ram_bytes)
    if not tasks:
        raise ScenarioError(source, "tasks", "no task: a scenario runs at least one "
                                             "[[tasks]] entry")
    _check_guest_heap(source, ram_bytes, files, tasks)
    events = _parse_events(source, _list(source, "events", raw.get("events", [])), by_name,
                           {t.name: t for t in tasks})
    expectations = tuple(
        _parse_expect(source, f"expect[{i}]", e, by_name, {t.name: t for t in tasks})
        for i, e in enumerate(_list(source, "expect", raw.get("expect", [])))
    )
    return Scenario(name, source, description, vcpus, ram_bytes, apf, verbose, files, tasks,
                    events, policies, design, expectations, raw, profile, preempt, cpu,
                    amd_succor, mcg_ser_p)


def _parse_files(source: str, items: list[Any], ram_bytes: int) -> tuple[FileSpec, ...]:
    files: list[FileSpec] = []
    for i, item in enumerate(items):
        key = f"files[{i}]"
        t = _table(source, key, item, _FILE_KEYS)
        if "name" not in t:
            raise ScenarioError(source, f"{key}.name", "missing")
        name = _str(source, f"{key}.name", t["name"])
        if not _NAME_RE.match(name) or name == "anon":
            raise ScenarioError(source, f"{key}.name", f"bad file name {name!r}")
        if any(f.name == name for f in files):
            raise ScenarioError(source, f"{key}.name", f"duplicate file {name!r}")
        size = _size(source, f"{key}.size", t.get("size", abi.PAGE_SIZE))
        pattern_text = _str(source, f"{key}.pattern", t.get("pattern", "offset"))
        fill = None
        if pattern_text.startswith("byte:"):
            fill = _int(source, f"{key}.pattern", pattern_text[5:], 0, 255)
            pattern = "byte"
        else:
            pattern = _str(source, f"{key}.pattern", pattern_text, PATTERNS)
        default_window = -(-max(size, abi.PAGE_SIZE) // abi.PAGE_SIZE) * abi.PAGE_SIZE
        if "window_size" not in t and default_window > abi.USER_WINDOW_STRIDE:
            # the window is sized after the file: say which key is too big
            raise ScenarioError(source, f"{key}.size",
                                f"{size:#x} bytes is more than a window maps "
                                f"({abi.USER_WINDOW_STRIDE:#x}); give a smaller size or a "
                                "window_size")
        window_bytes = _size(source, f"{key}.window_size", t.get("window_size", default_window))
        if window_bytes == 0 or window_bytes % abi.PAGE_SIZE:
            raise ScenarioError(source, f"{key}.window_size", "must be a non-zero page multiple")
        if window_bytes > abi.USER_WINDOW_STRIDE:
            raise ScenarioError(source, f"{key}.window_size",
                                f"larger than {abi.USER_WINDOW_STRIDE:#x}")
        gpa = _size(source, f"{key}.window_gpa",
                    t.get("window_gpa", abi.WINDOW_DEFAULT_GPA + i * abi.WINDOW_DEFAULT_STRIDE),
                    limit=(1 << 64) - 1)
        if gpa % abi.PAGE_SIZE:
            raise ScenarioError(source, f"{key}.window_gpa", f"{gpa:#x} is not page-aligned")
        if gpa + window_bytes > 1 << abi.MAX_GUEST_PHYS_BITS:
            raise ScenarioError(source, f"{key}.window_gpa",
                                f"window {gpa:#x}+{window_bytes:#x} is beyond the guest's "
                                f"{abi.MAX_GUEST_PHYS_BITS}-bit physical address space")
        if gpa < ram_bytes:
            raise ScenarioError(source, f"{key}.window_gpa",
                                f"window at {gpa:#x} overlaps guest RAM [0, {ram_bytes:#x})")
        for other in files:
            end = other.window_gpa + other.window_bytes
            if gpa < end and other.window_gpa < gpa + window_bytes:
                raise ScenarioError(source, f"{key}.window_gpa",
                                    f"window {gpa:#x}+{window_bytes:#x} overlaps file "
                                    f"{other.name!r}'s window at {other.window_gpa:#x}")
        access = _str(source, f"{key}.access", t.get("access", "rw"), ("rw", "ro"))
        rel = _str(source, f"{key}.path", t.get("path", name))
        pp = PurePosixPath(rel)
        if pp.is_absolute() or ".." in pp.parts or not pp.parts:
            raise ScenarioError(source, f"{key}.path",
                                f"{rel!r} must be a relative path inside the run directory")
        files.append(FileSpec(name, i, size, pattern, fill, gpa, window_bytes, access == "ro",
                              rel))
    return tuple(files)


class _Mapper:
    """Assigns a task's map slots in order of first reference."""

    def __init__(self, source: str, key: str, files: dict[str, FileSpec], task_index: int,
                 anon_base: int, ram_bytes: int) -> None:
        self.source, self.key, self.files = source, key, files
        self.maps: list[Mapping] = []
        self.slots: dict[tuple[str, int], int] = {}
        self.task_index = task_index
        self.anon_next_gpa = anon_base
        self.ram_bytes = ram_bytes

    def slot(self, region: str, page: int, *, write: bool = False, exec_: bool = False) -> int:
        k = (region, page)
        if k in self.slots:
            s = self.slots[k]
            m = self.maps[s]
            if (write and not m.writable) or (exec_ and not m.executable):
                self.maps[s] = Mapping(m.slot, m.region, m.page, m.vaddr, m.gpa,
                                       m.writable or write, m.executable or exec_, m.window)
            return s
        if len(self.maps) >= abi.MAX_MAPS:
            raise ScenarioError(self.source, self.key, f"more than {abi.MAX_MAPS} pages mapped")
        if region == "anon":
            if page >= 64:
                raise ScenarioError(self.source, self.key, f"anon[{page}]: at most 64 anon pages")
            gpa = self.anon_next_gpa
            if gpa + abi.PAGE_SIZE > self.ram_bytes:
                raise ScenarioError(self.source, self.key, "anon pages do not fit in vm.ram")
            self.anon_next_gpa += abi.PAGE_SIZE
            m = Mapping(len(self.maps), region, page, abi.anon_vaddr(page), gpa, True, exec_, None)
        else:
            f = self.files.get(region)
            if f is None:
                raise ScenarioError(self.source, self.key,
                                    f"unknown region {region!r} (anon or a file name)")
            if page >= f.pages:
                raise ScenarioError(self.source, self.key,
                                    f"{region}[{page}] is outside the {f.pages}-page window")
            # The guest maps what the program writes as writable even over a read-only
            # window: the host (KVM_MEM_READONLY) must be what refuses the store, and the
            # VMM must report it (cause read-only), not drop it silently.
            m = Mapping(len(self.maps), region, page, abi.window_vaddr(f.index, page), f.gpa(page),
                        write, exec_, f.index)
        self.maps.append(m)
        self.slots[k] = m.slot
        return m.slot


def _parse_tasks(source: str, items: list[Any], vcpus: int, files: dict[str, FileSpec],
                 ram_bytes: int) -> tuple[TaskSpec, ...]:
    if len(items) > MAX_TASKS:
        raise ScenarioError(source, "tasks", f"at most {MAX_TASKS} tasks")
    tasks: list[TaskSpec] = []
    anon_gpa = abi.ANON_POOL_GPA
    for i, item in enumerate(items):
        key = f"tasks[{i}]"
        t = _table(source, key, item, _TASK_KEYS)
        if "name" not in t:
            raise ScenarioError(source, f"{key}.name", "missing")
        name = _str(source, f"{key}.name", t["name"])
        if not _NAME_RE.match(name):
            raise ScenarioError(source, f"{key}.name", f"bad task name {name!r}")
        if any(x.name == name for x in tasks):
            raise ScenarioError(source, f"{key}.name", f"duplicate task {name!r}")
        vcpu = t.get("vcpu", 0)
        if isinstance(vcpu, int) and not isinstance(vcpu, bool) and vcpu >= vcpus:
            raise ScenarioError(source, f"{key}.vcpu",
                                f"vCPU {vcpu} does not exist (vm.vcpus = {vcpus})")
        vcpu = _int(source, f"{key}.vcpu", vcpu, 0, vcpus - 1)
        mapper = _Mapper(source, f"{key}.program", files, i, anon_gpa, ram_bytes)
        for j, ref in enumerate(_list(source, f"{key}.maps", t.get("maps", []))):
            region, a, b, _ = _parse_span(source, f"{key}.maps[{j}]",
                                          _str(source, f"{key}.maps[{j}]", ref))
            for p in range(a, b):
                mapper.slot(region, p)
        program = _compile(source, f"{key}.program",
                           _list(source, f"{key}.program", t.get("program", [])), mapper)
        anon_gpa = mapper.anon_next_gpa
        early = _bool(source, f"{key}.early_kill", t.get("early_kill", False))
        cpus = None
        if "cpus" in t:
            raw = _list(source, f"{key}.cpus", t["cpus"])
            cpus = tuple(sorted({_int(source, f"{key}.cpus[{j}]", c, 0, vcpus - 1)
                                 for j, c in enumerate(raw)}))
            if vcpu not in cpus:
                raise ScenarioError(source, f"{key}.cpus",
                                    f"must include the task's vcpu ({vcpu})")
        tasks.append(TaskSpec(name, i, vcpu, program, tuple(mapper.maps), early, cpus))
    return tuple(tasks)


# The guest kernel's per-task layout (faultline/guest/kernel.h): program copy and stack.
_USER_PROG_PAGES = _USER_STACK_PAGES = 2
_USER_PROG_VADDR = abi.USER_STACK_TOP - 0x100000


def guest_heap_pages(ram_bytes: int, files: tuple[FileSpec, ...],
                     tasks: tuple[TaskSpec, ...]) -> int:
    """Pages the guest kernel's allocator needs for this scenario, as kernel.c allocates
    them: the kernel's own tables (build_kernel_tables), one offline bitmap per region
    (add_region), and per task (setup_task) its PML4/PDPT/PD, program copy, stack and the
    page-table pages walk() creates for the program, the stack and every mapping."""
    def bitmap(nbytes: int) -> int:
        return (nbytes // abi.PAGE_SIZE // 8 + abi.PAGE_SIZE - 1) // abi.PAGE_SIZE + 1

    pages = 3 + (abi.ANON_POOL_GPA >> 21)
    pages += bitmap(ram_bytes) + sum(bitmap(f.window_bytes) for f in files)
    for t in tasks:
        vaddrs = [_USER_PROG_VADDR + i * abi.PAGE_SIZE for i in range(_USER_PROG_PAGES)]
        vaddrs += [abi.USER_STACK_TOP - (i + 1) * abi.PAGE_SIZE
                   for i in range(_USER_STACK_PAGES)]
        vaddrs += [m.vaddr for m in t.maps]
        # pml4[0] -> pdpt[0] -> pd0 exist already; everything else is allocated on demand
        pages += 3 + _USER_PROG_PAGES + _USER_STACK_PAGES
        pages += len({va >> 39 for va in vaddrs} - {0})
        pages += len({va >> 30 for va in vaddrs} - {0})
        pages += len({va >> 21 for va in vaddrs})
    return pages


def _check_guest_heap(source: str, ram_bytes: int, files: tuple[FileSpec, ...],
                      tasks: tuple[TaskSpec, ...]) -> None:
    have = (abi.ANON_POOL_GPA - abi.KERNEL_END_MAX) // abi.PAGE_SIZE
    need = guest_heap_pages(ram_bytes, files, tasks)
    if need > have:
        raise ScenarioError(source, "tasks",
                            f"the guest kernel needs about {need} pages for these "
                            f"{len(tasks)} tasks' page tables, programs and stacks; it has "
                            f"{have}: use fewer tasks or fewer distinct pages per task")


def _parse_span(source: str, key: str, text: str) -> tuple[str, int, int, int]:
    m = _REF_RE.match(text.strip())
    if not m:
        raise ScenarioError(source, key, f"bad page reference {text!r} (e.g. dax0[2]+0x10)")
    a = int(m.group("a"))
    b = int(m.group("b")) if m.group("b") is not None else a + 1
    if b <= a:
        raise ScenarioError(source, key, f"empty page range in {text!r}")
    off = int(m.group("off"), 0) if m.group("off") else 0
    return m.group("region"), a, b, off


def _compile(source: str, key: str, lines: list[Any], mapper: _Mapper) -> tuple[Insn, ...]:
    """Compile program text to bytecode. Labels (``label NAME``) take no instruction."""
    labels: dict[str, int] = {}
    stmts: list[tuple[int, list[str]]] = []
    for j, line in enumerate(lines):
        words = _str(source, f"{key}[{j}]", line).split()
        if not words:
            raise ScenarioError(source, f"{key}[{j}]", "empty instruction")
        if words[0] == "label":
            if len(words) != 2 or words[1] in labels:
                raise ScenarioError(source, f"{key}[{j}]", f"bad or duplicate label: {line!r}")
            labels[words[1]] = len(stmts)
            continue
        stmts.append((j, words))
    if not stmts:
        raise ScenarioError(source, key, "empty program (end it with 'exit 0')")
    if len(stmts) > abi.MAX_INSNS:
        raise ScenarioError(source, key, f"more than {abi.MAX_INSNS} instructions")
    out: list[Insn] = []
    for j, words in stmts:
        k = f"{key}[{j}]"
        text = " ".join(words)
        op_name, args = words[0], words[1:]
        op = abi.OPCODES.get(op_name)
        if op is None:
            raise ScenarioError(source, k, f"unknown instruction {op_name!r} "
                                           f"(one of: {', '.join(abi.OPCODES)})")

        def need(n: int, usage: str, _k: str = k, _args: list[str] = args) -> None:
            if len(_args) != n:
                raise ScenarioError(source, _k, f"usage: {usage}")

        if op in (abi.OP_READ, abi.OP_KREAD):
            if len(args) not in (1, 2):
                raise ScenarioError(source, k, f"usage: {op_name} REGION[PAGE][+OFF] [expect=V]")
            region, page, off = _mem_ref(source, k, args[0])
            slot = mapper.slot(region, page)
            flags, imm = 0, 0
            if len(args) == 2:
                if not args[1].startswith("expect="):
                    raise ScenarioError(source, k, f"expected expect=VALUE, got {args[1]!r}")
                flags = abi.INSN_F_EXPECT
                imm = _expect_value(source, k, args[1][7:], region, page, off, mapper)
            out.append(Insn(op, slot, flags, off, imm, text))
        elif op == abi.OP_WRITE:
            need(2, "write REGION[PAGE][+OFF] VALUE")
            region, page, off = _mem_ref(source, k, args[0])
            slot = mapper.slot(region, page, write=True)
            out.append(Insn(op, slot, 0, off, _int(source, k, args[1], 0, (1 << 64) - 1), text))
        elif op == abi.OP_EXEC:
            need(1, "exec REGION[PAGE][+OFF]")
            region, page, off = _mem_ref(source, k, args[0], align=1)
            out.append(Insn(op, mapper.slot(region, page, exec_=True), 0, off, 0, text))
        elif op == abi.OP_READ_SPAN:
            need(1, "read_span REGION[FIRST:END][+OFF]")
            region, a, b, off = _parse_span(source, k, args[0])
            _check_off(source, k, off, 8)
            if b - a > 16:
                raise ScenarioError(source, k, "at most 16 pages per read_span")
            first = mapper.slot(region, a)
            for p in range(a + 1, b):
                mapper.slot(region, p)
            out.append(Insn(op, first, 0, off, b - a, text))
        elif op == abi.OP_YIELD:
            need(0, "yield")
            out.append(Insn(op, 0, 0, 0, 0, text))
        elif op == abi.OP_SPIN:
            need(1, "spin ITERATIONS")
            out.append(Insn(op, 0, 0, _int(source, k, args[0], 0, 0xFFFF_FFFF), 0, text))
        elif op == abi.OP_EXIT:
            need(1, "exit CODE")
            out.append(Insn(op, 0, 0, _int(source, k, args[0], 0, 255), 0, text))
        elif op == abi.OP_LOOP:
            need(2, "loop COUNT LABEL")
            count = _int(source, k, args[0], 1, 0xFFFF_FFFF)
            if args[1].isdigit():  # an instruction index, as in the bytecode
                target = int(args[1])
                if target >= len(stmts):
                    raise ScenarioError(source, k, f"jump target {target} is outside the "
                                                   f"program ({len(stmts)} instructions)")
            elif args[1] in labels:
                target = labels[args[1]]
            else:
                raise ScenarioError(source, k, f"unknown label {args[1]!r}")
            out.append(Insn(op, 0, 0, target, count, text))
    if out[-1].op not in (abi.OP_EXIT, abi.OP_LOOP):
        raise ScenarioError(source, key, "the program must end with 'exit CODE'")
    return tuple(out)


def _check_off(source: str, key: str, off: int, align: int) -> None:
    if off >= abi.PAGE_SIZE or off % align or off + align > abi.PAGE_SIZE:
        raise ScenarioError(source, key, f"offset {off:#x} must be < {abi.PAGE_SIZE:#x} and "
                                         f"{align}-byte aligned")


def _mem_ref(source: str, key: str, text: str, align: int = 8) -> tuple[str, int, int]:
    region, page, off = _parse_ref_text(source, key, text)
    _check_off(source, key, off, align)
    return region, page, off


def _expect_value(source: str, key: str, text: str, region: str, page: int, off: int,
                  mapper: _Mapper) -> int:
    if text != "@":
        return _int(source, key, text, 0, (1 << 64) - 1)
    f = mapper.files.get(region)
    if f is None:
        raise ScenarioError(source, key, "expect=@ (the file's pattern) needs a file page")
    return file_value(f, page * abi.PAGE_SIZE + off)


def file_value(f: FileSpec, offset: int) -> int:
    """The u64 the file initially holds at ``offset`` (its pattern)."""
    if offset >= f.size:
        return 0
    if f.pattern == "offset":
        return abi.pattern_value(f.index, offset)
    if f.pattern == "zero":
        return 0
    byte = 0xC3 if f.pattern == "ret" else (f.fill or 0)
    return int.from_bytes(bytes([byte]) * 8, "little")


def file_contents(f: FileSpec) -> bytes:
    """The initial contents of a backing file."""
    if f.pattern == "offset":
        import array

        words = array.array("Q", (abi.pattern_value(f.index, o) for o in range(0, f.size, 8)))
        return words.tobytes()[: f.size]
    if f.pattern == "zero":
        return bytes(f.size)
    return bytes([0xC3 if f.pattern == "ret" else (f.fill or 0)]) * f.size


def _parse_events(source: str, items: list[Any], files: dict[str, FileSpec],
                  tasks: dict[str, TaskSpec]) -> tuple[HostEvent, ...]:
    events: list[HostEvent] = []
    for i, item in enumerate(items):
        key = f"events[{i}]"
        t = _table(source, key, item, _EVENT_KEYS)
        action = _str(source, f"{key}.action", t.get("action", ""), EVENT_ACTIONS)
        fname = _str(source, f"{key}.file", t.get("file", ""))
        if fname not in files:
            raise ScenarioError(source, f"{key}.file", f"unknown file {fname!r}")
        size = None
        if action in ("truncate", "extend"):
            if "size" not in t:
                raise ScenarioError(source, f"{key}.size", f"{action} needs a size")
            size = _size(source, f"{key}.size", t["size"])
        offset = _size(source, f"{key}.offset", t.get("offset", 0))
        length = _size(source, f"{key}.length", t.get("length", abi.PAGE_SIZE))
        if action in ("punch-hole", "poison") and (offset % abi.PAGE_SIZE or
                                                   length % abi.PAGE_SIZE or not length):
            raise ScenarioError(source, f"{key}.offset",
                                f"{action} needs page-aligned offset and length")
        value = _int(source, f"{key}.value", t.get("value", 0), 0, (1 << 64) - 1)
        after = _str(source, f"{key}.after", t.get("after", "start"))
        if after == "start":
            trig = Trigger(None, 0)
        else:
            tname, _, step = after.rpartition(":")
            if not tname or not step.isdigit() or int(step) < 1:
                raise ScenarioError(source, f"{key}.after",
                                    f"expected 'start' or 'TASK:STEP' (STEP >= 1), got {after!r}")
            if tname not in tasks:
                raise ScenarioError(source, f"{key}.after", f"trigger names unknown task {tname!r}")
            prog = tasks[tname].program
            # Without a loop a task completes at most one step per instruction, so a later
            # step never comes and the event would silently never fire.
            if int(step) > len(prog) and not any(i.op == abi.OP_LOOP for i in prog):
                raise ScenarioError(source, f"{key}.after",
                                    f"{after!r} never fires: task {tname!r} has "
                                    f"{len(prog)} instructions and no loop")
            trig = Trigger(tname, int(step))
        by = _str(source, f"{key}.by", t.get("by", "runner"), ("runner", "subprocess"))
        events.append(HostEvent(i, action, fname, size, offset, length, value, trig, by))
    return tuple(events)


def _parse_expect(source: str, key: str, item: Any, files: dict[str, FileSpec],
                  tasks: dict[str, TaskSpec]) -> Expectation:
    t = _table(source, key, item, _EXPECT_KEYS)
    backends = _names(source, f"{key}.backend", t["backend"], BACKENDS) if "backend" in t else None
    designs = _names(source, f"{key}.design", t["design"], (*DESIGNS, "host")) \
        if "design" in t else None
    policies = _names(source, f"{key}.policy", t["policy"], (*POLICIES, "qemu")) \
        if "policy" in t else None
    profiles = _names(source, f"{key}.profile", t["profile"], PROFILES) \
        if "profile" in t else None
    vm = _str(source, f"{key}.vm", t["vm"], VM_STATES) if "vm" in t else None
    texp: dict[str, TaskExpect] = {}
    for tname, spec in _table(source, f"{key}.tasks", t.get("tasks", {}), tuple(tasks)).items():
        k = f"{key}.tasks.{tname}"
        s = _table(source, k, spec, _TASK_EXPECT_KEYS)
        vaddr = None
        if "vaddr" in s:
            vaddr = _vaddr_ref(source, f"{k}.vaddr", s["vaddr"], files)
        texp[tname] = TaskExpect(
            _str(source, f"{k}.fate", s["fate"], FATES) if "fate" in s else None,
            _int(source, f"{k}.code", s["code"], 0, 255) if "code" in s else None,
            _str(source, f"{k}.signal", s["signal"]) if "signal" in s else None,
            vaddr,
        )
    offlined = None
    if "offlined" in t:
        offlined = tuple(sorted(
            _gpa_ref(source, f"{key}.offlined[{j}]", v, files)
            for j, v in enumerate(_list(source, f"{key}.offlined", t["offlined"]))))
    exits: dict[str, int] = {}
    for kind, n in _table(source, f"{key}.exits", t.get("exits", {}),
                          tuple(t.get("exits", {}) or ())).items():
        exits[kind] = _int(source, f"{key}.exits.{kind}", n, 0, 1 << 32)
    faults: list[dict[str, Any]] | None = [] if "faults" in t else None
    for j, spec in enumerate(_list(source, f"{key}.faults", t.get("faults", []))):
        k = f"{key}.faults[{j}]"
        s = dict(_table(source, k, spec, _FAULT_EXPECT_KEYS))
        if "page" in s:
            s["gpa"] = _gpa_ref(source, f"{k}.page", s.pop("page"), files)
        assert faults is not None
        faults.append(s)
    fmw = _bool(source, f"{key}.files_match_writes", t["files_match_writes"]) \
        if "files_match_writes" in t else None
    return Expectation(backends, designs, policies, vm, texp, offlined, exits,
                       tuple(faults) if faults is not None else None, fmw, profiles)


def _gpa_ref(source: str, key: str, value: Any, files: dict[str, FileSpec]) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    region, page, off = _parse_ref_text(source, key, _str(source, key, value))
    f = files.get(region)
    if f is None:
        raise ScenarioError(source, key, f"unknown file {region!r}")
    if page >= f.pages:
        raise ScenarioError(source, key, f"{region}[{page}] is outside the window")
    return f.gpa(page) + off


def _vaddr_ref(source: str, key: str, value: Any, files: dict[str, FileSpec]) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    region, page, off = _parse_ref_text(source, key, _str(source, key, value))
    if region == "anon":
        return abi.anon_vaddr(page) + off
    f = files.get(region)
    if f is None:
        raise ScenarioError(source, key, f"unknown region {region!r}")
    return abi.window_vaddr(f.index, page) + off


def encode_program(task: TaskSpec) -> bytes:
    return b"".join(i.encode() for i in task.program)
