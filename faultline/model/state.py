"""The model's state: immutable named records (NamedTuples: hashable, canonical, cheap).

A state is a :class:`State` of ``files``, ``mem``, ``vcpus``, ``tasks``, ``guest``,
``vmm`` and ``fired``. Every record is a NamedTuple, so it hashes and compares as the
plain tuple of its fields (the checker relies on that) and reads by name:
``s.vcpus[v].apf_queue``, ``s.tasks[t].status``. Sets are bitmasks over a global
window-page index ("gidx", precomputed by System); sparse maps are sorted tuples of
pairs. Records are rebuilt by calling their constructor (hot paths) or ``_replace``.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class File(NamedTuple):
    """A host file backing a guest window (hostmm)."""
    size: int  # bytes
    cached: int  # bitmask of window pages present in the page cache
    holes: int  # bitmask of pages that are holes now
    zeroed: int  # bitmask of pages whose data was dropped (punched) -> read as zero
    poison: int  # bitmask of pages hwpoisoned on the host
    zero_from: int  # lowest size the file ever had: original data beyond it reads zero


class ApfWork(NamedTuple):
    """An outstanding async page fault (struct kvm_async_pf on vcpu->async_pf.queue)."""
    token: int
    gfn: int
    injected: bool  # kvm_arch_async_page_not_present() told the guest (it sleeps a task)


class ApfDone(NamedTuple):
    """A completed async page fault (vcpu->async_pf.done)."""
    token: int
    gfn: int
    injected: bool
    ok: bool  # the worker's get_user_pages_remote() result (upstream ignores it)


class Exit(NamedTuple):
    """Why the vCPU is in userspace (KVM_RUN returned)."""
    kind: int  # EXIT_*
    gpa: int  # the faulting address as the VMM will learn it
    task: int  # the guest task that was running (-1: none)
    kernel: int  # 1: a kernel-mode access (kread)


class Vcpu(NamedTuple):
    """KVM's per-vCPU state (struct kvm_vcpu / kvm_vcpu_arch, the parts modelled)."""
    cur: int  # position in the vCPU's task list of the current guest task
    mode: int  # MODE_*
    apf_hash: tuple[tuple[int, int], ...]  # vcpu->arch.apf.gfns: sorted ((slot, gfn), ...)
    apf_queue: tuple[ApfWork, ...]  # in order of setup
    apf_done: tuple[ApfDone, ...]  # in completion order
    requests: int  # request bitmask (kvm.REQ_*)
    design: Any  # the design's own per-vCPU state (Design.vcpu_init; () when unused)
    exit: Exit | tuple[()]  # () while in the guest
    # MCEs the VMM still injects: (gpa, SRAR, the task whose context an SRAR interrupts:
    # the one the vCPU exited from, -1 for none or an SRAO)
    mce_queue: tuple[tuple[int, bool, int], ...]
    apf_id: int  # vcpu->arch.apf.id (token_alloc="counter"), else 1


class Task(NamedTuple):
    """A guest task (the guest kernel's view)."""
    status: int  # TS_*
    pc: int
    sub: int  # page within a read_span
    loop_ctrs: tuple[int, ...]  # one per loop instruction (System.loop_index)
    steps: int  # completed steps, capped at System.step_cap
    token: int  # APF token the task sleeps on (TS_SLEEP), else 0
    touched: int  # 1 once the task accessed a bad page
    fails: int  # failed tries of the current access to a bad page (capped): a label
    result: Any  # exit code (TS_EXITED), (si_code, vaddr) (TS_SIGBUS), reason (TS_KILLED)
    cpu: int  # the vCPU the task is on (task_cpu()); moves only at a wake (Params.wake_migrate)


class RingRecord(NamedTuple):
    """A notification ring record (the notify policy's paravirtual channel)."""
    first: int  # gidx of the first page
    npages: int
    cause: str
    ar_task: int  # the task in the faulting context (spared the AO kill), else -1
    vcpu: int  # the vCPU the interrupt targets
    ar_page: int = -1  # gidx of the action-required access's page (with ar_task), else -1


