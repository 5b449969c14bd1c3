"""The memory-fault path on real KVM: every shipped scenario under every policy it lists,
the resolution record against /proc/self/maps and os.stat, proactive against a change made
by another process, and the hardware-only detection paths (KVM_EXIT_MEMORY_FAULT, bare
EFAULT, EHWPOISON) fed synthetically through the same code as real exits."""

from __future__ import annotations

import errno
import json
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from faultline import abi
from faultline.kvm import exits, uapi
from faultline.memory import GuestMemory
from faultline.outcome import check
from faultline.scenario import file_contents, from_dict, load
from faultline.vmm import decode
from faultline.vmm import policy as pol
from faultline.vmm.faults import Detector, GuestUnmapped, MemoryFault, Unrecoverable, resolve
from faultline.vmm.runner import MMIO_FILL, KvmRun, run_kvm

from .conftest import SCENARIOS

FAULT_SCENARIOS = ["dax-truncate", "dax-truncate-smp", "dax-truncate-4vcpu", "dax-truncate-write",
                   "exec-from-truncated", "dax-punch-hole", "dax-truncate-kernel", "hello",
                   "ro-store-then-read", "ro-next-to-rw"]
CASES = [(name, p) for name in FAULT_SCENARIOS
         for p in load(SCENARIOS / f"{name}.toml").policies]


