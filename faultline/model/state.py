# ruff: noqa: RUF005  (hot path: explicit tuple concatenation/slicing is the state encoding)
"""The model's state encoding: nested tuples of ints (hashable, canonical).

State = (files, mem, vcpus, tasks, guest, vmm, fired), indexed by the S_* constants.
Every component is a tuple; sets are bitmasks over a global window-page index ("gidx",
precomputed by System); sparse maps are sorted tuples of pairs.
"""

from __future__ import annotations

# --- top level ---
S_FILES = 0  # tuple per file, F_*
S_MEM = 1  # sorted ((addr, value), ...): u64 values written (guest or host), by gpa+offset
S_VCPUS = 2  # tuple per vCPU, V_*
S_TASKS = 3  # tuple per task, T_*
S_GUEST = 4  # G_*
S_VMM = 5  # M_*
S_FIRED = 6  # bitmask of host events already applied

# --- host file (hostmm) ---
F_SIZE = 0  # bytes
F_CACHED = 1  # bitmask of window pages present in the page cache
F_HOLES = 2  # bitmask of pages that are holes now
F_ZEROED = 3  # bitmask of pages whose data was dropped (punched) -> read as zero
F_POISON = 4  # bitmask of pages hwpoisoned on the host
F_ZERO_FROM = 5  # lowest size the file ever had: original data beyond it reads zero

# --- vCPU (KVM side) ---
V_CUR = 0  # position in the vCPU's task list of the current guest task
V_MODE = 1  # MODE_*
V_HASH = 2  # async PF gfn hash: sorted ((slot, gfn), ...)
V_QUEUE = 3  # outstanding async work: ((token, gfn, notpresent_injected), ...) in order
V_DONE = 4  # completed work: ((token, gfn, injected, ok), ...) in completion order
V_REQS = 5  # request bitmask (kvm.REQ_*)
V_ERR = 6  # error-gfn: sorted ((slot, gfn), ...); request: gfn or -1
V_EXIT = 7  # () or (kind, gpa, task, kernel_mode): the vCPU is in userspace
V_MCEQ = 8  # MCEs the VMM still has to inject: ((gpa, action_required), ...)
V_APFID = 9  # upstream token counter (token_alloc="counter"), else 0

MODE_RUN = 0
MODE_HALTED = 1  # KVM_REQ_APF_HALT: artificial halt until a page is present
MODE_EXIT = 2  # returned to userspace, waiting for the VMM

EXIT_MEMORY_FAULT = 0  # KVM_EXIT_MEMORY_FAULT with gpa (memory-fault-exit design)
EXIT_BARE_EFAULT = 1  # KVM_RUN -EFAULT, exit_reason stale, no gpa
EXIT_REQUEST = 2  # the "request" design: exit at entry with the failed GFN
EXIT_HWPOISON = 3  # SIGBUS BUS_MCEERR_AR to the vCPU thread (kvm_send_hwpoison_signal)
EXIT_SOURCES = ("memory-fault-exit", "bare-efault", "request", "sigbus-hwpoison")

# --- task (guest side) ---
T_STATUS = 0  # TS_*
T_PC = 1
T_SUB = 2  # page within a read_span
T_CTRS = 3  # loop counters, one per loop instruction (System.loop_index)
T_STEPS = 4  # completed steps, capped at System.step_cap
T_TOKEN = 5  # APF token the task sleeps on (TS_SLEEP), else 0
T_TOUCHED = 6  # 1 once the task accessed a bad page
T_FAILS = 7  # failed tries of the current access to a bad page (capped): progress label
T_RESULT = 8  # exit code (TS_EXITED), (si_code, vaddr) (TS_SIGBUS), reason (TS_KILLED)

TS_RUN = 0
TS_SLEEP = 1
TS_EXITED = 2
TS_SIGBUS = 3
TS_KILLED = 4
FINISHED = (TS_EXITED, TS_SIGBUS, TS_KILLED)

# --- guest kernel ---
G_OFFLINED = 0  # bitmask of gidx frames taken offline by memory_failure
G_RING = 1  # undrained notification records: ((first_gidx, npages, cause, ar_task, vcpu), ...)

# --- VMM ---
M_ABORT = 0  # "" or the reason the VM was stopped
M_HANDLED = 1  # bitmask of gidx the VMM has acted on
M_KNOWN = 2  # per file: (size, holes) as the VMM last saw them
M_EXITS = 3  # memory-fault exits per page: sorted ((gidx or -1, count capped), ...)
M_REPEATS = 4  # exits for an already-handled page: sorted ((gidx, count), ...)


def sparse_inc(pairs: tuple[tuple[int, int], ...], key: int,
               cap: int) -> tuple[tuple[int, int], ...]:
    d = dict(pairs)
    d[key] = min(d.get(key, 0) + 1, cap)
    return tuple(sorted(d.items()))


def sparse_get(pairs: tuple[tuple[int, int], ...], key: int) -> int:
    for k, n in pairs:
        if k == key:
            return n
    return 0


def replace(t: tuple, i: int, v: object) -> tuple:
    return t[:i] + (v,) + t[i + 1:]
