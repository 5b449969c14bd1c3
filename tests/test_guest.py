"""Bring-up tests of the guest kernel on real KVM (faultline/guest, faultline/vmm/boot.py).

The driver here is a test fixture, not the VMM: one thread runs the vCPUs round-robin
(switching after each report), decodes reports and serial text, and stops a vCPU at its
first hlt after R_IDLE. Host-side MCE/notification injection is done by the tests.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from faultline import abi
from faultline.scenario import Scenario, file_contents, loads
from faultline.scenario import load as load_scenario

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "scenarios" / "hello.toml"

pytestmark = pytest.mark.kvm

# QEMU's SRAR/SRAO encodings (bank 9): see docs/design.md, "The decision module".
MCI_VAL, MCI_OVER, MCI_UC, MCI_EN = 1 << 63, 1 << 62, 1 << 61, 1 << 60
MCI_MISCV, MCI_ADDRV, MCI_PCC, MCI_S, MCI_AR = 1 << 59, 1 << 58, 1 << 57, 1 << 56, 1 << 55
MCG_RIPV, MCG_EIPV, MCG_MCIP = 1, 2, 4
MCE_BANK = 9


@dataclass(frozen=True)
class Rec:
    kind: str
    vcpu: int
    task: int
    a: int
    b: int
    c: int
    d: int


@dataclass
class Guest:
    sc: Scenario
    tmp: Path
    programs: dict[int, bytes] | None = None
    boot_info: bytes | None = None
    records: list[Rec] = field(default_factory=list)
    serial: dict[int, bytearray] = field(default_factory=dict)
    exits: list[Any] = field(default_factory=list)
    on_exit: Any = None  # on_exit(guest, vcpu, exit) -> True: handled, re-enter
    caught: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        from faultline.guest import kernel_path
        from faultline.kvm import Kvm, uapi
        from faultline.memory import GuestMemory
        from faultline.vmm import boot

        try:
            self.kvm = Kvm()
        except OSError as e:  # pragma: no cover - the conftest skips first
            pytest.skip(f"/dev/kvm is not usable here: {e}")
        self.mem = GuestMemory()
        self.mem.add_anonymous("ram", 0, self.sc.ram_bytes)
        for f in self.sc.files:
            path = self.tmp / f.path
            path.write_bytes(file_contents(f))
            self.mem.add_file(f.name, f.window_gpa, path, size=f.window_bytes,
                              readonly=f.readonly)
        self.vm = self.kvm.create_vm()
        for slot, gpa, size, hva, ro in self.mem.memslots():
            self.vm.set_user_memory_region(slot, gpa, size, hva,
                                           uapi.KVM_MEM_READONLY if ro else 0)
        self.image = boot.load_kernel(kernel_path())
        info = self.boot_info
        if info is None and self.programs:
            info = boot.build_boot_info(self.sc, programs=self.programs)
        boot.write_boot(self.mem.write, self.sc, self.image, boot_info=info)
        mcg_cap = (self.kvm.mce_cap_supported() & (uapi.MCG_CTL_P | uapi.MCG_SER_P)) | 10
        self.vcpus = []
        for i in range(self.sc.vcpus):
            v = self.vm.create_vcpu(i)
            boot.setup_vcpu(v, i, self.image, self.kvm)
            v.setup_mce(mcg_cap)
            self.vcpus.append(v)
            self.serial[i] = bytearray()
        self.done = [False] * self.sc.vcpus
        self.idle = [False] * self.sc.vcpus
        self.pending_irq = [False] * self.sc.vcpus

    def close(self) -> None:
        self.vm.close()
        self.kvm.close()
        self.mem.close()

    # --- the loop ---------------------------------------------------------------------------
    def step(self, i: int, max_exits: int = 100_000) -> Rec | None:
        """Run vCPU i until its next report (returned) or until it stops (None)."""
        from faultline.kvm import Hlt, IoOut, IrqWindowOpen, uapi

        v = self.vcpus[i]
        run = v.kvm_run
        for _ in range(max_exits):
            if self.pending_irq[i]:
                if (run[uapi.kvm_run.ready_for_interrupt_injection.offset]
                        and run[uapi.kvm_run.if_flag.offset]):
                    v.interrupt(abi.NOTIFY_VECTOR)
                    self.pending_irq[i] = False
                    run[uapi.kvm_run.request_interrupt_window.offset] = 0
                else:
                    run[uapi.kvm_run.request_interrupt_window.offset] = 1
            ex = v.run()
            if isinstance(ex, IrqWindowOpen):
                continue
            if self.on_exit is not None and self.on_exit(self, i, ex):
                continue
            if isinstance(ex, IoOut) and ex.port == abi.REPORT_PORT and ex.size == 4:
                gpa = int.from_bytes(ex.data[:4], "little")
                kind, magic, vcpu, task, a, b, c, d = abi.REPORT_STRUCT.unpack(
                    self.mem.read(gpa, abi.REPORT_STRUCT.size))
                assert magic == abi.REPORT_MAGIC, f"bad report magic {magic:#x} at {gpa:#x}"
                rec = Rec(abi.REPORT_KINDS[kind], vcpu, task, a, b, c, d)
                self.records.append(rec)
                if rec.kind == "idle":
                    self.idle[i] = True
                if rec.kind == "panic":
                    self.done[i] = True
                return rec
            if isinstance(ex, IoOut) and ex.port == abi.SERIAL_PORT:
                self.serial[i] += ex.data
                continue
            if isinstance(ex, IoOut) and ex.port == abi.BOOT_PROGRESS_PORT:
                continue
            if isinstance(ex, Hlt) and self.idle[i]:
                self.done[i] = True
                return None
            self.exits.append((i, ex))
            self.done[i] = True
            return None
        raise AssertionError(f"vCPU {i}: no report in {max_exits} exits")

    def run(self, until: Any = None, max_reports: int = 20_000) -> list[Rec]:
        """Round-robin until every vCPU stopped (or `until(rec)` is true)."""
        for _ in range(max_reports):
            if all(self.done):
                return self.records
            for i in range(len(self.vcpus)):
                if self.done[i]:
                    continue
                rec = self.step(i)
                if rec is not None and until is not None and until(rec):
                    return self.records
        raise AssertionError("guest did not finish")

    def inject_mce(self, i: int, gpa: int, ar: bool) -> None:
        from faultline.kvm import uapi

        status = MCI_VAL | MCI_UC | MCI_EN | MCI_MISCV | MCI_ADDRV | MCI_S
        status |= (MCI_AR | 0x134) if ar else 0xC0
        mcg = MCG_MCIP | MCG_RIPV | (MCG_EIPV if ar else 0)
        misc = (2 << 6) | 0xC  # MCM_ADDR_PHYS
        self.vcpus[i].set_mce(uapi.kvm_x86_mce(status=status, addr=gpa, misc=misc,
                                               mcg_status=mcg, bank=MCE_BANK))

    def notify(self, i: int, ranges: list[tuple[int, int, int]], ar: tuple[int, int] | None = None
               ) -> None:
        """Post records (first gpa, npages, cause) and raise NOTIFY_VECTOR on vCPU i."""
        ring = abi.NOTIFY_RING_GPA
        head, tail, entries, _ = abi.NOTIFY_HEADER.unpack(self.mem.read(ring, 16))
        for k, (first, npages, cause) in enumerate(ranges):
            flags, ar_gpa = 0, 0
            if ar is not None and k == 0:
                flags = abi.NOTIFY_F_AR | (ar[0] << abi.NOTIFY_AR_VCPU_SHIFT)
                ar_gpa = ar[1]
            slot = ring + abi.NOTIFY_HEADER.size + (head % entries) * abi.NOTIFY_ENTRY.size
            self.mem.write(slot, abi.NOTIFY_ENTRY.pack(first, npages, cause, flags, ar_gpa))
            head = (head + 1) & 0xFFFF_FFFF
        self.mem.write(ring, abi.NOTIFY_HEADER.pack(head, tail, entries, 0))
        self.pending_irq[i] = True  # delivered when the guest can take it (IF=1)

    def of(self, kind: str, task: int | None = None) -> list[Rec]:
        return [r for r in self.records if r.kind == kind and (task is None or r.task == task)]


@pytest.fixture
def guest(tmp_path: Path):
    made: list[Guest] = []

    def make(sc: Scenario, **kw: Any) -> Guest:
        g = Guest(sc, tmp_path, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def _sc(text: str) -> Scenario:
    return loads(text, source="<test>")


# --- build and load ------------------------------------------------------------------------
def test_build_is_cached_and_loadable() -> None:
    from faultline.guest.build import build
    from faultline.vmm import boot

    p = build()
    mtime = p.stat().st_mtime_ns
    assert build() == p and p.stat().st_mtime_ns == mtime  # nothing changed: no rebuild
    hdr = (p.parent / "abi_gen.h").read_text()
    assert f"#define REPORT_PORT {abi.REPORT_PORT:#x}ULL" in hdr
    img = boot.load_kernel(p)
    assert img.entry == abi.KERNEL_LOAD_GPA
    assert all(abi.KERNEL_LOAD_GPA <= s.gpa and s.gpa + s.memsz <= abi.KERNEL_LOAD_GPA
               + abi.KERNEL_MAX_BYTES for s in img.segments)
    boot.check_layout()


def test_boot_info_layout() -> None:
    from faultline.vmm import boot

    sc = load_scenario(HELLO)
    info = boot.build_boot_info(sc)
    h = abi.BOOT_HEADER.unpack_from(info, 0)
    assert h[0] == abi.BOOT_MAGIC and h[2] == 2 and h[4] == 1 and h[5] == 3
    tasks_off = h[7]
    for t in sc.tasks:
        rec = abi.BOOT_TASK.unpack_from(info, tasks_off + t.index * abi.BOOT_TASK.size)
        assert rec[:4] == (t.index, t.vcpu, len(t.maps), len(t.program))
        assert info[rec[5]:rec[5] + 16 * len(t.program)] == b"".join(
            i.encode() for i in t.program)


def test_load_kernel_rejects_out_of_area(tmp_path: Path) -> None:
    from faultline.vmm import boot

    bad = tmp_path / "bad.elf"
    src = tmp_path / "bad.S"
    src.write_text(".globl _start\n_start: hlt\n")
    os.system(f"gcc -nostdlib -static -Wl,-Ttext=0x10000 -o {bad} {src} 2>/dev/null")
    if not bad.exists():
        pytest.skip("gcc could not build the probe ELF")
    with pytest.raises(boot.BootError, match="outside"):
        boot.load_kernel(bad)


# --- boot and run ----------------------------------------------------------------------------
def _check_clean_run(g: Guest) -> None:
    sc = g.sc
    assert not g.exits, f"unexpected exits: {g.exits}"
    assert not g.of("panic") and not g.of("exception") and not g.of("signal")
    assert sorted(r.a for r in g.of("idle")) == list(range(sc.vcpus))
    assert sorted(r.a for r in g.of("boot")) == list(range(sc.vcpus))
    for t in sc.tasks:
        recs = [r for r in g.records if r.task == t.index]
        assert recs[0].kind == "task_start" and recs[0].a == len(t.program)
        assert all(r.vcpu == t.vcpu for r in recs)
        assert recs[-1].kind == "exit" and recs[-1].a == 0, recs[-1]
        steps = [r for r in recs if r.kind == "step"]
        assert [r.b for r in steps] == list(range(1, len(steps) + 1))
        # every read with an expectation saw the expected value, at the right gpa
        pcs = [r.a for r in steps]
        values = [r for r in recs if r.kind == "value"]
        vi = 0
        for pc in pcs:
            insn = t.program[pc]
            n = {abi.OP_READ: 1, abi.OP_WRITE: 1, abi.OP_EXEC: 1, abi.OP_KREAD: 1,
                 abi.OP_READ_SPAN: insn.imm}.get(insn.op, 0)
            for k in range(n):
                v = values[vi]
                vi += 1
                if insn.op == abi.OP_READ_SPAN:
                    m = t.map_for_vaddr(t.maps[insn.slot].vaddr + k * abi.PAGE_SIZE)
                else:
                    m = t.maps[insn.slot]
                assert m is not None
                assert v.a == m.vaddr + insn.arg and v.c == m.gpa + insn.arg, (insn.text, v)
                if insn.op == abi.OP_WRITE:
                    assert v.b == insn.imm and v.d == abi.VALUE_WRITE
                if insn.flags & abi.INSN_F_EXPECT:
                    assert v.b == insn.imm, (insn.text, hex(v.b))
                if m.window is not None and insn.op in (abi.OP_READ, abi.OP_READ_SPAN):
                    f = sc.files[m.window]
                    if (insn.op, m.page) not in ((abi.OP_READ, 3),):  # dax0[3] is written
                        pass
                    assert v.b in (abi.pattern_value(f.index, m.page * 4096 + insn.arg),
                                   0xFEED, 0xC0FFEE)
        assert vi == len(values)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_hello(guest: Any, vcpus: int, tmp_path: Path) -> None:
    sc = load_scenario(HELLO)
    if vcpus == 1:
        text = HELLO.read_text().replace("vcpus = 2", "vcpus = 1").replace("vcpu = 1", "vcpu = 0")
        sc = _sc(text)
    g = guest(sc)
    t0 = time.monotonic()
    g.run()
    dt = time.monotonic() - t0
    _check_clean_run(g)
    assert b"faultline guest up" in g.serial[0]
    # the DAX file holds what the tasks wrote
    data = (tmp_path / "dax0").read_bytes()
    assert int.from_bytes(data[2 * 4096 + 8:2 * 4096 + 16], "little") == 0xC0FFEE
    assert int.from_bytes(data[3 * 4096:3 * 4096 + 8], "little") == 0xFEED
    steps = len(g.of("step"))
    print(f"\nhello on {vcpus} vCPU(s): {len(g.records)} reports, {steps} steps in {dt:.3f}s")


# --- hostile bytecode ----------------------------------------------------------------------
BAD_PROGRAMS = {
    "invalid opcode": [(0xEE, 0, 0, 0, 0)],
    "opcode zero": [(abi.OP_INVALID, 0, 0, 0, 0)],
    "slot out of range": [(abi.OP_READ, 7, 0, 0, 0)],
    "offset beyond the page": [(abi.OP_READ, 0, 0, 4093, 0)],
    "misaligned offset": [(abi.OP_WRITE, 0, 0, 4, 1)],
    "exec offset beyond the page": [(abi.OP_EXEC, 0, 0, 4096, 0)],
    "jump beyond the program": [(abi.OP_LOOP, 0, 0, 99, 1)],
    "falls off the end": [(abi.OP_YIELD, 0, 0, 0, 0)],
    "unknown flag": [(abi.OP_READ, 0, 0x80, 0, 0)],
    "read_span of unmapped pages": [(abi.OP_READ_SPAN, 0, 0, 0, 3)],
    "read_span count 0": [(abi.OP_READ_SPAN, 0, 0, 0, 0)],
}

TWO_TASKS = """
[vm]
vcpus = 1
[[files]]
name = "dax0"
size = "16KiB"
[[tasks]]
name = "victim"
program = ["read anon[0]", "exit 0"]
[[tasks]]
name = "bystander"
program = ["read dax0[0] expect=@", "yield", "read dax0[0] expect=@", "exit 0"]
"""


def _pack(insns: list[tuple[int, int, int, int, int]]) -> bytes:
    return b"".join(abi.INSN.pack(*i) for i in insns)


@pytest.mark.parametrize("name", sorted(BAD_PROGRAMS))
def test_bad_bytecode_exits_bad_insn(guest: Any, name: str) -> None:
    sc = _sc(TWO_TASKS)
    g = guest(sc, programs={0: _pack(BAD_PROGRAMS[name])})
    g.run()
    assert not g.exits and not g.of("panic"), (g.exits, g.of("panic"))
    assert [r.a for r in g.of("exit", 0)] == [abi.EXIT_CODE_BAD_INSN]
    assert [r.a for r in g.of("exit", 1)] == [0]
    assert len(g.of("idle")) == 1


def test_expect_mismatch_exits_expect_failed(guest: Any) -> None:
    sc = _sc(TWO_TASKS.replace('"read anon[0]"', '"read anon[0] expect=0x1234"'))
    g = guest(sc)
    g.run()
    assert [r.a for r in g.of("exit", 0)] == [abi.EXIT_CODE_EXPECT_FAILED]
    assert [r.a for r in g.of("exit", 1)] == [0]


# --- user-mode exceptions --------------------------------------------------------------------
EXEC_TASK = """
[vm]
vcpus = 1
[[files]]
name = "dax0"
size = "16KiB"
[[tasks]]
name = "victim"
program = [{writes} "exec anon[0]", "exit 0"]
[[tasks]]
name = "bystander"
program = ["read dax0[0] expect=@", "yield", "read dax0[0] expect=@", "exit 0"]
"""


def _code_words(code: bytes) -> str:
    code = code + b"\x90" * (-len(code) % 8)
    return " ".join(f'"write anon[0]+{8 * k} {int.from_bytes(code[8 * k:8 * k + 8], "little")}",'
                    for k in range(len(code) // 8))


def test_user_ud_kills_only_that_task(guest: Any) -> None:
    g = guest(_sc(EXEC_TASK.format(writes=_code_words(b"\x0f\x0b"))))  # ud2
    g.run()
    assert not g.exits and not g.of("panic")
    [exc] = g.of("exception", 0)
    assert exc.a == 6 and exc.c == abi.anon_vaddr(0)
    [sig] = g.of("signal", 0)
    assert sig.a == abi.SIGSEGV
    assert not g.of("exit", 0)
    assert [r.a for r in g.of("exit", 1)] == [0]


def test_user_page_fault_on_unmapped_vaddr_is_segv(guest: Any) -> None:
    # mov rax, [moffs64 0x7000_0000_0000]; ret -- a vaddr no task maps
    code = b"\x48\xa1" + (0x7000_0000_0000).to_bytes(8, "little") + b"\xc3"
    g = guest(_sc(EXEC_TASK.format(writes=_code_words(code))))
    g.run()
    assert not g.exits and not g.of("panic")
    [sig] = g.of("signal", 0)
    assert (sig.a, sig.b, sig.c) == (abi.SIGSEGV, abi.SEGV_MAPERR, 0x7000_0000_0000)
    assert [r.a for r in g.of("exit", 1)] == [0]


def test_user_cannot_touch_kernel_memory(guest: Any) -> None:
    # mov rax, [0x100000] (the kernel image, supervisor-only); ret
    code = b"\x48\xa1" + abi.KERNEL_LOAD_GPA.to_bytes(8, "little") + b"\xc3"
    g = guest(_sc(EXEC_TASK.format(writes=_code_words(code))))
    g.run()
    [sig] = g.of("signal", 0)
    assert (sig.a, sig.c) == (abi.SIGSEGV, abi.KERNEL_LOAD_GPA)
    assert [r.a for r in g.of("exit", 1)] == [0]


def test_user_cannot_forge_reports(guest: Any) -> None:
    # mov eax, 0x11000; out 0xf0, eax -> #GP (IOPL 0, no I/O bitmap)
    code = b"\xb8" + abi.REPORT_BUF_GPA.to_bytes(4, "little") + b"\xe7" + bytes([abi.REPORT_PORT])
    g = guest(_sc(EXEC_TASK.format(writes=_code_words(code + b"\xc3"))))
    g.run()
    [exc] = g.of("exception", 0)
    assert exc.a == 13
    assert [r.a for r in g.of("exit", 1)] == [0]


def test_bad_boot_info_panics(guest: Any) -> None:
    from faultline.vmm import boot

    sc = _sc(TWO_TASKS)
    info = bytearray(boot.build_boot_info(sc))
    info[0] ^= 0xFF  # magic
    g = guest(sc, boot_info=bytes(info))
    g.run()
    [p] = g.of("panic")
    assert p.a == abi.PANIC_BAD_BOOT_INFO and p.b == 1
    assert not g.of("boot")


# --- machine checks, poison, notification ------------------------------------------------------
MCE_SC = """
[vm]
vcpus = 1
[[files]]
name = "dax0"
size = "16KiB"
[[tasks]]
name = "reader"
program = ["label l", "read dax0[1]+0x18 expect=@", "loop 1000 l", "exit 0"]
[[tasks]]
name = "early"
early_kill = true
program = ["label l", "read dax0[2]", "yield", "loop 1000 l", "exit 0"]
[[tasks]]
name = "late"
program = ["read dax0[3]", "label l", "yield", "loop 30 l", "read dax0[2]", "exit 0"]
[[tasks]]
name = "other"
program = ["label l", "read dax0[0] expect=@", "loop 40 l", "exit 0"]
"""


def _truncate_and_catch(g: Guest, path: Path, size: int, gpa: int, handle: Any) -> None:
    """Truncate the backing file; when the guest's access to `gpa` fails (on this host: a
    bare EFAULT for a page the guest touched before, an MMIO exit for one it never touched),
    call handle(g, vcpu, gpa) and re-enter."""
    from faultline.kvm import BareEfault, Mmio

    os.truncate(path, size)

    def on_exit(gg: Guest, i: int, ex: Any) -> bool:
        if isinstance(ex, Mmio) and not ex.is_write:
            assert ex.phys_addr == gpa
        elif not isinstance(ex, BareEfault):
            return False
        gg.caught.append(ex)
        handle(gg, i, gpa)
        gg.on_exit = None
        return True

    g.on_exit = on_exit


SRAR_SC = """
[vm]
vcpus = 1
[[files]]
name = "dax0"
size = "8KiB"
[[tasks]]
name = "reader"
program = ["label l", "read dax0[1]+0x18 expect=@", "loop 1000 l", "exit 0"]
[[tasks]]
name = "other"
program = ["label l", "read dax0[0] expect=@", "loop 40 l", "exit 0"]
"""


def test_srar_kills_the_reader_and_offlines(guest: Any, tmp_path: Path) -> None:
    sc = _sc(SRAR_SC)
    g = guest(sc)
    gpa = sc.files[0].gpa(1) + 0x18
    g.run(until=lambda r: r.kind == "step" and r.task == 0 and r.b >= 4)
    _truncate_and_catch(g, tmp_path / "dax0", 4096, gpa,
                        lambda gg, i, a: gg.inject_mce(i, a, ar=True))
    g.run()
    assert g.caught
    assert not g.exits and not g.of("panic"), (g.exits, g.of("panic"))
    [mce] = g.of("mce")
    assert mce.b & MCI_AR and mce.c == gpa and mce.task == 0
    assert [(r.a, r.b) for r in g.of("offline")] == [(gpa & ~0xFFF, abi.OFFLINE_MCE_AR)]
    [sig] = g.of("signal", 0)
    assert (sig.a, sig.b, sig.c, sig.d) == (abi.SIGBUS, abi.BUS_MCEERR_AR,
                                            abi.window_vaddr(0, 1) + 0x18, gpa)
    # no value from the failed load reached the report stream
    assert all(r.b == abi.pattern_value(0, 0x1018) for r in g.of("value", 0))
    assert [r.a for r in g.of("exit", 1)] == [0]


def test_notify_action_required_kills_interrupted_task(guest: Any, tmp_path: Path) -> None:
    sc = _sc(SRAR_SC)
    g = guest(sc)
    gpa = sc.files[0].gpa(1) + 0x18
    g.run(until=lambda r: r.kind == "step" and r.task == 0 and r.b >= 3)
    _truncate_and_catch(
        g, tmp_path / "dax0", 4096, gpa,
        lambda gg, i, a: gg.notify(i, [(a & ~0xFFF, 1, abi.CAUSE_BEYOND_EOF)], ar=(i, a)))
    g.run()
    assert g.caught
    assert not g.exits and not g.of("panic"), (g.exits, g.of("panic"))
    [sig] = g.of("signal", 0)
    assert (sig.a, sig.b, sig.c, sig.d) == (abi.SIGBUS, abi.BUS_MCEERR_AR,
                                            abi.window_vaddr(0, 1) + 0x18, gpa)
    assert [(r.a, r.b) for r in g.of("offline")] == [(gpa & ~0xFFF, abi.OFFLINE_NOTIFY)]
    assert all(r.b == abi.pattern_value(0, 0x1018) for r in g.of("value", 0))
    assert [r.a for r in g.of("exit", 1)] == [0]


def test_srao_early_kill_and_later_pf_sigbus(guest: Any) -> None:
    sc = _sc(MCE_SC)
    g = guest(sc)
    dax2 = sc.files[0].gpa(2)
    g.run(until=lambda r: r.kind == "step" and r.task == 2 and r.b >= 3)
    g.inject_mce(0, dax2 + 0x40, ar=False)  # delivered in kernel mode (after the report)
    g.run()
    assert not g.exits and not g.of("panic"), (g.exits, g.of("panic"))
    [mce] = g.of("mce")
    assert not mce.b & MCI_AR
    assert [(r.a, r.b) for r in g.of("offline")] == [(dax2, abi.OFFLINE_MCE_AO)]
    # the early-kill task gets BUS_MCEERR_AO at once
    [ao] = g.of("signal", 1)
    assert (ao.a, ao.b, ao.c, ao.d) == (abi.SIGBUS, abi.BUS_MCEERR_AO, abi.window_vaddr(0, 2),
                                        dax2)
    # "late" touches dax0[2] afterwards: #PF on the poisoned PTE -> SIGBUS AR, no host exit
    [ar] = g.of("signal", 2)
    assert (ar.a, ar.b, ar.c, ar.d) == (abi.SIGBUS, abi.BUS_MCEERR_AR, abi.window_vaddr(0, 2),
                                        dax2)
    assert [r.a for r in g.of("exit", 3)] == [0]
    assert [r.a for r in g.of("exit", 0)] == [0]


def test_second_mce_same_page_is_not_offlined_twice(guest: Any) -> None:
    sc = _sc(MCE_SC)
    g = guest(sc)
    dax3 = sc.files[0].gpa(3)
    g.run(until=lambda r: r.kind == "step" and r.task == 3 and r.b >= 2)
    g.inject_mce(0, dax3, ar=False)
    g.run(until=lambda r: r.kind == "step" and r.task == 3 and r.b >= 6)
    g.inject_mce(0, dax3 + 8, ar=False)
    g.run()
    assert len(g.of("mce")) == 2
    assert [(r.a, r.b) for r in g.of("offline")] == [(dax3, abi.OFFLINE_MCE_AO)]


def test_notify_offlines_and_next_access_sigbus(guest: Any) -> None:
    sc = _sc(MCE_SC)
    g = guest(sc)
    f = sc.files[0]
    g.run(until=lambda r: r.kind == "step" and r.task == 0 and r.b >= 3)
    g.notify(0, [(f.gpa(1), 1, abi.CAUSE_BEYOND_EOF), (f.gpa(2), 2, abi.CAUSE_HOLE)])
    g.run()
    assert not g.exits and not g.of("panic"), (g.exits, g.of("panic"))
    [n] = g.of("notify")
    assert (n.a, n.b) == (2, 3)
    # one record per notified range (first gpa, source, pages), not one exit per page
    assert sorted((r.a, r.b, r.c) for r in g.of("offline")) == [
        (f.gpa(1), abi.OFFLINE_NOTIFY, 1), (f.gpa(2), abi.OFFLINE_NOTIFY, 2)]
    # the ring was consumed
    head, tail, _, _ = abi.NOTIFY_HEADER.unpack(g.mem.read(abi.NOTIFY_RING_GPA, 16))
    assert head == tail == 2
    [s0] = g.of("signal", 0)  # reader: next read of dax0[1] faults
    assert (s0.a, s0.b, s0.c) == (abi.SIGBUS, abi.BUS_MCEERR_AR, abi.window_vaddr(0, 1) + 0x18)
    [s1] = g.of("signal", 1)  # early kill
    assert (s1.a, s1.b) == (abi.SIGBUS, abi.BUS_MCEERR_AO)
    [s2] = g.of("signal", 2)
    assert s2.b == abi.BUS_MCEERR_AR
    assert [r.a for r in g.of("exit", 3)] == [0]


KREAD_SC = """
[vm]
vcpus = 1
[[files]]
name = "dax0"
size = "16KiB"
[[tasks]]
name = "k"
program = ["kread dax0[1]+0x10 expect=@", "yield", "kread dax0[2]+0x8 expect=@", "exit 0"]
"""


def test_kread_ok(guest: Any) -> None:
    g = guest(_sc(KREAD_SC))
    g.run()
    vals = g.of("value", 0)
    assert [(r.a, r.b, r.d) for r in vals] == [
        (abi.window_vaddr(0, 1) + 0x10, abi.pattern_value(0, 0x1010), abi.VALUE_KREAD),
        (abi.window_vaddr(0, 2) + 0x8, abi.pattern_value(0, 0x2008), abi.VALUE_KREAD)]
    assert [r.a for r in g.of("exit", 0)] == [0]


def test_kread_mce_is_fixed_up_to_eio(guest: Any, tmp_path: Path) -> None:
    sc = _sc(KREAD_SC)
    g = guest(sc)
    g.run(until=lambda r: r.kind == "step" and r.task == 0 and r.b >= 2)
    gpa = sc.files[0].gpa(2) + 0x8
    _truncate_and_catch(g, tmp_path / "dax0", 4096, gpa,
                        lambda gg, i, a: gg.inject_mce(i, a, ar=True))
    g.run()
    assert g.caught
    assert not g.exits and not g.of("panic"), (g.exits, g.of("panic"))
    assert [r.a for r in g.of("exit", 0)] == [abi.EXIT_CODE_KREAD_EIO]
    assert [(r.a, r.b) for r in g.of("offline")] == [(sc.files[0].gpa(2), abi.OFFLINE_MCE_AR)]
    assert len(g.of("value", 0)) == 1  # only the first, good kread


def test_kread_of_poisoned_page_is_eio_without_exit(guest: Any) -> None:
    sc = _sc(KREAD_SC)
    g = guest(sc)
    g.run(until=lambda r: r.kind == "step" and r.task == 0 and r.b >= 1)
    g.notify(0, [(sc.files[0].gpa(2), 1, abi.CAUSE_HOLE)])
    g.run()
    assert not g.exits
    assert [r.a for r in g.of("exit", 0)] == [abi.EXIT_CODE_KREAD_EIO]


def test_two_vcpus_share_poison(guest: Any) -> None:
    text = (MCE_SC.replace("vcpus = 1", "vcpus = 2")
            .replace('name = "late"', 'name = "late"\nvcpu = 1')
            .replace('name = "other"', 'name = "other"\nvcpu = 1'))
    sc = _sc(text)
    g = guest(sc)
    dax2 = sc.files[0].gpa(2)
    g.run(until=lambda r: r.kind == "step" and r.task == 1 and r.b >= 3)
    g.notify(0, [(dax2, 1, abi.CAUSE_HOLE)])  # handled on vCPU 0
    g.run()
    assert not g.exits and not g.of("panic")
    [s2] = g.of("signal", 2)  # "late" runs on vCPU 1 and faults on vCPU 1
    assert s2.vcpu == 1 and s2.b == abi.BUS_MCEERR_AR
    [s1] = g.of("signal", 1)
    assert s1.b == abi.BUS_MCEERR_AO


def test_many_pages_notify(guest: Any) -> None:
    sc = _sc("""