def _events(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.kvm
@pytest.mark.parametrize(("name", "policy"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_scenario_meets_expectation_on_kvm(name: str, policy: str, tmp_path: Path) -> None:
    sc = load(SCENARIOS / f"{name}.toml")
    events = tmp_path / "events.jsonl"
    out = run_kvm(sc, policy, events_path=events)
    assert check(out, sc) == []
    # No fabricated data: no task ever reported a value read from a page that could not be
    # backed, nor the filler a caught load was completed with.
    fill = int.from_bytes(MMIO_FILL, "little")
    # (a page whose store was refused as read-only is a good page: reading it is fine)
    bad = {f.gpa & ~0xFFF for f in out.faults if f.cause != "read-only"} | out.offlined
    for ev in _events(events):
        if ev["kind"] == "guest_value" and ev["op"] != "write":
            assert int(ev["value"], 16) != fill, ev
            assert int(ev["gpa"], 16) & ~0xFFF not in bad or ev["op"] == "exec", ev
    # At most one exit per bad page and vCPU (mce/notify), whatever touches it afterwards:
    # a vCPU's task that touched the page is killed, later tasks meet the offlined page.
    pages = {f.gpa & ~0xFFF for f in out.faults}
    per_vcpu = Counter((int(ev["gpa"], 16) & ~0xFFF, ev["vcpu"]) for ev in _events(events)
                       if ev["kind"] == "kvm_exit" and ev.get("exit") == "memory_fault")
    assert set(per_vcpu.values()) <= {1} and {p for p, _ in per_vcpu} == pages
    assert out.exits.get("memory_fault", 0) == sum(per_vcpu.values())


@pytest.mark.kvm
@pytest.mark.parametrize("policy", ["mce", "abort", "notify", "proactive"])
def test_a_refused_store_offlines_nothing_and_leaves_the_file(policy: str,
                                                             tmp_path: Path) -> None:
    """A store to a read-only window: SIGSEGV SEGV_ACCERR for the writer at its address,
    through one exit and a read-only notification; no page offlined, no machine check,
    the file byte for byte as it was, the page readable afterwards (the scenario's
    `reader` and `other` check the values)."""
    sc = load(SCENARIOS / "ro-store-then-read.toml")
    run_dir = tmp_path / "run"
    events = tmp_path / "events.jsonl"
    before = file_contents(sc.file("dax0"))
    out = run_kvm(sc, policy, events_path=events, run_dir=run_dir, keep=True)
    assert check(out, sc) == []
    assert (run_dir / "dax0").read_bytes() == before
    evs = _events(events)
    kinds = [e["kind"] for e in evs]
    assert "vmm_queue_mce" not in kinds and "guest_memory_failure" not in kinds
    [notify] = [e for e in evs if e["kind"] == "vmm_notify"]
    assert (notify["cause"], notify["npages"]) == ("read-only", 1)
    [sig] = [e for e in evs if e["kind"] == "guest_signal"]
    assert (sig["task"], sig["code"], sig["signo"]) == ("writer", "SEGV_ACCERR", abi.SIGSEGV)
    assert int(sig["vaddr"], 16) == abi.window_vaddr(0, 1)


@pytest.mark.kvm
def test_resolution_record_matches_proc_maps_and_stat(tmp_path: Path) -> None:
    sc = load(SCENARIOS / "dax-truncate.toml")
    run_dir = Path("/dev/shm") / f"faultline-test-{os.getpid()}"
    events = tmp_path / "events.jsonl"
    try:
        out = run_kvm(sc, "mce", events_path=events, run_dir=run_dir, keep=True)
        [rec] = out.faults
        path = run_dir / "dax0"
        st = os.stat(path)
        assert rec.path == os.path.realpath(path)
        assert rec.gpa == sc.page_gpa("dax0[2]")
        assert rec.offset == rec.gpa - sc.file("dax0").window_gpa == 0x2000
        assert rec.file_size == st.st_size == 0x2000
        assert rec.cause == "beyond-eof" and rec.source in ("bare-efault", "mmio")
        [ev] = [e for e in _events(events) if e["kind"] == "vmm_resolve"]
        maps = ev["maps"]
        assert maps["path"] == rec.path and maps["inode"] == st.st_ino
        assert rec.hva is not None and maps["start"] <= rec.hva < maps["end"]
        assert maps["offset"] + (rec.hva - maps["start"]) == rec.offset
        assert f"{rec.path} +0x2000 (file size 0x2000): beyond-eof" in ev["line"]
    finally:
        for p in sorted(run_dir.glob("**/*"), reverse=True):
            p.unlink()
        run_dir.rmdir()


@pytest.mark.kvm
def test_proactive_sees_a_truncation_by_another_process(tmp_path: Path) -> None:
    raw = load(SCENARIOS / "dax-truncate.toml").raw
    raw = json.loads(json.dumps(raw))
    raw["events"][0]["by"] = "subprocess"
    sc = from_dict(raw, source="dax-truncate(subprocess)")
    events = tmp_path / "events.jsonl"
    out = run_kvm(sc, "proactive", events_path=events)
    assert check(out, sc) == []
    assert out.exits.get("memory_fault", 0) == 0
    evs = _events(events)
    host = [e for e in evs if e["kind"] == "host_event"]
    assert host and host[0]["by"] == "subprocess"
    change = [e for e in evs if e["kind"] == "vmm_file_change"]
    assert change and change[0]["size_after"] == 0x2000


# --- the detection paths this host cannot produce, through the same code ------------------

def _run_buf(reason: int, union: bytes = b"") -> bytearray:
    buf = bytearray(uapi.ctypes.sizeof(uapi.kvm_run))
    struct.pack_into("<I", buf, uapi.KVM_RUN_EXIT_REASON_OFFSET, reason)
    buf[uapi.KVM_RUN_EXIT_UNION_OFFSET:uapi.KVM_RUN_EXIT_UNION_OFFSET + len(union)] = union
    return buf


@pytest.fixture
def window(tmp_path: Path) -> Any:
    path = tmp_path / "dax0"
    path.write_bytes(b"\x11" * 0x4000)
    mem = GuestMemory()
    mem.add_anonymous("ram", 0, 0x100000)
    mem.add_file("dax0", 0x1_0000_0000, path)
    os.truncate(path, 0x2000)  # pages 2 and 3 are now beyond EOF
    yield mem
    mem.close()


def test_memory_fault_exit_decodes_to_an_exact_fault(window: GuestMemory) -> None:
    buf = _run_buf(uapi.KVM_EXIT_MEMORY_FAULT, struct.pack("<QQQ", 0, 0x1_0000_3008, 8))
    ex = exits.decode_exit(buf, -1, errno.EFAULT)
    det = Detector(window, 0x100000, lambda v, g: None)
    fault = det.from_exit(0, ex)
    assert fault is not None and (fault.gpa, fault.source) == (0x1_0000_3008, "memory-fault-exit")
    rec, _ = resolve(window, fault)
    assert (rec.cause, rec.offset, rec.file_size) == ("beyond-eof", 0x3008, 0x2000)
    d = pol.decide("mce", fault.gpa, rec.cause, None)
    assert d == pol.InjectMce(0x1_0000_3000, True)
    status, addr, misc, mcg = pol.mce_encoding(0x1_0000_3000, True)
    assert status & pol.MCI_STATUS_AR and status & 0xFFFF == 0x134 and addr == 0x1_0000_3000
    assert mcg == pol.MCG_STATUS_MCIP | pol.MCG_STATUS_RIPV | pol.MCG_STATUS_EIPV
    assert misc == (2 << 6) | 0xC


def test_ehwpoison_memory_fault_is_poisoned(window: GuestMemory) -> None:
    buf = _run_buf(uapi.KVM_EXIT_MEMORY_FAULT, struct.pack("<QQQ", 0, 0x1_0000_1000, 0x1000))
    ex = exits.decode_exit(buf, -1, exits.EHWPOISON)
    fault = Detector(window, 0x100000, lambda v, g: None).from_exit(0, ex)
    assert fault is not None and fault.poisoned
    assert resolve(window, fault)[0].cause == "poisoned"


def test_bare_efault_gpa_from_the_decoded_instruction(window: GuestMemory) -> None:
    # mov %rdi, 0x10(%rax,%rbx): rax = the task's vaddr of window page 3, rbx = 0
    code = bytes.fromhex("48897c1810")
    regs = {"rax": 0x8000_3000, "rbx": 0, "rdi": 7}
    ex = exits.decode_exit(_run_buf(uapi.KVM_EXIT_MMIO), -1, errno.EFAULT)  # stale reason
    assert isinstance(ex, exits.BareEfault)

    def translate(vcpu: int, gva: int) -> int | None:
        return 0x1_0000_0000 + (gva - 0x8000_0000) if gva >= 0x8000_0000 else gva

    def locate(vcpu: int) -> list[tuple[int, int, str]]:
        out = []
        for a in decode.accesses(code, 0x1000, regs):
            gpa = translate(vcpu, a.gva)
            if gpa is not None:
                out.append((gpa, a.size, a.kind))
        return out

    det = Detector(window, 0x100000, translate, locate)
    fault = det.from_exit(0, ex)
    # Not the lowest bad page (0x1_0000_2000): exactly what the store touched.
    assert fault is not None and (fault.gpa, fault.access) == (0x1_0000_3010, "write")


def test_bare_efault_without_decodable_access_scans_windows_and_gives_up(
        window: GuestMemory) -> None:
    det = Detector(window, 0x100000, lambda v, g: None, lambda v: [])
    ex = exits.BareEfault(errno.EFAULT)
    seen = []
    for _ in range(2):
        fault = det.from_exit(0, ex)
        assert fault is not None and fault.source == "bare-efault"
        seen.append(fault.gpa)
        det.note_handled(fault)
    assert seen == [0x1_0000_2000, 0x1_0000_3000]
    with pytest.raises(Unrecoverable):  # no bad page left to blame: give up, don't loop
        det.from_exit(0, ex)


def test_same_fault_repeating_after_handling_is_unrecoverable(window: GuestMemory) -> None:
    det = Detector(window, 0x100000, lambda v, g: None)
    buf = _run_buf(uapi.KVM_EXIT_MEMORY_FAULT, struct.pack("<QQQ", 0, 0x1_0000_2000, 8))
    fault = det.from_exit(0, exits.decode_exit(buf, -1, errno.EFAULT))
    assert fault is not None
    det.note_handled(fault)
    det.note_handled(fault)
    with pytest.raises(Unrecoverable, match="3 times on vCPU 0"):
        det.note_handled(fault)


def test_several_vcpus_touching_one_page_is_not_a_repeat(window: GuestMemory) -> None:
    """Four vCPUs each fault once on the same page before the guest offlined it: each is
    a task touching the page (each gets its event), not the handling failing."""
    det = Detector(window, 0x100000, lambda v, g: None)
    for vcpu in range(4):
        det.note_handled(MemoryFault(0x1_0000_2008, 8, "read", "bare-efault", vcpu))
    assert det.handled == {0x1_0000_2000: 4}
    det.note_handled(MemoryFault(0x1_0000_2010, 8, "read", "bare-efault", 3))
    with pytest.raises(Unrecoverable, match="on vCPU 3"):
        det.note_handled(MemoryFault(0x1_0000_2000, 8, "read", "bare-efault", 3))


@pytest.mark.kvm
def test_runner_handles_synthetic_hardware_exits(tmp_path: Path) -> None:
    """KVM_EXIT_MEMORY_FAULT and bare EFAULT through KvmRun's own exit handler on a real VM:
    the fault is resolved, logged, and an SRAR queued for the faulting vCPU."""
    sc = load(SCENARIOS / "dax-truncate.toml")
    r = KvmRun(sc, "mce", events_path=tmp_path / "ev.jsonl")
    try:
        r._setup()
        os.truncate(r.run_dir / "dax0", 0x2000)
        v = r.vcpus[0]
        buf = _run_buf(uapi.KVM_EXIT_MEMORY_FAULT, struct.pack("<QQQ", 0, 0x1_0000_3000, 8))
        assert r.faults.on_fault_exit(v, exits.decode_exit(buf, -1, errno.EFAULT))
        assert v.pending_mce == [(0x1_0000_3000, True)]
        r.log.flush()  # the record is built after the injection is queued
        [rec] = r.outcome.faults
        assert (rec.cause, rec.source, rec.offset) == ("beyond-eof", "memory-fault-exit", 0x3000)
        assert r.outcome.exits["memory_fault"] == 1
        kinds = [e["kind"] for e in r.log.events]
        # stamped in order: resolution before the decision it led to
        assert kinds.index("vmm_resolve") < kinds.index("vmm_queue_mce")
        [ev] = [e for e in r.log.events if e["kind"] == "vmm_resolve"]
        assert ev["cause"] == "beyond-eof" and ev["maps"]["path"] == str(r.run_dir / "dax0")
        assert not r.stopping
        # The same page again before the guest took its #MC: in flight, no second event,
        # not counted as a repeat (policy.count_fault)
        for _ in range(3):
            assert r.faults.on_fault_exit(v, exits.decode_exit(buf, -1, errno.EFAULT))
        assert v.pending_mce == [(0x1_0000_3000, True)] and not r.stopping
        assert [e["kind"] for e in r.log.events].count("vmm_in_flight") == 3
        assert r.outcome.exits["memory_fault"] == 4
        # ... until the guest offlined it: then a fault there is a repeat again
        r._on_taken(None, 0x1_0000_3000, 1)
        assert r.faults.on_fault_exit(v, exits.decode_exit(buf, -1, errno.EFAULT))
        assert len(v.pending_mce) == 2
    finally:
        r._teardown()


@pytest.mark.kvm
def test_a_resolution_that_disagrees_with_proc_maps_stops_the_vm(tmp_path: Path) -> None:
    """The maps cross-check runs after the SRAR is queued; when /proc/self/maps says the
    window is some other file, the record says so and the VM is stopped."""
    sc = load(SCENARIOS / "dax-truncate.toml")
    r = KvmRun(sc, "mce", events_path=tmp_path / "ev.jsonl")
    try:
        r._setup()
        fault = MemoryFault(0x1_0000_3000, 8, "read", "memory-fault-exit", 0)
        res = r.memory.resolve(fault.gpa, cross_check=False)._replace(path="/elsewhere")
        fields = r.faults.record(fault, res, "beyond-eof")
        assert "maps: path" in fields["cause"]
        assert r.stopping and r.outcome.vm == "aborted"
        assert "disagrees with /proc/self/maps" in (r.outcome.reason or "")
    finally:
        r._teardown()


def test_bare_efault_on_an_address_the_guest_unmapped_is_a_retry(window: GuestMemory) -> None:
    """Another vCPU's memory_failure() rewrote the PTE under an access already on its way:
    the decoded address no longer translates. Blaming the lowest bad page would SIGBUS the
    wrong task at the wrong address; re-entering lets the guest fault on its own PTE."""
    det = Detector(window, 0x100000, lambda v, g: None,
                   lambda v: [(0x101000, 1, "exec"), (None, 8, "read")])
    with pytest.raises(GuestUnmapped):
        det.from_exit(0, exits.BareEfault(errno.EFAULT))


def test_kvm_exit_shutdown_ends_the_run_as_reset() -> None:
    """A triple fault: kvm_run's KVM_EXIT_SHUTDOWN decodes to Shutdown, and the VMM ends
    the run as `reset` (QEMU's kvm_cpu_exec() resets the guest), not `aborted`."""
    from faultline.outcome import EventLog, Outcome
    from faultline.scenario import loads
    from faultline.vmm.fault_handler import FaultHandler
    from faultline.vmm.machine import Machine, VcpuState

    class _Vcpu:  # what stop() touches of a vCPU: the kick
        immediate_exit = False

    sc = loads('[[tasks]]\nname = "t"\nprogram = ["exit 0"]\n', source="triple.toml")
    m = Machine(sc, EventLog(None), Outcome(sc.name, "kvm", "host", "mce"))
    v = VcpuState(0, _Vcpu())  # type: ignore[arg-type]
    m.vcpus.append(v)
    ex = exits.decode_exit(_run_buf(uapi.KVM_EXIT_SHUTDOWN), 0)
    assert isinstance(ex, exits.Shutdown)
    handler = FaultHandler(m, None, None, "mce")  # type: ignore[arg-type]
    assert handler.unhandled(v, ex) is False
    assert (m.outcome.vm, m.outcome.reason) == ("reset", "vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)")
    assert m.outcome.exits == {"shutdown": 1}
    assert [e["kind"] for e in m.log.events] == ["kvm_exit"]  # no vm_abort: not the VMM's
