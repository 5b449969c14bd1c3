"""The transition system: host mm + KVM (MMU fault path, async PF) + VMM + guest kernel.

``System(scenario, design, policy, sink=None, **params)``:

- ``init() -> State``
- ``enabled(state) -> list[(name, actor, fn, args)]`` and
  ``actions(state) -> list[(name, next_state)]`` (deterministic, same order every time)
- ``is_done(state)``, ``tasks_finished(state)``, ``vm_aborted(state)``, ``task_fate()``
  and the property labels (``bad_reads``, ``imprecise_kills``, ``exits_per_page``,
  ``failing_accesses``).

A vCPU action is one pass of vcpu_enter_guest(): first whatever is pending at entry
(a design's request, kvm_check_async_pf_completion, an #MC or the notification
interrupt for the guest), else one step of the current guest task, which may fault into
the KVM MMU (``_faultin``: __kvm_mmu_faultin_pfn). Async work completes in separate
actions (any order), the VMM handles exits in separate actions. Host events fire with the
task step that triggers them ("after TASK:STEP").

Where the KVM designs differ this code calls the design's hooks
(faultline/model/design.py); it never names a design. Events go to ``sink`` (an
:class:`EventSink`, e.g. the simulator's log), given at construction; without one the
model builds no event at all (the checker's case).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Protocol

from faultline import abi
from faultline.check.contract import MemoFootprint
from faultline.model import guest as G
from faultline.model import hostmm as H
from faultline.model import kvm as K
from faultline.model import vmm as M
from faultline.model.design import Design
from faultline.model.params import (
    CPU_PARAMS,
    DEFAULT_PARAMS,
    DEFAULT_PROFILE,
    PROFILE_PARAMS,
    Params,
)
from faultline.model.properties import PROPERTIES
from faultline.model.state import (
    END_ABORTED,
    END_CRASHED,
    END_PANIC,
    END_RESET,
    END_WORDS,
    EXIT_BARE_EFAULT,
    EXIT_HWPOISON,
    EXIT_MEMORY_FAULT,
    EXIT_REQUEST,
    EXIT_SOURCES,
    FINISHED,
    MODE_EXIT,
    MODE_HALTED,
    MODE_RUN,
    MODES,
    TASK_STATUS,
    TS_EXITED,
    TS_KILLED,
    TS_RUN,
    TS_SIGBUS,
    TS_SIGSEGV,
    TS_SLEEP,
    ApfDone,
    ApfWork,
    Exit,
    File,
    Guest,
    RingRecord,
    State,
    Task,
    Vcpu,
    Vmm,
    put,
    sparse_get,
    sparse_inc,
    sparse_put,
)
from faultline.pages import PageRanges
from faultline.scenario import POLICIES, Scenario, file_value
from faultline.vmm import policy as P

__all__ = ["DEFAULT_PARAMS", "EventSink", "System"]

A_READ, A_WRITE, A_EXEC, A_KREAD = 1, 2, 3, 4


class Access(NamedTuple):
    """One guest memory access of an instruction, compiled from the scenario."""
    kind: int  # A_*
    gidx: int  # window page index, -1 for anonymous guest RAM
    file: int
    page: int
    addr: int  # gpa
    vaddr: int
    expect: int | None
    wvalue: int
    user: bool  # False: a kernel-mode access (kread)
    init: int  # the file's original value at this address
    writable: bool  # the guest PTE allows writes


R_OK, R_RETRY, R_SLEEP, R_EXIT, R_DEAD = range(5)

# The gpa of QEMU's broadcast #MC record in a vCPU's mce_queue (it carries no address).
MCE_BROADCAST = -1
SI_KERNEL = 0x80  # include/uapi/asm-generic/siginfo.h: sent by the kernel (SEND_SIG_PRIV)
SEGV_ACCERR = 2  # include/uapi/asm-generic/siginfo.h: invalid permissions for the object
SIGBUS_CODES = {abi.BUS_ADRERR: "BUS_ADRERR", abi.BUS_MCEERR_AR: "BUS_MCEERR_AR",
                abi.BUS_MCEERR_AO: "BUS_MCEERR_AO", SI_KERNEL: "SI_KERNEL"}


class EventSink(Protocol):
    """Where the model's events go (faultline.outcome.EventLog is one)."""

    def emit(self, kind: str, *, vcpu: int | None = None, task: str | None = None,
             **fields: Any) -> Any: ...