class Guest(NamedTuple):
    offlined: int  # bitmask of gidx frames taken offline by memory_failure
    ring: tuple[RingRecord, ...]  # undrained notification records
    bad_reads: int  # accesses completed from a page that cannot back them (must stay 0)
    # SRARs taken by a context that did not touch the page, or a panic on one (the
    # right_victim label; must stay 0).
    wrong_mce: int
    # SRAOs whose memory_failure() the guest's workqueue still has to run, in order:
    # ((gidx, the vCPU whose #MC queued it and whose worker runs it), ...)
    # (Params.srao_workqueue).
    mf_pending: tuple[tuple[int, int], ...]


class Vmm(NamedTuple):
    abort: str  # "" or the reason the run ended early (end says how)
    handled: int  # bitmask of gidx the VMM has acted on
    known: tuple[tuple[int, int], ...]  # per file: (size, holes) as the VMM last saw them
    exits: tuple[tuple[int, int], ...]  # memory-fault exits per page: ((gidx|-1, n), ...)
    repeats: tuple[tuple[int, int], ...]  # ((gidx * vcpus + vcpu, times handled), ...)
    # How the run ended early (END_*), set with abort; a function of the reason, so it
    # adds no state.
    end: int = 0


class State(NamedTuple):
    files: tuple[File, ...]
    mem: tuple[tuple[int, int], ...]  # sorted ((gpa, u64 value), ...) written
    vcpus: tuple[Vcpu, ...]
    tasks: tuple[Task, ...]
    guest: Guest
    vmm: Vmm
    fired: int  # bitmask of host events already applied


# How the VM stopped before every task finished: END_WORDS[end] is Outcome.vm's word.
END_NONE = 0  # still running (or completed)
END_ABORTED = 1  # the VMM stopped the VM; it stays paused (QEMU's vm_stop, our VMM's stop)
END_CRASHED = 2  # the VMM process exited: the VM is gone (QEMU's exit(1)); tasks "lost"
END_RESET = 3  # the VMM reset the guest (qemu_system_reset_request()): it reboots
END_PANIC = 4  # the guest kernel panicked
END_WORDS = ("", "aborted", "crashed", "reset", "panic")

MODE_RUN = 0
MODE_HALTED = 1  # KVM_REQ_APF_HALT: artificial halt until a page is present
MODE_EXIT = 2  # returned to userspace, waiting for the VMM
MODES = ("run", "halted", "exit")

EXIT_MEMORY_FAULT = 0  # KVM_EXIT_MEMORY_FAULT with gpa, in the faulting context
EXIT_BARE_EFAULT = 1  # KVM_RUN -EFAULT, exit_reason stale, no gpa
EXIT_REQUEST = 2  # KVM_EXIT_MEMORY_FAULT at entry, outside the faulting context
EXIT_HWPOISON = 3  # SIGBUS BUS_MCEERR_AR to the vCPU thread (kvm_send_hwpoison_signal)
EXIT_SOURCES = ("memory-fault-exit", "bare-efault", "request", "sigbus-hwpoison")

TS_RUN = 0
TS_SLEEP = 1
TS_EXITED = 2
TS_SIGBUS = 3
TS_KILLED = 4
TS_SIGSEGV = 5  # result: (si_code, vaddr)
FINISHED = (TS_EXITED, TS_SIGBUS, TS_KILLED, TS_SIGSEGV)
TASK_STATUS = ("run", "sleep", "exited", "sigbus", "killed", "sigsegv")


def sparse_inc(pairs: tuple[tuple[int, int], ...], key: int,
               cap: int) -> tuple[tuple[int, int], ...]:
    d = dict(pairs)
    d[key] = min(d.get(key, 0) + 1, cap)
    return tuple(sorted(d.items()))


def sparse_put(pairs: tuple[tuple[int, int], ...], key: int,
               n: int) -> tuple[tuple[int, int], ...]:
    d = dict(pairs)
    d[key] = n
    return tuple(sorted(d.items()))


def sparse_get(pairs: tuple[tuple[int, int], ...], key: int) -> int:
    for k, n in pairs:
        if k == key:
            return n
    return 0


def put(t: tuple, i: int, v: Any) -> tuple:
    """``t`` with item ``i`` replaced (a vCPU or task in its tuple)."""
    return t[:i] + (v,) + t[i + 1:]  # noqa: RUF005  (hot path: no list round trip)