[vm]
vcpus = 1
[[files]]
name = "big"
size = "4MiB"
[[tasks]]
name = "t"
program = ["read big[1000]", "label l", "yield", "loop 5 l", "read big[1000]", "exit 0"]
""")
    g = guest(sc)
    f = sc.files[0]
    g.run(until=lambda r: r.kind == "step" and r.b >= 2)
    t0 = time.monotonic()
    g.notify(0, [(f.gpa(0), 1024, abi.CAUSE_BEYOND_EOF), (f.gpa(0), 1024, abi.CAUSE_BEYOND_EOF)])
    g.run()
    dt = time.monotonic() - t0
    [n] = g.of("notify")
    assert (n.a, n.b) == (2, 1024)
    # one range record for the 1024 new pages, none for the repeat
    assert [(r.a, r.c) for r in g.of("offline")] == [(f.gpa(0), 1024)]
    [s] = g.of("signal", 0)
    assert s.b == abi.BUS_MCEERR_AR
    print(f"\nnotify of 1024 pages (+1024 already offline): {dt:.3f}s")


def test_step_rate(guest: Any) -> None:
    sc = _sc("""
[vm]
vcpus = 1
[[tasks]]
name = "t"
program = ["label l", "yield", "loop 1999 l", "exit 0"]
""")
    g = guest(sc)
    t0 = time.monotonic()
    g.run()
    dt = time.monotonic() - t0
    steps = len(g.of("step"))
    assert steps == 4000 and [r.a for r in g.of("exit")] == [0]
    print(f"\n{steps} steps in {dt:.3f}s: {steps / dt:.0f} steps/s (test driver, 1 vCPU)")