class System:
    # Actions of vCPU v (args[0] == v) that read and write only vCPU v, the tasks of vCPU
    # v and the shared records (files, mem, guest, vmm, fired): never another vCPU nor
    # another vCPU's tasks (the guest's memory_failure, which may kill any mapper, runs
    # only in _guest_mce / _guest_notify, which are not listed). The checker memoises
    # these per (action, args, those records) (check/adapter.py): ~96% of edges are then
    # one dict lookup. FAULTLINE_CHECK_MEMO=1 asserts both sides on every edge.
    VCPU_LOCAL_ACTIONS = frozenset(("_step", "_async_execute", "_apf_ready",
                                    "_request_exit", "_vmm_exit", "_timer_tick"))
    properties = PROPERTIES  # the checker's contract: faultline.check.contract.Model

    def __init__(self, scenario: Scenario, design: str | Design, policy: str, *,
                 sink: EventSink | None = None, profile: str | None = None,
                 **params: Any) -> None:
        from faultline.model.designs import get_design

        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r} (one of: {', '.join(POLICIES)})")
        self.d: Design = design if isinstance(design, Design) else get_design(design)
        self.design = self.d.name
        # The profile (docs/linux-qemu.md) sets the behaviours it stands for; explicit
        # parameters override it.
        self.profile = profile or scenario.profile or DEFAULT_PROFILE
        if self.profile not in PROFILE_PARAMS:
            raise ValueError(f"unknown profile {self.profile!r} "
                             f"(one of: {', '.join(PROFILE_PARAMS)})")
        base = dict(PROFILE_PARAMS[self.profile])
        if scenario.preempt is not None:
            base["preempt"] = scenario.preempt
        if self.profile == "linux-qemu":
            # The guest CPU QEMU presents: QEMU + Linux behaviours, not faultline's VMM's.
            for name, value in (("guest_cpu", scenario.cpu),
                                ("amd_succor", scenario.amd_succor),
                                ("mcg_ser_p", scenario.mcg_ser_p)):
                if value is not None:
                    base[name] = value
        else:
            odd = [n for n in CPU_PARAMS if n in params and params[n] != DEFAULT_PARAMS[n]]
            if odd:
                raise ValueError(f"{odd[0]} is for the linux-qemu profile (faultline's VMM "
                                 "injects Intel's encoding into a guest with MCG_SER_P)")
        self.params = p = Params.make(**{**base, **params})
        self.sc = scenario
        self.policy = policy
        self.sink = sink
        self.hash_size = p.hash_size
        self.max_queued = p.async_pf_per_vcpu
        self.counter_tokens = p.token_alloc == "counter"
        self.kernel_irqs_on = p.kernel_irqs_on
        self.pv_apf = scenario.apf
        self.apf_possible = scenario.apf or p.async_without_pv
        self.fail_cap = p.fail_cap
        self.exit_cap = p.exit_cap
        self.nvcpus = scenario.vcpus
        self.holes_fail = p.uffd_sigbus_holes
        self.exact_gpa = p.vmm_exact_gpa
        self.proactive_sync = p.proactive_sync and P.NEEDS[policy].watch_files
        self.notify_one_vcpu = p.notify_one_vcpu
        self.timer_ends_halt = p.timer_ends_halt
        self.full_preempt = p.preempt == "full"
        self.read_only = tuple(f.readonly for f in scenario.files)

        # Window pages get a global index (gidx) for bitmasks.
        self.files = scenario.files
        self.fbase: list[int] = []
        self.gidx_page: list[tuple[int, int]] = []  # gidx -> (file, page)
        self.gpa_gidx: dict[int, int] = {}
        for fi, f in enumerate(self.files):
            self.fbase.append(len(self.gidx_page))
            for pg in range(f.pages):
                self.gpa_gidx[f.gpa(pg)] = len(self.gidx_page)
                self.gidx_page.append((fi, pg))
        self.ngidx = len(self.gidx_page)

        self.tasks = scenario.tasks
        self.names = tuple(t.name for t in self.tasks)
        # The vCPUs each task may run on (difference 7, docs/linux-qemu.md): its affinity
        # when woken tasks may move (wake_migrate), else its own vCPU. by_vcpu[v]: the
        # tasks that may run on v, i.e. vCPU v's scheduler list (a task is on v when
        # Task.cpu == v); with every task pinned it is the tasks of v.
        self.wake_migrate = p.wake_migrate
        every = tuple(range(scenario.vcpus))
        self.allowed: tuple[tuple[int, ...], ...] = tuple(
            ((t.cpus if t.cpus is not None else every) if p.wake_migrate else (t.vcpu,))
            for t in self.tasks)
        self.by_vcpu: tuple[tuple[int, ...], ...] = tuple(
            tuple(t.index for t in self.tasks if v in self.allowed[t.index])
            for v in range(scenario.vcpus))
        self.early_kill = tuple(t.early_kill for t in self.tasks)
        self.loop_index: list[dict[int, int]] = []
        self.acc: list[list[tuple[Access, ...]]] = []
        mappers: dict[int, list[tuple[int, int]]] = {}
        for t in self.tasks:
            li = {pc: i for i, pc in enumerate(pc for pc, ins in enumerate(t.program)
                                               if ins.op == abi.OP_LOOP)}
            self.loop_index.append(li)
            for m in t.maps:
                if m.window is not None:
                    mappers.setdefault(self.gpa_gidx[m.gpa], []).append((t.index, m.vaddr))
            self.acc.append([self._compile_accesses(t, ins) for ins in t.program])
        self.mappers = tuple(tuple(mappers.get(g, ())) for g in range(self.ngidx))

        # Host events by trigger.
        self.trig: dict[tuple[int, int], list[int]] = {}
        max_step = 0
        self.start_events: list[int] = []
        for ev in scenario.events:
            if ev.trigger.task is None:
                self.start_events.append(ev.index)
            else:
                ti = self.names.index(ev.trigger.task)
                self.trig.setdefault((ti, ev.trigger.step), []).append(ev.index)
                max_step = max(max_step, ev.trigger.step)
        self.step_cap = max_step + 1
        # Fairness classes (weak fairness per class; interned strings and tuples, so the
        # checker's class lookup hashes cheaply): "vcpuN": a runnable vCPU eventually runs
        # (a task step, an interrupt / #MC / page-ready delivery, a design's request);
        # ("asyncN", token, gfn): each queued async work item eventually completes;
        # ("vmm", action, target): each exit, each file change is eventually handled.
        self._vcpu_actor = tuple(f"vcpu{v}" for v in range(scenario.vcpus))
        self._async_actor = tuple(f"async{v}" for v in range(scenario.vcpus))
        self._vmm_exit_class = tuple(("vmm", "_vmm_exit", (v,)) for v in range(scenario.vcpus))
        self._file_class = tuple(("vmm", "_vmm_file_change", (fi,))
                                 for fi in range(len(scenario.files)))
        # The memo footprint of VCPU_LOCAL_ACTIONS (the checker's contract). QEMU's MCE
        # broadcast makes the VMM's exit handling write every other vCPU's #MC queue and
        # read their MCG_STATUS.MCIP (cpu_x86_inject_mce()): not vCPU-local then, but
        # wide (those vCPU records and its own footprint only; memoised on them).
        # An AMD guest CPU: cpu_x86_support_mca_broadcast() returns 0 (QEMU >= 9.1).
        self.amd = p.guest_cpu == "amd"
        self.mce_broadcast = p.mce_broadcast and not self.amd
        self.qemu_mcip = p.mce_while_mcip == "qemu"
        local = self.VCPU_LOCAL_ACTIONS
        wide: frozenset[str] = frozenset()
        if self.mce_broadcast:
            local = local - {"_vmm_exit"}
            wide = frozenset(("_vmm_exit",))
        # The guest's workqueue (_guest_mf_work: memory_failure(pfn, 0)) reads and writes
        # the guest record and, through kill_sigbus, only the early-kill mappers' tasks.
        ao_tasks = tuple(sorted({t for ms in self.mappers for t, _va in ms
                                 if self.early_kill[t]}))
        self.memo_footprint = MemoFootprint(local, self.by_vcpu,
                                            ("files", "mem", "guest", "vmm", "fired"),
                                            ("files", "guest", "vmm"),
                                            frozenset(("_guest_mf_work",)), ao_tasks, wide)

        # Symmetry: the explorer canonicalises every state it meets if `canonical` is
        # not None (an instance attribute, so it is absent when there is nothing to gain).
        self.sym_groups = self._symmetry_groups()
        self.canonical: Callable[[State], State] | None = (
            self._canonical if self.sym_groups and p.symmetry else None)

    # --- precomputation -------------------------------------------------------------

    def _compile_accesses(self, t: Any, ins: Any) -> tuple[Access, ...]:
        op = ins.op
        kinds = {abi.OP_READ: A_READ, abi.OP_WRITE: A_WRITE, abi.OP_EXEC: A_EXEC,
                 abi.OP_KREAD: A_KREAD, abi.OP_READ_SPAN: A_READ}
        if op not in kinds:
            return ()
        if op == abi.OP_READ_SPAN:
            # Pages of the span by address, as the guest's interpreter finds them: a page
            # mapped by an earlier instruction keeps its earlier slot, so the span's slots
            # need not be consecutive.
            base = t.maps[ins.slot].vaddr
            maps = [t.map_for_vaddr(base + i * abi.PAGE_SIZE) for i in range(ins.imm)]
        else:
            maps = [t.maps[ins.slot]]
        out = []
        for m in maps:
            assert m is not None  # the scenario compiler maps every page of a span
            addr = m.gpa + ins.arg
            vaddr = m.vaddr + ins.arg
            expect = ins.imm if (op in (abi.OP_READ, abi.OP_KREAD)
                                 and ins.flags & abi.INSN_F_EXPECT) else None
            wval = ins.imm if op == abi.OP_WRITE else 0
            user = op != abi.OP_KREAD
            if m.window is None:
                out.append(Access(kinds[op], -1, -1, -1, addr, vaddr, expect, wval, user, 0,
                                  m.writable))
            else:
                f = self.files[m.window]
                off = m.page * abi.PAGE_SIZE + ins.arg
                out.append(Access(kinds[op], self.gpa_gidx[m.gpa], m.window, m.page, addr,
                                  vaddr, expect, wval, user, file_value(f, off), m.writable))
        return tuple(out)

    # --- symmetry ---------------------------------------------------------------------

    def _symmetry_groups(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """vCPUs whose tasks are all interchangeable: ((vcpu, task indices), ...).

        The group used is the rotations of such a vCPU's task list (with Vcpu.cur rotated
        along). Why only rotations, and only when *every* task of the vCPU is alike: the
        scheduler is round-robin over list positions (the first runnable task from cur,
        then cur = pos + 1), so a permutation of positions commutes with it only if it
        preserves the cyclic order, i.e. is a rotation; a rotation maps each task to an
        identical one only if all of them are identical.

        Identical: same program, same mappings (same vaddrs and GPAs: the same file pages
        and the same anon RAM), same early_kill; and no host event triggered by one of
        them (a trigger names one task's step count) nor an expectation telling them apart.

        Soundness: let r rotate vCPU v's tasks by k. Every transition treats those tasks
        only through data that r preserves: their programs, access tables (acc),
        mappers (same vaddr for each), early_kill, the scheduler (rotation-invariant as
        above), tokens (per vCPU, unique among its sleeping tasks); task *indices* are
        stored only in Vcpu.exit (the exiting task) and in ring records (ar_task), which
        canonical() renames with the same map. So s -> s' iff r(s) -> r(s'), with the same
        fairness class (classes name vCPUs, work items and VMM targets, never tasks), and
        every label the checker reads (aborted, bad reads, "some task killed without
        touching a bad page", exits per page, "some task's access failed > N times") is
        the same on s and r(s). The quotient graph (one state per orbit) then has the same
        verdicts for every safety property and for no_hang (fair cycles, deadlocks and
        reachability of done lift and project edge by edge). Not done (not sound as is):
        permuting vCPUs (their fairness classes vcpuN / asyncN / vmm_handle_exit vcpuN
        would be permuted too, and the tokens' vCPU bits with them), and renaming token ids
        (an async work item's fairness class is (vCPU, token, gfn)). A design that keeps a
        task index in its own per-vCPU state would break this: none does. Only vCPUs
        whose every task is pinned to them take part (a woken task may move otherwise).
        """
        names_in_triggers = {ev.trigger.task for ev in self.sc.events}
        groups = []
        for v, ts in enumerate(self.by_vcpu):
            if len(ts) < 2:
                continue
            if any(self.allowed[t] != (v,) for t in ts):
                # A task that may move (wake_migrate) is on several vCPUs' lists: rotating
                # one list would not commute with a wake onto another vCPU.
                continue
            specs = [self.tasks[t] for t in ts]
            a = specs[0]
            if any(t.program != a.program or t.maps != a.maps or t.early_kill != a.early_kill
                   for t in specs[1:]):
                continue
            if any(t.name in names_in_triggers for t in specs):
                continue
            if any(len({repr(e.tasks.get(t.name)) for t in specs}) > 1
                   for e in self.sc.expectations):
                continue
            groups.append((v, ts))
        return tuple(groups)

    def _canonical(self, s: State) -> State:
        """The orbit's representative: per symmetric vCPU, the rotation of its tasks
        (with Vcpu.cur) that gives the smallest (task records, cur). Task records compare
        safely: the type of Task.result is fixed by Task.status, which comes first."""
        tasks = s.tasks
        vcpus = s.vcpus
        rename: dict[int, int] | None = None
        tl: list[Task] = []
        vl: list[Vcpu] = []
        for v, ts in self.sym_groups:
            n = len(ts)
            cur = vcpus[v].cur
            row = tuple(tasks[t] for t in ts)
            best, bk = (row, cur), 0
            for k in range(1, n):
                # rotated by k: new position (p + k) % n holds old position p
                cand = (row[n - k:] + row[:n - k], (cur + k) % n)
                if cand < best:
                    best, bk = cand, k
            if not bk:
                continue
            if rename is None:
                rename = {}
                tl = list(tasks)
                vl = list(vcpus)
            for p in range(n):
                rename[ts[p]] = ts[(p + bk) % n]
            for i, tk in enumerate(best[0]):
                tl[ts[i]] = tk
            vc = vl[v]
            ex = vc.exit
            if ex and ex.task >= 0:
                ex = ex._replace(task=rename.get(ex.task, ex.task))
            mceq = vc.mce_queue
            if mceq:
                mceq = tuple((gpa, ar, rename.get(ctx, ctx)) for gpa, ar, ctx in mceq)
            vl[v] = vc._replace(cur=best[1], exit=ex, mce_queue=mceq)
        if rename is None:
            return s
        guest = s.guest
        if guest.ring:
            guest = guest._replace(ring=tuple(r._replace(ar_task=rename.get(r.ar_task, r.ar_task))
                                              for r in guest.ring))
        return State(s.files, s.mem, tuple(vl), tuple(tl), guest, s.vmm, s.fired)

    # --- state ------------------------------------------------------------------------

    def init(self) -> State:
        cached = self.params.cached_at_start
        files = tuple(H.new_file(f.size, f.pages, cached) for f in self.files)
        vcpus = tuple(Vcpu(0, MODE_RUN, (), (), (), 0, self.d.vcpu_init, (), (), 1)
                      for _ in range(self.sc.vcpus))
        tasks = tuple(Task(TS_RUN, 0, 0, (0,) * len(self.loop_index[t.index]), 0, 0, 0, 0, 0,
                           t.vcpu) for t in self.tasks)
        guest = Guest(0, (), 0, 0, ())
        vmm = Vmm("", 0, tuple((f.size, 0) for f in self.files), (), ())
        s = State(files, (), vcpus, tasks, guest, vmm, 0)
        for e in self.start_events:
            s = self._fire(s, e)
        return s

    # --- enabled actions ----------------------------------------------------------------

    def enabled(self, s: State, names: bool = True
                ) -> list[tuple[str | None, Hashable, Callable[..., State], tuple]]:
        """Every enabled action: (name, fairness class, fn, args); next state =
        fn(s, *args). ``names=False``: name is None (cheaper; for exhaustive search).
        In this order: each vCPU's (enabled_vcpu), then the VMM's file watcher's
        (enabled_global)."""
        out: list[tuple[str | None, Hashable, Callable[..., State], tuple]] = []
        if s.vmm.abort:
            return out
        for v in range(len(s.vcpus)):
            out += self.enabled_vcpu(s, v, names)
        return out + self.enabled_global(s, names)

    def enabled_vcpu(self, s: State, v: int, names: bool = True
                     ) -> list[tuple[str | None, Hashable, Callable[..., State], tuple]]:
        """The actions of vCPU v: what it runs next (a VMM exit handling, a design's
        request, a page-ready, an #MC, the notification interrupt or a task step), then
        its async work items. Reads only vCPU v, its tasks, the guest and the vmm records
        (the memo footprint: the checker memoises this per vCPU)."""
        out: list[tuple[str | None, Hashable, Callable[..., State], tuple]] = []
        if s.vmm.abort:
            return out
        vc = s.vcpus[v]
        mode = vc.mode
        if mode == MODE_EXIT:
            out.append((f"vmm_handle_exit vcpu{v}" if names else None,
                        self._vmm_exit_class[v], self._vmm_exit, (v,)))
            return out
        va = self._vcpu_actor[v]  # interned: its hash is computed once (the checker's class)
        ring = s.guest.ring
        if vc.requests & self.d.entry_requests:
            out.append(((f"vcpu{v} {self.d.entry_action}" if names else None), va,
                        self._request_exit, (v,)))
        elif vc.apf_done:
            work = vc.apf_done[0]
            name = (f"vcpu{v} kvm_check_async_pf_completion token={work.token:#x}" if names
                    else None)
            sleeper = self._sleeper(s, v, work) if self.wake_migrate else -1
            if sleeper < 0 or len(self.allowed[sleeper]) == 1:
                out.append((name, va, self._apf_ready, (v, v)))
            else:
                # Difference 7: one action per vCPU the woken task may run on next.
                for w in self._wake_targets(s, v, sleeper):
                    out.append((f"{name} (wakes {self.names[sleeper]} on vcpu{w})" if names
                                else None, va, self._apf_ready, (v, w)))
        elif vc.mce_queue:
            gpa0 = vc.mce_queue[0][0]
            out.append(((f"vcpu{v} guest #MC " + (f"gpa={gpa0:#x}" if gpa0 >= 0 else "broadcast")
                         if names else None), va, self._guest_mce, (v,)))
        elif ring and (not self.notify_one_vcpu or any(r.vcpu == v for r in ring)):
            # The notification interrupt goes to one vCPU (the VMM's KVM_INTERRUPT);
            # the others run on meanwhile, as on real KVM.
            out.append(((f"vcpu{v} guest notify interrupt" if names else None), va,
                        self._guest_notify, (v,)))
        elif mode == MODE_RUN:
            tasks = s.tasks
            mine = self.by_vcpu[v]
            n = len(mine)
            cur = vc.cur
            for i in range(n):
                pos = (cur + i) % n
                t = mine[pos]
                tk = tasks[t]
                if tk.status == TS_RUN and tk.cpu == v:
                    out.append((f"vcpu{v} {self.names[t]}: "
                                f"{self.tasks[t].program[tk.pc].text}" if names else None,
                                va, self._step, (v, pos, t)))
                    break
        elif self.timer_ends_halt and self._timer_reschedules(s, v):
            out.append(((f"vcpu{v} timer interrupt ends the artificial halt" if names
                         else None), va, self._timer_tick, (v,)))
        for item in vc.apf_queue:
            out.append((f"async_pf_execute vcpu{v} token={item.token:#x}" if names else None,
                        (self._async_actor[v], item.token, item.gfn),
                        self._async_execute, (v, item)))
        return out

    def enabled_global(self, s: State, names: bool = True
                       ) -> list[tuple[str | None, Hashable, Callable[..., State], tuple]]:
        """The guest's memory_failure() workqueue (linux-qemu's deferred SRAO: one page
        at a time), then the proactive VMM's file watcher: one action per file it has not
        seen as it is now. Reads only the files, the guest and the vmm records."""
        out: list[tuple[str | None, Hashable, Callable[..., State], tuple]] = []
        vmm = s.vmm
        if vmm.abort:
            return out
        pending = s.guest.mf_pending
        if pending:
            g, v = pending[0]
            out.append(((f"vcpu{v} guest kworker memory_failure gpa={self.gidx_gpa(g):#x}"
                         if names else None), "kworker", self._guest_mf_work, (g, v)))
        if not P.NEEDS[self.policy].watch_files:
            return out
        files = s.files
        for fi, known in enumerate(vmm.known):
            f = files[fi]
            if known[0] != f.size or known[1] != f.holes:
                out.append((f"vmm_file_change {self.files[fi].name}" if names else None,
                            self._file_class[fi], self._vmm_file_change, (fi,)))
        return out

    def actions(self, s: State) -> list[tuple[str, State]]:
        # enabled() with names: every name is a str
        return [(name or "", fn(s, *args)) for name, _actor, fn, args in self.enabled(s)]

    def successors(self, s: State) -> list[State]:
        """The next states only, in the order of actions() (no names: for BFS; replay a
        path with actions() to name it)."""
        return [fn(s, *args) for _n, _a, fn, args in self.enabled(s, False)]

    # --- labels / predicates for the checker --------------------------------------------

    def tasks_finished(self, s: State) -> bool:
        return all(tk.status in FINISHED for tk in s.tasks)

    def vm_aborted(self, s: State) -> bool:
        """The run ended early, whichever way (vm_end says which)."""
        return bool(s.vmm.abort)

    def vm_end(self, s: State) -> str:
        """How the run ended early, as Outcome.vm says it: aborted | crashed | reset |
        panic ("" while it has not)."""
        return END_WORDS[s.vmm.end]

    def is_done(self, s: State) -> bool:
        return self.vm_aborted(s) or self.tasks_finished(s)

    def task_fate(self, s: State, t: int) -> tuple:
        """("exited", code) | ("sigbus", si_code name, vaddr) | ("killed", reason) |
        ("running",) | ("sleeping", token)."""
        tk = s.tasks[t]
        st = tk.status
        if st == TS_EXITED:
            return ("exited", tk.result)
        if st == TS_SIGBUS:
            code, vaddr = tk.result
            return ("sigbus", SIGBUS_CODES.get(code, str(code)), vaddr if vaddr >= 0 else None)
        if st == TS_SIGSEGV:
            return ("sigsegv", "SEGV_ACCERR", tk.result[1])
        if st == TS_KILLED:
            return ("killed", tk.result)
        if st == TS_SLEEP:
            return ("sleeping", tk.token)
        return ("running",)

    def bad_reads(self, s: State) -> int:
        """Accesses completed with data from a page that cannot back them (fabricated
        data): a page beyond EOF, a hole never written, or a poisoned page."""
        return s.guest.bad_reads

    def imprecise_kills(self, s: State) -> list[str]:
        """Tasks killed (SIGBUS / killed) that never touched a bad page."""
        return [self.names[t] for t, tk in enumerate(s.tasks)
                if tk.status in (TS_SIGBUS, TS_KILLED) and not tk.touched]

    def exits_per_page(self, s: State) -> dict[int, int]:
        """Memory-fault exits to userspace per bad page (GPA; -1: unknown), saturating."""
        out = {}
        for g, n in s.vmm.exits:
            out[-1 if g < 0 else self.gidx_gpa(g)] = n
        return out

    def failing_accesses(self, s: State) -> dict[str, int]:
        """Tasks whose current access to a bad page has failed (count, saturating): the
        "first failing access" counters; 0 once the access is resolved."""
        return {self.names[t]: tk.fails for t, tk in enumerate(s.tasks) if tk.fails}

    def wrong_mce(self, s: State) -> int:
        """SRARs taken by a context whose access did not touch the page, or a guest panic
        on one (the right_victim label)."""
        return s.guest.wrong_mce

    def offlined_gpas(self, s: State) -> set[int]:
        mask = s.guest.offlined
        return {self.gidx_gpa(g) for g in range(self.ngidx) if mask >> g & 1}

    def gidx_gpa(self, g: int) -> int:
        fi, pg = self.gidx_page[g]
        return self.files[fi].gpa(pg)

    def describe(self, s: State) -> dict[str, Any]:
        """A readable view of a state (for counterexamples)."""
        return {
            "files": {f.name: {"size": s.files[i].size, "cached": bin(s.files[i].cached)}
                      for i, f in enumerate(self.files)},
            "tasks": {self.names[t]: self.task_fate(s, t) for t in range(len(self.tasks))},
            "vcpus": [{"mode": MODES[vc.mode], "hash": vc.apf_hash, "queue": vc.apf_queue,
                       "done": vc.apf_done, "exit": vc.exit, "mceq": vc.mce_queue}
                      for vc in s.vcpus],
            "offlined": sorted(hex(g) for g in self.offlined_gpas(s)),
            "vmm": {"abort": s.vmm.abort, "end": END_WORDS[s.vmm.end], "exits": s.vmm.exits},
        }

    def view(self, s: State) -> dict[str, Any]:
        """A flat ``{"tasks.toucher.pc": 1, "vcpus[0].apf_queue": ...}`` view of a state,
        named from its records (the checker diffs it along a counterexample)."""
        out: dict[str, Any] = {}
        x: Any
        for i, f in enumerate(s.files):
            for k, x in zip(f._fields, f, strict=True):
                out[f"files.{self.files[i].name}.{k}"] = x
        out["mem"] = s.mem
        design_field = self.d.vcpu_state_name
        for v, vc in enumerate(s.vcpus):
            for k, x in zip(vc._fields, vc, strict=True):
                out[f"vcpus[{v}].{design_field if k == 'design' else k}"] = x
            out[f"vcpus[{v}].mode"] = MODES[vc.mode]
        for t, tk in enumerate(s.tasks):
            for k, x in zip(tk._fields, tk, strict=True):
                out[f"tasks.{self.names[t]}.{k}"] = x
            out[f"tasks.{self.names[t]}.status"] = TASK_STATUS[tk.status]
        for k, x in zip(s.guest._fields, s.guest, strict=True):
            out[f"guest.{k}"] = x
        for k, x in zip(s.vmm._fields, s.vmm, strict=True):
            out[f"vmm.{k}"] = x
        out["vmm.end"] = END_WORDS[s.vmm.end]
        out["fired"] = s.fired
        return out

    # --- helpers (also for design hooks) ---------------------------------------------

    def emit(self, kind: str, vcpu: int | None = None, task: int | None = None,
             **fields: Any) -> None:
        """An event to the sink (none: nothing); ``task`` is an index, logged by name."""
        if self.sink is not None:
            self.sink.emit(kind, vcpu=vcpu, task=self.names[task]
                           if task is not None and task >= 0 else None, **fields)

    # The top level has 7 fields: building it by constructor is about twice as fast as
    # _replace; these run on most transitions.
    @staticmethod
    def set_vcpu(s: State, v: int, vc: Vcpu) -> State:
        vcpus = s.vcpus
        return State(s.files, s.mem, vcpus[:v] + (vc,) + vcpus[v + 1:],  # noqa: RUF005
                     s.tasks, s.guest, s.vmm, s.fired)

    @staticmethod
    def set_task(s: State, t: int, tk: Task) -> State:
        tasks = s.tasks
        return State(s.files, s.mem, s.vcpus, tasks[:t] + (tk,) + tasks[t + 1:],  # noqa: RUF005
                     s.guest, s.vmm, s.fired)

    @staticmethod
    def set_file(s: State, fi: int, f: File) -> State:
        return s._replace(files=put(s.files, fi, f))

    def current_task(self, s: State, v: int) -> int:
        """The task vCPU v runs now if it is runnable, else -1."""
        mine = self.by_vcpu[v]
        if not mine:
            return -1
        t = mine[s.vcpus[v].cur % len(mine)]
        tk = s.tasks[t]
        return t if tk.status == TS_RUN and tk.cpu == v else -1

    def _sleeper(self, s: State, v: int, work: ApfDone) -> int:
        """The task page-ready for ``work`` will wake (asleep on its token), else -1."""
        if not (work.injected and self.pv_apf):
            return -1
        return G.sleeper(s.tasks, self.by_vcpu[v], work.token)

    def _wake_targets(self, s: State, v: int, t: int) -> tuple[int, ...]:
        """The vCPUs task t, woken on vCPU v, may run on next: its whole affinity (the
        checker explores each). In the order of select_task_rq_fair()'s fast path as far
        as vCPU v's own state tells (the memo footprint: v and its tasks): stay on v if v
        is idle (select_idle_sibling() returns an idle target), else the other vCPUs
        first. The simulator's round-robin takes the first."""
        tasks = s.tasks
        idle = s.vcpus[v].mode == MODE_RUN and not any(
            tasks[u].status == TS_RUN and tasks[u].cpu == v for u in self.by_vcpu[v])
        others = tuple(w for w in self.allowed[t] if w != v)
        return (v, *others) if idle else (*others, v)

    def exit_to_userspace(self, s: State, v: int, ex: Exit, count_gpa: int) -> State:
        """KVM_RUN returns to the VMM on vCPU v with ``ex``; a memory-fault exit for the
        page of ``count_gpa`` is counted (the one_exit_per_bad_page label)."""
        vc = s.vcpus[v]
        s = self.set_vcpu(s, v, vc._replace(mode=MODE_EXIT, exit=ex))
        g = self.gpa_gidx.get(count_gpa & ~(abi.PAGE_SIZE - 1), -1)
        vmm = s.vmm
        return s._replace(vmm=vmm._replace(exits=sparse_inc(vmm.exits, g, self.exit_cap)))

    def _value(self, s: State, a: Access) -> int:
        addr = a.addr
        for k, val in s.mem:
            if k == addr:
                return val
        if a.gidx < 0:
            return 0
        f = s.files[a.file]
        off = a.page * abi.PAGE_SIZE + (addr & (abi.PAGE_SIZE - 1))
        if f.zeroed >> a.page & 1 or off >= f.zero_from:
            return 0
        return a.init

    @staticmethod
    def _mem_set(mem: tuple, addr: int, value: int) -> tuple:
        d = dict(mem)
        d[addr] = value
        return tuple(sorted(d.items()))

    # --- host events ---------------------------------------------------------------------

    def _fire(self, s: State, e: int, v: int = 0) -> State:
        ev = self.sc.events[e]
        fi = next(i for i, f in enumerate(self.files) if f.name == ev.file)
        spec = self.files[fi]
        f = s.files[fi]
        mem = s.mem
        wlo, whi = spec.window_gpa, spec.window_gpa + spec.window_bytes
        size = ev.size if ev.size is not None else 0  # set for truncate/extend (validated)
        if ev.action == "truncate" and size > f.size:
            nf = H.extend(f, size, spec.pages)  # ftruncate(2) to a larger size grows it
            self.emit("host_truncate", file=spec.name, old_size=f.size, new_size=size)
        elif ev.action == "truncate":
            nf = H.truncate(f, size, spec.pages)
            mem = tuple(x for x in mem if not (wlo <= x[0] < whi and x[0] - wlo >= size))
            self.emit("host_truncate", file=spec.name, old_size=f.size, new_size=size)
        elif ev.action == "extend":
            nf = H.extend(f, size, spec.pages)
            self.emit("host_extend", file=spec.name, old_size=f.size, new_size=nf.size)
        elif ev.action == "punch-hole":
            nf = H.punch_hole(f, ev.offset, ev.length, spec.pages)
            lo, hi = wlo + ev.offset, wlo + ev.offset + ev.length
            mem = tuple(x for x in mem if not lo <= x[0] < hi)
            self.emit("host_punch_hole", file=spec.name, offset=ev.offset, length=ev.length)
        elif ev.action == "poison":
            nf = H.poison(f, ev.offset, ev.length, spec.pages)
            self.emit("host_memory_failure", file=spec.name, offset=ev.offset,
                      length=ev.length)
        else:  # write
            # pwrite(2): a write past EOF extends the file (the gap is sparse); the written
            # page is allocated (no longer a hole).
            f = H.extend(f, ev.offset + 8, spec.pages)
            pg = ev.offset >> abi.PAGE_SHIFT
            bit = 1 << pg if pg < spec.pages else 0
            nf = f._replace(cached=f.cached | bit, holes=f.holes & ~bit)
            mem = self._mem_set(mem, wlo + ev.offset, ev.value)
            self.emit("host_write", file=spec.name, offset=ev.offset, value=hex(ev.value))
        s = s._replace(files=put(s.files, fi, nf), mem=mem, fired=s.fired | (1 << e))
        if self.proactive_sync:
            known = s.vmm.known[fi]
            if known[0] != nf.size or known[1] != nf.holes:
                s = self._vmm_file_change(s, fi, v)
        return s

    # --- vCPU: pending work at entry -------------------------------------------------------

    def _timer_reschedules(self, s: State, v: int) -> bool:
        """vCPU v is halted artificially (KVM_REQ_APF_HALT): does a timer interrupt make
        the guest run another task? vcpu_block() wakes on kvm_vcpu_has_events() (the
        timer's interrupt: kvm_arch_interrupt_allowed() && kvm_cpu_has_interrupt()) and
        clears apf.halted; the interrupt arrives at the faulting access. The guest's
        irqentry_exit() reschedules a user-mode context always, a kernel-mode one only
        with CONFIG_PREEMPT (irqentry_exit_cond_resched()). Left out when it changes
        nothing: the same task would retry and halt again."""
        mine = self.by_vcpu[v]
        n = len(mine)
        if n < 2:
            return False
        cur = s.vcpus[v].cur % n
        tasks = s.tasks
        tk = tasks[mine[cur]]
        if tk.status == TS_RUN and tk.cpu == v and not self.full_preempt:
            accs = self.acc[mine[cur]][tk.pc]
            if accs and not accs[tk.sub].user:
                return False
        return any(tasks[u].status == TS_RUN and tasks[u].cpu == v
                   for u in (mine[(cur + i) % n] for i in range(1, n)))

    def _timer_tick(self, s: State, v: int) -> State:
        """The timer interrupt ends vCPU v's artificial halt and the guest's scheduler
        moves on to the next task (the halted one stays runnable: it retries later)."""
        vc = s.vcpus[v]
        self.emit("guest_timer_reschedule", vcpu=v, task=self.current_task(s, v))
        return self.set_vcpu(s, v, vc._replace(mode=MODE_RUN,
                                               cur=(vc.cur + 1) % len(self.by_vcpu[v])))

    def _request_exit(self, s: State, v: int) -> State:
        """vcpu_enter_guest() with a design's request pending (Design.entry_requests)."""
        return self.d.vcpu_enter_guest(self, s, v)

    def _apf_ready(self, s: State, v: int, w: int) -> State:
        """kvm_check_async_pf_completion(): one completed item: kvm_arch_async_page_ready()
        (prefetch retry) then kvm_arch_async_page_present() (page-ready to the guest). A
        task the page-ready wakes runs on vCPU w next (difference 7: try_to_wake_up() ->
        select_task_rq(); w == v unless Params.wake_migrate)."""
        work = s.vcpus[v].apf_done[0]
        token, gfn = work.token, work.gfn
        gpa = gfn << abi.PAGE_SHIFT
        fi, pg = self.gidx_page[self.gpa_gidx[gpa]]
        # kvm_arch_async_page_ready(): re-run the fault as a prefetch (no async, blocking).
        res, nf = H.gup_blocking(s.files[fi], pg, self.holes_fail)
        if nf is not s.files[fi]:
            s = self.set_file(s, fi, nf)
        failed = res != H.GUP_OK
        # kvm_handle_error_pfn(): KVM_PFN_ERR_HWPOISON -> kvm_send_hwpoison_signal(): SIGBUS
        # BUS_MCEERR_AR at the HVA to current, the vCPU thread, and RET_PF_RETRY, which is
        # no error to a design that looks at the prefetch's result.
        sigbus = res == H.GUP_HWPOISON and self.params.prefetch_hwpoison_sigbus
        self.emit("kvm_arch_async_page_ready", vcpu=v, token=hex(token), gpa=hex(gpa),
                  prefetch="mapped" if not failed else
                  "KVM_PFN_ERR_HWPOISON: SIGBUS to the vCPU thread" if sigbus else "-EFAULT")
        s = self.d.kvm_arch_async_page_ready(self, s, v, work, failed and not sigbus)
        # kvm_arch_async_page_present()
        self.emit("kvm_async_pf_ready", vcpu=v, token=hex(token), gpa=hex(gpa))
        vc = s.vcpus[v]
        tasks = s.tasks
        if work.injected and self.pv_apf:
            error = self.d.kvm_arch_async_page_present(self, s, v, work, failed)
            tasks, woke = G.wake_token(tasks, self.by_vcpu[v], token)
            moved = w != v and woke >= 0
            if moved:
                tasks = put(tasks, woke, tasks[woke]._replace(cpu=w))
            self.emit("guest_apf_page_ready", vcpu=v, task=woke, token=hex(token), error=error,
                      **({"wake_cpu": w} if moved else {}))
            if woke >= 0 and error:
                tk = tasks[woke]
                a = self.acc[woke][tk.pc][tk.sub]
                # The page went bad while its async fault was in flight: the woken task
                # did touch a bad page (its access is the one that failed).
                if self.params.apf_error_report == "vivek-2020":
                    # handle_async_pf_error(): send_sig_info(SIGBUS, SEND_SIG_PRIV, current):
                    # si_code SI_KERNEL, no address.
                    code, vaddr, shown = SI_KERNEL, -1, None  # -1: no address
                else:
                    code, vaddr, shown = abi.BUS_ADRERR, a.vaddr, hex(a.vaddr)
                tasks = put(tasks, woke, G.kill_sigbus(tk._replace(touched=1), code, vaddr))
                self.emit("guest_sigbus", vcpu=v, task=woke, code=SIGBUS_CODES[code],
                          vaddr=shown)
        mode = MODE_RUN if vc.mode == MODE_HALTED else vc.mode
        nvc = vc._replace(mode=mode, apf_hash=K.hash_del(vc.apf_hash, gfn, self.hash_size),
                          apf_done=vc.apf_done[1:])
        # The context vCPU v runs now, before the guest takes the page-ready interrupt.
        t = self.current_task(s, v) if sigbus else -1
        s = State(s.files, s.mem, put(s.vcpus, v, nvc), tasks, s.guest, s.vmm, s.fired)
        if sigbus:
            # The vCPU thread leaves KVM_RUN with the signal pending; QEMU handles it in
            # kvm_arch_on_sigbus_vcpu() for that context.
            self.emit("kvm_exit", vcpu=v, task=t, reason="SIGBUS BUS_MCEERR_AR", gpa=hex(gpa),
                      size=abi.PAGE_SIZE, source=EXIT_SOURCES[EXIT_HWPOISON])
            s = self.exit_to_userspace(s, v, Exit(EXIT_HWPOISON, gpa, t, 0), gpa)
        return s

    def _async_execute(self, s: State, v: int, item: ApfWork) -> State:
        """async_pf_execute(): get_user_pages_remote() (result discarded upstream), then
        queue the item as done and kick the vCPU (KVM_REQ_APF_READY)."""
        token, gfn = item.token, item.gfn
        fi, pg = self.gidx_page[self.gpa_gidx[gfn << abi.PAGE_SHIFT]]
        res, nf = H.gup_blocking(s.files[fi], pg, self.holes_fail)
        if nf is not s.files[fi]:
            s = self.set_file(s, fi, nf)
        ok = res == H.GUP_OK
        if self.sink is not None:
            self.emit("kvm_async_pf_completed", vcpu=v, token=hex(token),
                      gpa=hex(gfn << abi.PAGE_SHIFT),
                      result="ok" if ok else
                      ("-EHWPOISON" if res == H.GUP_HWPOISON else "-EFAULT"))
        vc = s.vcpus[v]
        nvc = Vcpu(vc.cur, vc.mode, vc.apf_hash,
                   tuple(x for x in vc.apf_queue if x.token != token),
                   vc.apf_done + (ApfDone(token, gfn, item.injected, ok),),  # noqa: RUF005
                   vc.requests | K.REQ_APF_READY, vc.design, vc.exit, vc.mce_queue, vc.apf_id)
        return self.set_vcpu(s, v, nvc)

    def _guest_mce(self, s: State, v: int) -> State:
        """The guest's #MC handler for an injected machine check (one per entry: never
        while MCG_STATUS.MCIP is set)."""
        vc = s.vcpus[v]
        (gpa, ar, ctx), rest = vc.mce_queue[0], vc.mce_queue[1:]
        s = self.set_vcpu(s, v, vc._replace(mce_queue=rest))
        if gpa == MCE_BROADCAST:
            # QEMU's broadcast record (cpu_x86_inject_mce(): bank 1, VAL|UC, no S, no
            # ADDRV). Linux's do_machine_check() on this CPU: MCG_STATUS.RIPV is set, so
            # no kill_current_task; mce_severity() grades it KEEP ("Non signaled machine
            # check"), nothing to act on; MCG_STATUS is cleared on the way out. The
            # mce_start()/mce_end() rendezvous with the SRAR's CPU is not modelled: each
            # handler runs as one step (it only widens the window in which MCIP is set).
            self.emit("guest_mce", vcpu=v, task=-1, mcg_status=hex(P.MCG_BROADCAST),
                      status=hex(P.MCI_BROADCAST), addr="0x0", misc="0x0", mce="broadcast",
                      bank=1)
            return s
        page = gpa & ~(abi.PAGE_SIZE - 1)
        g = self.gpa_gidx.get(page, -1)
        # The context the #MC interrupts is the one the vCPU left the guest in (an
        # exception is injected before a pending interrupt, such as a page-ready one).
        t = ctx if ctx >= 0 and s.tasks[ctx].status == TS_RUN else -1
        status, addr, misc, mcg = P.mce_encoding(gpa, ar, self.params.guest_cpu)
        self.emit("guest_mce", vcpu=v, task=t, mcg_status=hex(mcg), status=hex(status),
                  addr=hex(addr), misc=hex(misc), mce="SRAR" if ar else "SRAO")
        if g < 0:
            return s
        if ar and (t < 0 or not self._touching(s, t, g)):
            # An SRAR in a context whose access did not touch the page (right_victim).
            s = s._replace(guest=s.guest._replace(wrong_mce=1))
        if ar and self.amd and not self.params.amd_succor:
            # Linux's mce_severity_amd(): UC set and no SUCCOR in CPUID (mce_flags.succor)
            # is MCE_PANIC_SEVERITY, whatever the context; do_machine_check() -> mce_panic().
            reason = "guest panic: Uncorrected error without MCA Recovery (AMD, no SUCCOR)"
            self.emit("guest_panic", vcpu=v, reason=reason)
            return s._replace(vmm=s.vmm._replace(abort=reason, end=END_PANIC),
                              guest=s.guest._replace(wrong_mce=1))
        if not ar and (self.params.srao_workqueue or self.amd):
            # do_machine_check() only logs an SRAO (mce_log() -> mce_gen_pool_add());
            # uc_decode_notifier() calls memory_failure(pfn, 0) later, from a workqueue.
            # AMD: mce_severity_amd() grades DEFERRED as MCE_DEFERRED_SEVERITY, which
            # __mc_scan_banks() leaves alone; machine_check_poll() logs it later and
            # uc_decode_notifier() (mce_usable_address(): POISON) runs memory_failure().
            self.emit("guest_mce_log", vcpu=v, gpa=hex(page), deferred="memory_failure")
            pending = s.guest.mf_pending
            if any(pg == g for pg, _v in pending):
                return s
            return s._replace(guest=s.guest._replace(mf_pending=(*pending, (g, v))))
        tasks = s.tasks
        spare = -1
        kread_eio = -1
        if ar:
            if t < 0:
                # Both vendors grade it MCE_PANIC_SEVERITY: mce_severity_intel() (an AR
                # data load outside user mode and outside a recoverable kernel access),
                # mce_severity_amd() (error_context() is IN_KERNEL).
                reason = ("guest panic: Uncorrected unrecoverable error in kernel context "
                          "(AMD SRAR with no user context)" if self.amd else
                          "guest panic: SRAR #MC with no user context (kernel/idle)")
                self.emit("guest_panic", vcpu=v, reason=reason)
                return s._replace(vmm=s.vmm._replace(abort=reason, end=END_PANIC))
            vaddr = next((va for tt, va in self.mappers[g] if tt == t), None)
            if vaddr is not None:
                if self.params.srar_kill_vaddr == "exact":
                    # faultline's guest adds MCi_ADDR's offset (task_vaddr_of_gpa());
                    # Linux's kill_proc() reports page_address_in_vma(): the page.
                    vaddr += gpa - page
                tk = tasks[t]
                a = self.acc[t][tk.pc]
                if a and a[0].kind == A_KREAD:
                    # copy_mc-style fixup: the kernel read returns -EIO and the task exits,
                    # after memory_failure, which runs with no task to spare: an early-kill
                    # reader gets BUS_MCEERR_AO first (the guest's memory_failure(pfn, AR,
                    # -1); Linux's kill_me_never).
                    kread_eio = t
                    t_spare = -1
                else:
                    tasks = put(tasks, t, G.kill_sigbus(tk, abi.BUS_MCEERR_AR, vaddr))
                    self.emit("guest_sigbus", vcpu=v, task=t, code="BUS_MCEERR_AR",
                              vaddr=hex(vaddr))
                    t_spare = t
                spare = t_spare
        guest, tasks, killed = G.memory_failure(s.guest, tasks, g, self.mappers[g],
                                                self.early_kill, spare)
        self.emit("guest_memory_failure", vcpu=v, gpa=hex(page),
                  flags="MF_ACTION_REQUIRED" if ar else "0")
        for kt, va in killed:
            self.emit("guest_sigbus", vcpu=v, task=kt, code="BUS_MCEERR_AO", vaddr=hex(va))
        if kread_eio >= 0 and tasks[kread_eio].status == TS_RUN:
            tasks = put(tasks, kread_eio, G.exit_task(tasks[kread_eio],
                                                      abi.EXIT_CODE_KREAD_EIO))
            self.emit("guest_kread_eio", vcpu=v, task=kread_eio, gpa=hex(gpa))
            self.emit("task_exit", vcpu=v, task=kread_eio, code=abi.EXIT_CODE_KREAD_EIO)
        return s._replace(tasks=tasks, guest=guest)

    def _touching(self, s: State, t: int, g: int) -> bool:
        """Task t's current access is to window page g (it is the faulting context)."""
        tk = s.tasks[t]
        accs = self.acc[t][tk.pc]
        return bool(accs) and accs[tk.sub].gidx == g

    def _guest_mf_work(self, s: State, g: int, v: int) -> State:
        """The guest's workqueue on vCPU v: mce_gen_pool_process() -> uc_decode_notifier()
        -> memory_failure(pfn, 0) for an SRAO logged earlier
        (arch/x86/kernel/cpu/mce/core.c)."""
        guest = s.guest._replace(mf_pending=s.guest.mf_pending[1:])
        guest, tasks, killed = G.memory_failure(guest, s.tasks, g, self.mappers[g],
                                                self.early_kill, -1)
        self.emit("guest_memory_failure", vcpu=v, gpa=hex(self.gidx_gpa(g)), flags="0",
                  source="workqueue")
        for kt, va in killed:
            self.emit("guest_sigbus", vcpu=v, task=kt, code="BUS_MCEERR_AO", vaddr=hex(va))
        return s._replace(tasks=tasks, guest=guest)

    def _guest_notify(self, s: State, v: int) -> State:
        """The notification interrupt: drain the ring, offline every page it names."""
        tasks = s.tasks
        ring = s.guest.ring
        guest = s.guest._replace(ring=())
        self.emit("guest_notify", vcpu=v, records=len(ring))
        for rec in ring:
            for g in range(rec.first, rec.first + rec.npages):
                guest, tasks, killed = G.memory_failure(guest, tasks, g, self.mappers[g],
                                                        self.early_kill, rec.ar_task)
                self.emit("guest_memory_failure", vcpu=v, gpa=hex(self.gidx_gpa(g)),
                          flags="0", cause=rec.cause)
                for kt, va in killed:
                    self.emit("guest_sigbus", vcpu=v, task=kt, code="BUS_MCEERR_AO",
                              vaddr=hex(va))
        return s._replace(tasks=tasks, guest=guest)

    # --- vCPU: a guest task step ---------------------------------------------------------

    def _step(self, s: State, v: int, pos: int, t: int) -> State:
        vc = s.vcpus[v]
        if vc.cur != pos:  # the scheduler picked the next runnable task
            s = self.set_vcpu(s, v, vc._replace(cur=pos))
        tk = s.tasks[t]
        pc = tk.pc
        ins = self.tasks[t].program[pc]
        op = ins.op
        accs = self.acc[t][pc]
        sink = self.sink
        if accs:
            a = accs[tk.sub]
            r, s = self._access(s, v, pos, t, a)
            if r != R_OK:
                return s
            tk = s.tasks[t]
            if a.kind != A_WRITE:
                value = self._value(s, a)
                if sink is not None:
                    self.emit("task_value", vcpu=v, task=t, vaddr=hex(a.vaddr),
                              value=hex(value), gpa=hex(a.addr))
                if a.expect is not None and value != a.expect:
                    self.emit("task_exit", vcpu=v, task=t, code=abi.EXIT_CODE_EXPECT_FAILED,
                              expected=hex(a.expect))
                    return self._finish_step(s, v, pos, t,
                                             G.exit_task(tk, abi.EXIT_CODE_EXPECT_FAILED))
            sub = tk.sub + 1
            if sub < len(accs):
                return self.set_task(s, t, Task(tk.status, tk.pc, sub, tk.loop_ctrs, tk.steps,
                                                tk.token, tk.touched, 0, tk.result, v))
            ntk = Task(TS_RUN, pc + 1, 0, tk.loop_ctrs, tk.steps, 0, tk.touched, 0, 0, v)
            return self._finish_step(s, v, pos, t, ntk)
        if op == abi.OP_EXIT:
            self.emit("task_exit", vcpu=v, task=t, code=ins.arg)
            return self._finish_step(s, v, pos, t, G.exit_task(tk, ins.arg))
        if op == abi.OP_LOOP:
            li = self.loop_index[t][pc]
            ctrs = tk.loop_ctrs
            if ctrs[li] < ins.imm:
                ctrs = put(ctrs, li, ctrs[li] + 1)
                npc = ins.arg
            else:
                ctrs = put(ctrs, li, 0)
                npc = pc + 1
            ntk = Task(TS_RUN, npc, 0, ctrs, tk.steps, 0, tk.touched, 0, 0, v)
            return self._finish_step(s, v, pos, t, ntk)
        if op in (abi.OP_YIELD, abi.OP_SPIN):
            ntk = Task(TS_RUN, pc + 1, 0, tk.loop_ctrs, tk.steps, 0, tk.touched, 0, 0, v)
            return self._finish_step(s, v, pos, t, ntk)
        # OP_INVALID or unknown: the interpreter gives up.
        self.emit("task_exit", vcpu=v, task=t, code=abi.EXIT_CODE_BAD_INSN)
        return self._finish_step(s, v, pos, t, G.exit_task(tk, abi.EXIT_CODE_BAD_INSN))

    def _finish_step(self, s: State, v: int, pos: int, t: int, ntk: Task) -> State:
        """A completed step: count it, fire host events it triggers, yield the vCPU."""
        steps = ntk.steps + 1
        if steps <= self.step_cap:
            ntk = ntk._replace(steps=steps)
        if self.sink is not None:
            self.emit("task_step", vcpu=v, task=t, pc=s.tasks[t].pc, steps=steps)
        n = len(self.by_vcpu[v])
        evs = self.trig.get((t, steps)) if steps <= self.step_cap else None
        if not evs:
            # The common case, in one rebuild: the task and the vCPU's next position.
            vcpus = s.vcpus
            return State(s.files, s.mem, put(vcpus, v, vcpus[v]._replace(cur=(pos + 1) % n)),
                         put(s.tasks, t, ntk), s.guest, s.vmm, s.fired)
        s = self.set_task(s, t, ntk)
        for e in evs:
            if not s.fired >> e & 1:
                s = self._fire(s, e, v)
        return self.set_vcpu(s, v, s.vcpus[v]._replace(cur=(pos + 1) % n))

    def _yield_sleep(self, s: State, v: int, pos: int) -> State:
        n = len(self.by_vcpu[v])
        return self.set_vcpu(s, v, s.vcpus[v]._replace(cur=(pos + 1) % n))

    def _fail(self, s: State, t: int) -> State:
        """The task's access to a bad page failed once more (the first_access label)."""
        tk = s.tasks[t]
        f = min(tk.fails + 1, self.fail_cap)
        if f == tk.fails and tk.touched:
            return s
        return self.set_task(s, t, tk._replace(touched=1, fails=f))

    def _access(self, s: State, v: int, pos: int, t: int, a: Access) -> tuple[int, State]:
        """One guest access: the guest's page tables, then the EPT / KVM MMU fault path."""
        kind = a.kind
        g = a.gidx
        if g < 0:  # anonymous guest RAM: always backed
            if kind == A_WRITE:
                s = s._replace(mem=self._mem_set(s.mem, a.addr, a.wvalue))
            return R_OK, s
        if kind == A_WRITE and not a.writable:
            # Guest PTE read-only: the guest's own #PF -> SIGSEGV.
            tk = s.tasks[t]
            self.emit("guest_sigsegv", vcpu=v, task=t, vaddr=hex(a.vaddr))
            ntk = tk._replace(status=TS_KILLED, result="SIGSEGV SEGV_ACCERR")
            return R_DEAD, self._yield_sleep(self.set_task(s, t, ntk), v, pos)
        if kind == A_WRITE and self.read_only[a.file] and not s.guest.offlined >> g & 1:
            return self._readonly_store(s, v, pos, t, a)
        if s.guest.offlined >> g & 1:
            # Poisoned guest PTE: #PF in the guest (VM_FAULT_HWPOISON), no exit.
            tk = s.tasks[t]._replace(touched=1)
            if kind == A_KREAD:
                ntk = G.exit_task(tk, abi.EXIT_CODE_KREAD_EIO)
                self.emit("guest_kread_eio", vcpu=v, task=t, vaddr=hex(a.vaddr))
                self.emit("task_exit", vcpu=v, task=t, code=abi.EXIT_CODE_KREAD_EIO)
            else:
                ntk = G.kill_sigbus(tk, abi.BUS_MCEERR_AR, a.vaddr)
                self.emit("guest_sigbus", vcpu=v, task=t, code="BUS_MCEERR_AR",
                          vaddr=hex(a.vaddr), why="poisoned PTE")
            return R_DEAD, self._yield_sleep(self.set_task(s, t, ntk), v, pos)
        return self._faultin(s, v, pos, t, a)

    def _faultin(self, s: State, v: int, pos: int, t: int, a: Access) -> tuple[int, State]:
        """The EPT violation on a window page: kvm_mmu_faultin_pfn() /
        __kvm_mmu_faultin_pfn() (arch/x86/kvm/mmu/mmu.c): a FOLL_NOWAIT gup first; if the
        page needs I/O and kvm_can_do_async_pf(), the async path (a repeated fault on a gfn
        already in flight halts the vCPU: KVM_REQ_APF_HALT; else kvm_arch_setup_async_pf),
        otherwise a blocking gup, whose error goes to kvm_handle_error_pfn()."""
        fi = a.file
        pg = a.page
        f = s.files[fi]
        res = H.gup_nowait(f, pg)
        if res == H.GUP_OK:
            return self._complete(s, a, t)
        if res == H.GUP_HWPOISON:
            return R_EXIT, self._error_pfn(s, v, t, a, hwpoison=True)
        # NEEDS_IO: a cold page, or a page beyond EOF (indistinguishable here).
        gfn = a.addr >> abi.PAGE_SHIFT
        user = a.user
        # kvm_can_do_async_pf(): the guest may take an async PF here (kernel mode only
        # with interrupts on, kvm_arch_interrupt_allowed()).
        can_async = self.apf_possible and (user or self.kernel_irqs_on)
        if can_async:
            can_async, s = self.d.kvm_mmu_faultin_pfn(self, s, v, t, gfn)
        if can_async:
            vc = s.vcpus[v]
            if self.sink is not None:
                self.emit("kvm_try_async_get_page", vcpu=v, task=t, gpa=hex(a.addr),
                          gfn=hex(gfn))
            if K.hash_find(vc.apf_hash, gfn, self.hash_size):
                # kvm_find_async_pf_gfn(): already in flight -> KVM_REQ_APF_HALT
                self.emit("kvm_async_pf_repeated_fault", vcpu=v, task=t, gpa=hex(a.addr))
                s = self.set_vcpu(s, v, vc._replace(mode=MODE_HALTED))
                self.emit("kvm_apf_halt", vcpu=v)
                # The same access waiting on the same in-flight async PF: its first try's
                # result is not known yet, so this is no further failed try (with timer
                # interrupts ending the halt, linux-qemu, it may repeat many times).
                if H.cannot_back(f, pg, self.holes_fail) and not s.tasks[t].touched:
                    s = self.set_task(s, t, s.tasks[t]._replace(touched=1))
                return R_RETRY, s
            if len(vc.apf_queue) + len(vc.apf_done) < self.max_queued:
                return self._setup_async(s, v, pos, t, a, gfn, user,
                                         H.cannot_back(f, pg, self.holes_fail))
        # Synchronous: gup without FOLL_NOWAIT.
        res, nf = H.gup_blocking(f, pg, self.holes_fail)
        if nf is not f:
            s = self.set_file(s, fi, nf)
        if res == H.GUP_OK:
            return self._complete(s, a, t)
        return R_EXIT, self._error_pfn(s, v, t, a, hwpoison=res == H.GUP_HWPOISON)

    def _readonly_store(self, s: State, v: int, pos: int, t: int, a: Access
                        ) -> tuple[int, State]:
        """A store to a KVM_MEM_READONLY window: KVM_PFN_ERR_RO_FAULT, which
        kvm_handle_error_pfn() turns into RET_PF_EMULATE; the emulated store has no device
        and exits to userspace as a KVM_EXIT_MMIO write. Not a memory failure: nothing is
        offlined, the page stays readable, the file is unchanged, one exit per store."""
        gpa = a.addr & ~(abi.PAGE_SIZE - 1)
        self.emit("kvm_handle_error_pfn", vcpu=v, task=t, gpa=hex(a.addr),
                  pfn="KVM_PFN_ERR_RO_FAULT")
        if self.params.readonly_store == "mmio-discard":
            # QEMU: memory_access_is_direct() is false for a write to a read-only RAM
            # region; the MMIO dispatch finds no write handler and drops the store.
            self.emit("kvm_exit", vcpu=v, task=t, reason="KVM_EXIT_MMIO", gpa=hex(a.addr),
                      size=8, source="mmio", exit="mmio")
            self.emit("vmm_mmio_write_dropped", vcpu=v, task=t, gpa=hex(a.addr))
            return R_OK, s
        # faultline's VMM: the decision for cause "read-only" refuses the store; the guest
        # sends the writer SIGSEGV SEGV_ACCERR at its address (a store to a read-only file
        # mapping on Linux).
        fi, pg = a.file, a.page
        f = s.files[fi]
        self.emit("kvm_exit", vcpu=v, task=t, reason="KVM_EXIT_MMIO", gpa=hex(a.addr),
                  size=8, source="mmio")
        self.emit("vmm_resolve", vcpu=v, task=t, gpa=hex(a.addr), hva=None,
                  path=self.files[fi].path, offset=pg * abi.PAGE_SIZE + (a.addr - gpa),
                  file_size=f.size, cause="read-only", source="mmio")
        self.emit("guest_sigsegv", vcpu=v, task=t, code="SEGV_ACCERR", vaddr=hex(a.vaddr))
        tk = s.tasks[t]
        ntk = tk._replace(status=TS_SIGSEGV, result=(SEGV_ACCERR, a.vaddr))
        return R_DEAD, self._yield_sleep(self.set_task(s, t, ntk), v, pos)

    def _complete(self, s: State, a: Access, t: int) -> tuple[int, State]:
        f = s.files[a.file]
        if H.cannot_supply(f, a.page):  # never by construction: the property's witness
            s = s._replace(guest=s.guest._replace(bad_reads=s.guest.bad_reads + 1))
        if a.kind == A_WRITE:
            s = s._replace(mem=self._mem_set(s.mem, a.addr, a.wvalue))
        return R_OK, s

    def _setup_async(self, s: State, v: int, pos: int, t: int, a: Access, gfn: int,
                     user: bool, bad: bool) -> tuple[int, State]:
        """kvm_arch_setup_async_pf() + kvm_arch_async_page_not_present()."""
        vc = s.vcpus[v]
        apfid = vc.apf_id
        if self.counter_tokens:
            token, apfid = K.alloc_apf_token(apfid, v)
        else:
            in_use = {x.token for x in vc.apf_queue} | {x.token for x in vc.apf_done}
            token = K.lowest_free_token(in_use, v)
        deliver = self.pv_apf and user  # kvm_can_deliver_async_pf(): send_user_only
        hsh = K.hash_add(vc.apf_hash, gfn, self.hash_size)
        if self.sink is not None:
            self.emit("kvm_async_pf_not_present", vcpu=v, task=t, token=hex(token),
                      gpa=hex(a.addr))
        queue = vc.apf_queue + (ApfWork(token, gfn, deliver),)  # noqa: RUF005
        if deliver:
            # Synthetic #PF with CR2 = token: the guest sleeps the task on the token.
            s = self.set_vcpu(s, v, Vcpu(vc.cur, vc.mode, hsh, queue, vc.apf_done,
                                         vc.requests, vc.design, vc.exit, vc.mce_queue, apfid))
            tk = s.tasks[t]
            fails = min(tk.fails + 1, self.fail_cap) if bad else tk.fails
            s = self.set_task(s, t, Task(TS_SLEEP, tk.pc, tk.sub, tk.loop_ctrs, tk.steps, token,
                                         tk.touched | bad, fails, tk.result, v))
            self.emit("guest_apf_sleep", vcpu=v, task=t, token=hex(token))
            return R_SLEEP, self._yield_sleep(s, v, pos)
        # No PV delivery: the vCPU halts until the page is ready (KVM_REQ_APF_HALT).
        s = self.set_vcpu(s, v, Vcpu(vc.cur, MODE_HALTED, hsh, queue, vc.apf_done,
                                     vc.requests, vc.design, vc.exit, vc.mce_queue, apfid))
        self.emit("kvm_apf_halt", vcpu=v)
        return R_RETRY, self._fail(s, t) if bad else s

    def _error_pfn(self, s: State, v: int, t: int, a: Access, hwpoison: bool) -> State:
        """kvm_handle_error_pfn() (arch/x86/kvm/mmu/mmu.c): KVM_PFN_ERR_HWPOISON ->
        kvm_send_hwpoison_signal() (SIGBUS BUS_MCEERR_AR to the vCPU thread); any other
        error pfn -> the design's exit (Design.kvm_handle_error_pfn)."""
        gpa = a.addr & ~(abi.PAGE_SIZE - 1)
        s = self._fail(s, t)
        kind = EXIT_HWPOISON if hwpoison else self.d.kvm_handle_error_pfn(self, s, v, t, gpa)
        reason = {EXIT_HWPOISON: "SIGBUS BUS_MCEERR_AR", EXIT_MEMORY_FAULT:
                  "KVM_EXIT_MEMORY_FAULT"}.get(kind, "-EFAULT")
        if self.sink is not None:
            self.emit("kvm_handle_error_pfn", vcpu=v, task=t, gpa=hex(a.addr),
                      pfn="KVM_PFN_ERR_HWPOISON" if hwpoison else "KVM_PFN_ERR_FAULT")
            self.emit("kvm_exit", vcpu=v, task=t, reason=reason,
                      gpa=hex(gpa) if kind != EXIT_BARE_EFAULT else None,
                      size=abi.PAGE_SIZE if kind != EXIT_BARE_EFAULT else None,
                      source=EXIT_SOURCES[kind])
        # What the VMM will learn: the exact address if it decodes the instruction (every
        # in-context exit, the bare -EFAULT included; without decoding it scans the windows).
        exit_gpa = a.addr if self.exact_gpa else gpa
        return self.exit_to_userspace(s, v, Exit(kind, exit_gpa, t, 0 if a.user else 1), gpa)

    # --- VMM -----------------------------------------------------------------------------

    def _vmm_exit(self, s: State, v: int) -> State:
        ex = s.vcpus[v].exit
        assert ex  # enabled only in MODE_EXIT
        kind, true_gpa, t = ex.kind, ex.gpa, ex.task
        source = EXIT_SOURCES[kind]
        vmm = s.vmm
        files = s.files
        gpa: int | None
        if kind == EXIT_BARE_EFAULT and self.exact_gpa:
            # A bare -EFAULT comes from the vCPU's own synchronous fault, so it is still in
            # the faulting context: the real VMM decodes the instruction at RIP and
            # translates its operand (faultline.vmm.decode), learning the exact address.
            gpa = true_gpa
        elif kind == EXIT_BARE_EFAULT:
            # Without decoding: the lowest bad window page not yet counted as handled, as
            # the real VMM's fallback (Detector.bare_efault); None: it gives up.
            bad = [(spec.gpa(p0), n) for fi, spec in enumerate(self.files)
                   for p0, n in M.page_runs(H.bad_pages(files[fi], spec.pages,
                                                        self.holes_fail))]
            gpa = P.pick_bare_efault_page(bad, M.Counted(vmm.repeats, self.gpa_gidx,
                                                         self.nvcpus))
        else:
            gpa = true_gpa
        if gpa is None:
            return self._abort(s, "bare -EFAULT from KVM_RUN and no bad page in any file "
                                  "window: cannot resolve")
        page = gpa & ~(abi.PAGE_SIZE - 1)
        g = self.gpa_gidx.get(page, -1)
        if g < 0:
            return self._abort(s, f"memory fault at gpa {gpa:#x} outside every file window")
        fi, pg = self.gidx_page[g]
        spec = self.files[fi]
        f = files[fi]
        cause = H.cause_of(f, pg)
        self.emit("vmm_resolve", vcpu=v, task=t, gpa=hex(gpa), hva=None, path=spec.path,
                  offset=pg * abi.PAGE_SIZE + (gpa - page), file_size=f.size, cause=cause,
                  source=source)
        # policy.count_fault, as the real VMM's Detector.note_handled: per (page, vCPU).
        key = g * self.nvcpus + v
        n, verdict = P.count_fault(sparse_get(vmm.repeats, key), self._in_flight(s, v, g))
        if verdict == P.IN_FLIGHT:
            self.emit("vmm_in_flight", vcpu=v, gpa=hex(gpa))
            return self._resume(s, v)
        if verdict == P.GIVE_UP:
            return self._abort(s, f"gpa {page:#x} faulted {n} times on vCPU {v} after being "
                                  "handled")
        vmm = vmm._replace(repeats=sparse_put(vmm.repeats, key, n))
        s = s._replace(vmm=vmm)
        known = vmm.known[fi]
        win = M.window(spec, f.size, known[0], f.holes)
        d = P.decide(self.policy, gpa, cause, win, in_context=kind != EXIT_REQUEST)
        if isinstance(d, P.Abort):
            # The real VMM handles each vCPU's exit on that vCPU's thread: another vCPU
            # already out with a memory fault has its fault resolved (and logged) too
            # before the VM stops.
            if self.sink is not None:
                for ov, ovc in enumerate(s.vcpus):
                    if ov != v and ovc.mode == MODE_EXIT and ovc.exit \
                            and ovc.exit.kind in (EXIT_MEMORY_FAULT, EXIT_HWPOISON):
                        self._log_resolve(s, ov)
            return self._abort(s, d.reason)
        if isinstance(d, P.InjectMce):
            # SRAR in the faulting context: MCi_ADDR is the faulting address (as exact as the
            # VMM knows it); SRAO: the page.
            mce_gpa = gpa if d.action_required else d.gpa
            if not self.params.mcg_ser_p:
                # kvm_arch_on_sigbus_vcpu() (QEMU target/i386/kvm/kvm.c): without MCG_SER_P
                # in env->mcg_cap nothing is injected. BUS_MCEERR_AR:
                # hardware_memory_error() reports "QEMU got Hardware memory error" and
                # calls exit(1): the QEMU process ends, the VM with it (crashed);
                # BUS_MCEERR_AO: ignored.
                if d.action_required:
                    return self._abort(s, f"QEMU: Hardware memory error at gpa {mce_gpa:#x} "
                                          "(guest CPU without MCG_SER_P): exit(1)", END_CRASHED)
                self.emit("vmm_mce_ignored", vcpu=v, gpa=hex(mce_gpa), mce="SRAO",
                          reason="no MCG_SER_P")
                return self._resume(s, v)
            status, _addr, misc, mcg = P.mce_encoding(mce_gpa, d.action_required,
                                                      self.params.guest_cpu)
            self.emit("vmm_inject_mce", vcpu=v, gpa=hex(mce_gpa), bank=P.MCE_BANK,
                      status=hex(status), mcg_status=hex(mcg), misc=hex(misc),
                      mce="SRAR" if d.action_required else "SRAO")
            vc = s.vcpus[v]
            s = s._replace(vmm=vmm._replace(handled=vmm.handled | (1 << g)))
            if self.qemu_mcip and vc.mce_queue:
                # do_inject_x86_mce() (QEMU target/i386/helper.c): MCG_STATUS.MCIP is still
                # set on this vCPU. A record with MCI_STATUS_AR (an Intel SRAR):
                # qemu_system_reset_request(), the guest is reset (the run stops here);
                # one without (an SRAO; any AMD record, whose encoding has no AR bit):
                # ignored. The reset request (SHUTDOWN_CAUSE_GUEST_RESET) reboots the
                # guest: the QEMU process and the VM live on, the guest's tasks do not.
                if d.action_required and not self.amd:
                    return self._abort(s, f"QEMU: CPU {v}: Previous MCE still in progress, "
                                          "raising triple fault (guest reset)", END_RESET)
                self.emit("vmm_mce_ignored", vcpu=v, gpa=hex(mce_gpa),
                          mce="SRAR" if d.action_required else "SRAO",
                          reason="MCG_STATUS.MCIP set")
                return self._resume(s, v)
            # An SRAR interrupts the context the vCPU exited from; an SRAO needs none.
            mce = (mce_gpa, d.action_required, t if d.action_required else -1)
            s = self.set_vcpu(s, v, vc._replace(mce_queue=(*vc.mce_queue, mce)))
            if d.action_required and self.mce_broadcast:
                s = self._mce_broadcast(s, v)
            return self._resume(s, v)
        if isinstance(d, P.Notify):
            # The first record carries the action-required access (NOTIFY_F_AR) when the
            # vCPU is in the faulting context: the guest spares that task from the
            # early-kill AO and it meets the offlined page itself (AR; a kread fails with
            # -EIO, as the real guest's per-vCPU AR mailbox makes it do before the
            # interrupt). Not for an exit outside the faulting context (whatever task runs).
            ar_task = t if kind != EXIT_REQUEST else -1
            s, vmm = self._notify(s, vmm, d, ar_task, v, g)
            return self._resume(s._replace(vmm=vmm), v)
        return self._resume(s, v)

    def _in_flight(self, s: State, v: int, g: int) -> bool:
        """policy.count_fault's ``in_flight``, as the real VMM's VcpuState.ar_pages: an
        action-required event for page g is queued for vCPU v and the guest has not taken
        it yet (an SRAR in v's #MC queue, or a notification record for v still in the ring
        whose AR access is on page g)."""
        gpa = self.gidx_gpa(g)
        for mce_gpa, ar, _ctx in s.vcpus[v].mce_queue:
            if ar and mce_gpa & ~(abi.PAGE_SIZE - 1) == gpa:
                return True
        return any(r.ar_page == g and r.vcpu == v for r in s.guest.ring)

    def _mce_broadcast(self, s: State, v: int) -> State:
        """QEMU's cpu_x86_inject_mce() with MCE_INJECT_BROADCAST (kvm_mce_inject(): an
        Intel guest CPU that did not enable LMCE): run_on_cpu(do_inject_x86_mce) on every
        other vCPU with bank 1, VAL|UC, MCG_STATUS MCIP|RIPV. That record has no AR bit,
        so do_inject_x86_mce() ignores it on a vCPU whose MCIP is still set."""
        vcpus = s.vcpus
        for u, uc in enumerate(vcpus):
            if u == v:
                continue
            if uc.mce_queue and self.qemu_mcip:
                self.emit("vmm_mce_ignored", vcpu=u, mce="broadcast",
                          reason="MCG_STATUS.MCIP set")
                continue
            self.emit("vmm_inject_mce", vcpu=u, gpa=None, bank=1,
                      status=hex(P.MCI_BROADCAST), mcg_status=hex(P.MCG_BROADCAST),
                      misc="0x0", mce="broadcast")
            vcpus = put(vcpus, u, uc._replace(mce_queue=(*uc.mce_queue,
                                                         (MCE_BROADCAST, False, -1))))
        return s._replace(vcpus=vcpus)

    def _log_resolve(self, s: State, v: int) -> None:
        """vmm_resolve for vCPU v's pending annotated exit (no state change)."""
        ex = s.vcpus[v].exit
        assert ex
        gpa = ex.gpa
        page = gpa & ~(abi.PAGE_SIZE - 1)
        g = self.gpa_gidx.get(page, -1)
        if g < 0:
            return
        fi, pg = self.gidx_page[g]
        f = s.files[fi]
        self.emit("vmm_resolve", vcpu=v, task=ex.task, gpa=hex(gpa), hva=None,
                  path=self.files[fi].path, offset=pg * abi.PAGE_SIZE + (gpa - page),
                  file_size=f.size, cause=H.cause_of(f, pg), source=EXIT_SOURCES[ex.kind])

    def _notify(self, s: State, vmm: Vmm, d: P.Notify, ar_task: int = -1,
                target: int = 0, ar_page: int = -1) -> tuple[State, Vmm]:
        """Post ring records and raise the notification interrupt on vCPU `target`; the
        first record carries ``ar_task``'s access to page ``ar_page`` (gidx), if any."""
        handled = vmm.handled
        ring = s.guest.ring
        for i, (first, n, cause) in enumerate(d.ranges):
            g0 = self.gpa_gidx[first]
            ring += (RingRecord(g0, n, cause, ar_task if i == 0 else -1, target,
                                ar_page if i == 0 and ar_task >= 0 else -1),)
            for g in range(g0, g0 + n):
                handled |= 1 << g
            self.emit("vmm_notify", first_gpa=hex(first), npages=n, cause=cause)
        s = s._replace(guest=s.guest._replace(ring=ring))
        return s, vmm._replace(handled=handled)

    def _resume(self, s: State, v: int) -> State:
        return self.set_vcpu(s, v, s.vcpus[v]._replace(mode=MODE_RUN, exit=()))

    def _abort(self, s: State, reason: str, end: int = END_ABORTED) -> State:
        """The VMM ends the run: END_ABORTED, it stops the VM (faultline's VMM gives up;
        QEMU's kvm_cpu_exec() (accel/kvm/kvm-all.c) on a bare -EFAULT from KVM_RUN: "kvm
        run failed Bad address", then vm_stop(RUN_STATE_INTERNAL_ERROR), the VM stays
        paused); END_CRASHED, the VMM process exits; END_RESET, it resets the guest."""
        self.emit("vmm_abort", reason=reason)
        return s._replace(vmm=s.vmm._replace(abort=reason, end=end))

    def _vmm_file_change(self, s: State, fi: int, v: int = 0) -> State:
        """The proactive policy's file watcher saw a change of a mapped file; its
        notification interrupts vCPU `v` (the one whose step changed the file, when the
        runner waits for the watcher; else vCPU 0)."""
        vmm = s.vmm
        f = s.files[fi]
        spec = self.files[fi]
        old_size, old_holes = vmm.known[fi]
        new_holes = f.holes & ~old_holes
        self.emit("vmm_file_change", file=spec.name, old_size=old_size, new_size=f.size,
                  holes=M.holes_ranges(new_holes))
        # policy.file_change_notify, as the real VMM's watcher (faultline.vmm.watch): the
        # pages bad now, minus those bad at its last look and those already notified.
        g0 = self.gpa_gidx[spec.window_gpa]
        notified = PageRanges((spec.gpa(p0), n) for p0, n in M.page_runs(
            [p for p in range(spec.pages) if vmm.handled >> (g0 + p) & 1]))
        d = P.file_change_notify(M.bad_ranges(spec, f.size, f.holes),
                                 M.bad_ranges(spec, old_size, old_holes), notified,
                                 spec.gpa(-(-f.size // abi.PAGE_SIZE)))
        vmm = vmm._replace(known=put(vmm.known, fi, (f.size, f.holes)))
        if d is not None:
            s, vmm = self._notify(s, vmm, d, -1, v)
        return s._replace(vmm=vmm)
