# ruff: noqa: RUF005  (hot path: explicit tuple concatenation/slicing is the state encoding)
"""The transition system: host mm + KVM (MMU fault path, async PF) + VMM + guest kernel.

``System(scenario, design, policy, **params)``:

- ``init() -> State``
- ``enabled(state) -> list[(name, actor, fn, args)]`` and
  ``actions(state) -> list[(name, next_state)]`` (deterministic, same order every time)
- ``is_done(state)``, ``tasks_finished(state)``, ``vm_aborted(state)``, ``task_fate()``
  and the property labels (``bad_reads``, ``imprecise_kills``, ``exits_per_page``,
  ``failing_accesses``).

A vCPU action is one pass of vcpu_enter_guest(): first whatever is pending at entry
(the request design's exit, kvm_check_async_pf_completion, an #MC or the notification
interrupt for the guest), else one step of the current guest task, which may fault into
the KVM MMU (``__kvm_mmu_faultin_pfn``). Async work completes in separate actions (any
order), the VMM handles exits in separate actions. Host events fire with the task step
that triggers them ("after TASK:STEP").

Designs are differences in that KVM code: see ``_faultin`` (the fault path),
``_apf_ready`` (kvm_arch_async_page_ready/present) and ``_vcpu`` (the request exit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from faultline import abi
from faultline.model import guest as G
from faultline.model import hostmm as H
from faultline.model import kvm as K
from faultline.model import vmm as M
from faultline.model.state import (
    EXIT_BARE_EFAULT,
    EXIT_HWPOISON,
    EXIT_MEMORY_FAULT,
    EXIT_REQUEST,
    EXIT_SOURCES,
    F_CACHED,
    F_HOLES,
    F_SIZE,
    F_ZERO_FROM,
    F_ZEROED,
    FINISHED,
    G_OFFLINED,
    G_RING,
    M_ABORT,
    M_EXITS,
    M_HANDLED,
    M_KNOWN,
    M_REPEATS,
    MODE_EXIT,
    MODE_HALTED,
    MODE_RUN,
    S_FILES,
    S_FIRED,
    S_GUEST,
    S_MEM,
    S_TASKS,
    S_VCPUS,
    S_VMM,
    T_CTRS,
    T_FAILS,
    T_PC,
    T_RESULT,
    T_STATUS,
    T_STEPS,
    T_SUB,
    T_TOUCHED,
    TS_EXITED,
    TS_KILLED,
    TS_RUN,
    TS_SIGBUS,
    TS_SLEEP,
    V_APFID,
    V_CUR,
    V_DONE,
    V_ERR,
    V_EXIT,
    V_HASH,
    V_MCEQ,
    V_MODE,
    V_QUEUE,
    V_REQS,
    sparse_get,
    sparse_inc,
)
from faultline.scenario import DESIGNS, POLICIES, Scenario, file_value
from faultline.vmm import policy as P

State = tuple
# guest component: accesses completed from a page that cannot back them: beyond EOF, a
# hole (never written since it was punched / the file re-extended) or a poisoned page.
# Must stay 0: the fault path never completes such an access (the witness of
# no_fabricated_data; tests/check show the predicate fires on a model that skips it).
G_BADREAD = 2

A_READ, A_WRITE, A_EXEC, A_KREAD = 1, 2, 3, 4
# access tuple: (kind, gidx, file, page, addr, vaddr, expect, wvalue, user, init, writable)
(X_KIND, X_GIDX, X_FILE, X_PAGE, X_ADDR, X_VADDR, X_EXPECT, X_WVAL, X_USER, X_INIT,
 X_WRITABLE) = range(11)

R_OK, R_RETRY, R_SLEEP, R_EXIT, R_DEAD = range(5)

DEFAULT_PARAMS: dict[str, Any] = {
    "cached_at_start": False,  # file pages start outside the page cache (cold DAX window)
    "async_pf_per_vcpu": K.ASYNC_PF_PER_VCPU,  # max queued async work per vCPU
    "hash_size": K.ASYNC_PF_PER_VCPU,  # slots of the outstanding-gfn hash (power of 2)
    "token_alloc": "lowest-free",  # or "counter" (upstream's apf.id++, never 0)
    # kvm_arch_interrupt_allowed() during a kernel-mode (kread) access. faultline's guest
    # enters its syscalls through an interrupt gate (IF=0): False -> synchronous path.
    # True: KVM sets up an async PF with an artificial halt (KVM_REQ_APF_HALT).
    "kernel_irqs_on": False,
    # Upstream also does async PF + artificial halt for a guest that never enabled PV APF
    # (kvm_can_do_async_pf() does not look at the APF MSR). False: a scenario's
    # `vm.apf = false` means no async PF at all (every fault synchronous), as on the kvm
    # backend here.
    "async_without_pv": False,
    "fail_cap": 3,  # T_FAILS saturates here (a label, not a behaviour)
    "exit_cap": 7,  # per-page exit counts saturate here
    "max_repeats": P.MAX_REPEATS,  # exits for an already-handled page before giving up
    # The VMM registers every file window with userfaultfd (MISSING + UFFD_FEATURE_SIGBUS)
    # over tmpfs, as faultline's real VMM does: the host fault on a hole (punched, or the
    # sparse range of a re-extended file) is VM_FAULT_SIGBUS, exactly like a page beyond
    # EOF. False: a hole is allocated on first touch and reads zeros (plain shmem/DAX).
    "uffd_sigbus_holes": True,
    # The VMM decodes the faulting instruction (as the real VMM does for every fault it
    # catches), so it knows the exact byte the access touched, not only the gfn that
    # KVM_EXIT_MEMORY_FAULT names: the fault record and an SRAR's MCi_ADDR carry it, and
    # the guest's SIGBUS address is exact. False: page granularity (the gfn only).
    "vmm_exact_gpa": True,
    # proactive: the VMM's file watcher sees every host change before the guest runs on
    # (the real runner waits for its watcher after each change it makes: _sync_watch).
    # False: the watcher is a separate actor that may be late (races explored).
    "proactive_sync": True,
    # The notification interrupt goes to one vCPU (the faulting one; for proactive, the
    # one whose step changed the file), as the real VMM's KVM_INTERRUPT does; the other
    # vCPUs run on until it is taken (conformance sets this). False: every vCPU takes
    # the pending notification before running anything (the checker's default).
    "notify_one_vcpu": False,
    # Symmetry reduction for the checker: offer ``canonical(state)`` (see _symmetry_groups)
    # when the scenario has interchangeable tasks. Off by default: a canonical state may
    # have its tasks rotated, so action names along a path only replay with canonical
    # states (replay(..., canonical=True)); the checker's matrix turns it on.
    "symmetry": False,
}


class System:
    # Actions of vCPU v (args[0] == v) that read and write only vCPU v, the tasks of vCPU
    # v and the shared components (files, mem, guest, vmm, fired): never another vCPU nor
    # another vCPU's tasks (the guest's memory_failure, which may kill any mapper, runs
    # only in _guest_mce / _guest_notify, which are not listed). The checker memoises
    # these per (action, args, those components) over interned components
    # (check/adapter.py): ~96% of edges are then one dict lookup. The adapter asserts
    # the write side on every memo miss; the read side is what this comment argues.
    VCPU_LOCAL_ACTIONS = frozenset(("_step", "_async_execute", "_apf_ready",
                                    "_request_exit", "_vmm_exit"))

    def __init__(self, scenario: Scenario, design: str, policy: str, **params: Any) -> None:
        if design not in DESIGNS:
            raise ValueError(f"unknown design {design!r} (one of: {', '.join(DESIGNS)})")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r} (one of: {', '.join(POLICIES)})")
        unknown = set(params) - set(DEFAULT_PARAMS)
        if unknown:
            raise ValueError(f"unknown model parameters: {', '.join(sorted(unknown))}")
        self.params = {**DEFAULT_PARAMS, **params}
        p = self.params
        if p["hash_size"] & (p["hash_size"] - 1) or p["hash_size"] < 1:
            raise ValueError("hash_size must be a power of two")
        if p["async_pf_per_vcpu"] > p["hash_size"]:
            raise ValueError("async_pf_per_vcpu must not exceed hash_size")
        self.sc = scenario
        self.design = design
        self.policy = policy
        self.hash_size = p["hash_size"]
        self.max_queued = p["async_pf_per_vcpu"]
        self.counter_tokens = p["token_alloc"] == "counter"
        self.kernel_irqs_on = bool(p["kernel_irqs_on"])
        self.pv_apf = scenario.apf
        self.apf_possible = scenario.apf or bool(p["async_without_pv"])
        self.fail_cap = p["fail_cap"]
        self.exit_cap = p["exit_cap"]
        self.max_repeats = p["max_repeats"]
        self.holes_fail = bool(p["uffd_sigbus_holes"])
        self.exact_gpa = bool(p["vmm_exact_gpa"])
        self.proactive_sync = bool(p["proactive_sync"]) and policy == "proactive"
        self.notify_one_vcpu = bool(p["notify_one_vcpu"])
        self._ev: Callable[..., Any] | None = None

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
        self.by_vcpu: tuple[tuple[int, ...], ...] = tuple(
            tuple(t.index for t in self.tasks if t.vcpu == v) for v in range(scenario.vcpus))
        self.early_kill = tuple(t.early_kill for t in self.tasks)
        self.loop_index: list[dict[int, int]] = []
        self.acc: list[list[tuple]] = []
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
        self._vcpu_actor = tuple(f"vcpu{v}" for v in range(scenario.vcpus))
        self._async_actor = tuple(f"async{v}" for v in range(scenario.vcpus))
        self.file_gidx_mask = [((1 << f.pages) - 1) << self.fbase[i]
                               for i, f in enumerate(self.files)]

        # Symmetry: the explorer canonicalises every state it meets if `canonical` is
        # not None (an instance attribute, so it is absent when there is nothing to gain).
        self.sym_groups = self._symmetry_groups()
        self.canonical: Callable[[State], State] | None = (
            self._canonical if self.sym_groups and p["symmetry"] else None)

    # --- precomputation -------------------------------------------------------------

    def _compile_accesses(self, t, ins) -> tuple:
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
            if m.window is None:
                out.append((kinds[op], -1, -1, -1, addr, vaddr, expect, wval, op != abi.OP_KREAD,
                            0, m.writable))
            else:
                f = self.files[m.window]
                off = m.page * abi.PAGE_SIZE + ins.arg
                out.append((kinds[op], self.gpa_gidx[m.gpa], m.window, m.page, addr, vaddr,
                            expect, wval, op != abi.OP_KREAD, file_value(f, off),
                            m.writable))
        return tuple(out)

    # --- symmetry ---------------------------------------------------------------------

    def _symmetry_groups(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """vCPUs whose tasks are all interchangeable: ((vcpu, task indices), ...).

        The group used is the rotations of such a vCPU's task list (with V_CUR rotated
        along). Why only rotations, and only when *every* task of the vCPU is alike: the
        scheduler is round-robin over list positions (the first runnable task from V_CUR,
        then V_CUR = pos + 1), so a permutation of positions commutes with it only if it
        preserves the cyclic order, i.e. is a rotation; a rotation maps each task to an
        identical one only if all of them are identical.

        Identical: same program, same mappings (same vaddrs and GPAs: the same file pages
        and the same anon RAM), same early_kill; and no host event triggered by one of
        them (a trigger names one task's step count) nor an expectation telling them apart.

        Soundness: let r rotate vCPU v's tasks by k. Every transition treats those tasks
        only through data that r preserves: their programs, access tables (acc),
        mappers (same vaddr for each), early_kill, the scheduler (rotation-invariant as
        above), tokens (per vCPU, unique among its sleeping tasks); task *indices* are
        stored only in V_EXIT (the exiting task) and in ring records (ar_task), which
        canonical() renames with the same map. So s -> s' iff r(s) -> r(s'), with the same
        fairness class (classes name vCPUs, work items and VMM targets, never tasks), and
        every label the checker reads (aborted, bad reads, "some task killed without
        touching a bad page", exits per page, "some task's access failed > N times") is
        the same on s and r(s). The quotient graph (one state per orbit) then has the same
        verdicts for every safety property and for no_hang (fair cycles, deadlocks and
        reachability of done lift and project edge by edge). Not done (not sound as is):
        permuting vCPUs (their fairness classes vcpuN / asyncN / vmm_handle_exit vcpuN
        would be permuted too, and the tokens' vCPU bits with them), and renaming token ids
        (an async work item's fairness class is (vCPU, token, gfn)).
        """
        names_in_triggers = {ev.trigger.task for ev in self.sc.events}
        groups = []
        for v, ts in enumerate(self.by_vcpu):
            if len(ts) < 2:
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
        (with V_CUR) that gives the smallest (task tuples, cur). Task tuples compare
        safely: T_RESULT's type is fixed by T_STATUS, which comes first."""
        tasks = s[S_TASKS]
        vcpus = s[S_VCPUS]
        rename: dict[int, int] | None = None
        for v, ts in self.sym_groups:
            n = len(ts)
            cur = vcpus[v][V_CUR]
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
                tasks = list(tasks)
                vcpus = list(vcpus)
            for p in range(n):
                rename[ts[p]] = ts[(p + bk) % n]
            for i, tk in enumerate(best[0]):
                tasks[ts[i]] = tk
            vc = vcpus[v]
            ex = vc[V_EXIT]
            if ex and ex[2] >= 0:
                ex = ex[:2] + (rename.get(ex[2], ex[2]),) + ex[3:]
            vcpus[v] = (best[1],) + vc[1:V_EXIT] + (ex,) + vc[V_EXIT + 1:]
        if rename is None:
            return s
        guest = s[S_GUEST]
        ring = guest[G_RING]
        if ring:
            ring = tuple(r[:3] + (rename.get(r[3], r[3]),) + r[4:] for r in ring)
            guest = (guest[0], ring) + guest[2:]
        return (s[S_FILES], s[S_MEM], tuple(vcpus), tuple(tasks), guest) + s[S_VMM:]

    # --- state ------------------------------------------------------------------------

    def init(self) -> State:
        cached = bool(self.params["cached_at_start"])
        files = tuple(H.new_file(f.size, f.pages, cached) for f in self.files)
        vcpus = tuple((0, MODE_RUN, (), (), (), 0, -1 if self.design == "request" else (),
                       (), (), 1) for _ in range(self.sc.vcpus))
        tasks = tuple((TS_RUN, 0, 0, (0,) * len(self.loop_index[t.index]), 0, 0, 0, 0, 0)
                      for t in self.tasks)
        guest = (0, (), 0)
        vmm = ("", 0, tuple((f.size, 0) for f in self.files), (), ())
        s = (files, (), vcpus, tasks, guest, vmm, 0)
        for e in self.start_events:
            s = self._fire(s, e)
        return s

    # --- enabled actions ----------------------------------------------------------------

    def enabled(self, s: State, names: bool = True
                ) -> list[tuple[str | None, str, Callable[..., State], tuple]]:
        """Every enabled action: (name, actor, fn, args); next state = fn(s, *args).
        ``names=False``: name is None (cheaper; for exhaustive search)."""
        # (name is None when names=False: the checker's hot path builds no strings)
        out: list[tuple[str | None, str, Callable[..., State], tuple]] = []
        vmm = s[S_VMM]
        if vmm[M_ABORT]:
            return out
        vcpus = s[S_VCPUS]
        tasks = s[S_TASKS]
        ring = s[S_GUEST][G_RING]
        for v, vc in enumerate(vcpus):
            va = self._vcpu_actor[v]  # interned: its hash is computed once (the checker's class)
            mode = vc[V_MODE]
            if mode == MODE_EXIT:
                out.append((f"vmm_handle_exit vcpu{v}", "vmm", self._vmm_exit, (v,)))
                continue
            if vc[V_REQS] & K.REQ_MEMORY_FAULT:
                out.append(((f"vcpu{v} kvm_exit memory_fault (request)" if names else None), va,
                            self._request_exit, (v,)))
            elif vc[V_DONE]:
                out.append((f"vcpu{v} kvm_check_async_pf_completion token={vc[V_DONE][0][0]:#x}"
                            if names else None,
                            va, self._apf_ready, (v,)))
            elif vc[V_MCEQ]:
                out.append(((f"vcpu{v} guest #MC gpa={vc[V_MCEQ][0][0]:#x}" if names else None), va,
                            self._guest_mce, (v,)))
            elif ring and (not self.notify_one_vcpu or any(r[4] == v for r in ring)):
                # The notification interrupt goes to one vCPU (the VMM's KVM_INTERRUPT);
                # the others run on meanwhile, as on real KVM.
                out.append(((f"vcpu{v} guest notify interrupt" if names else None), va,
                            self._guest_notify, (v,)))
            elif mode == MODE_RUN:
                mine = self.by_vcpu[v]
                n = len(mine)
                cur = vc[V_CUR]
                for i in range(n):
                    pos = (cur + i) % n
                    t = mine[pos]
                    if tasks[t][T_STATUS] == TS_RUN:
                        tk = tasks[t]
                        out.append((f"vcpu{v} {self.names[t]}: "
                                    f"{self.tasks[t].program[tk[T_PC]].text}" if names else None,
                                    va, self._step, (v, pos, t)))
                        break
            for item in vc[V_QUEUE]:
                out.append((f"async_pf_execute vcpu{v} token={item[0]:#x}" if names else None,
                            self._async_actor[v],
                            self._async_execute, (v, item)))
        if self.policy == "proactive":
            files = s[S_FILES]
            for fi, known in enumerate(vmm[M_KNOWN]):
                f = files[fi]
                if known[0] != f[F_SIZE] or known[1] != f[F_HOLES]:
                    out.append((f"vmm_file_change {self.files[fi].name}", "vmm",
                                self._vmm_file_change, (fi,)))
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
        return all(tk[T_STATUS] in FINISHED for tk in s[S_TASKS])

    def vm_aborted(self, s: State) -> bool:
        return bool(s[S_VMM][M_ABORT])

    def is_done(self, s: State) -> bool:
        return self.vm_aborted(s) or self.tasks_finished(s)

    def task_fate(self, s: State, t: int) -> tuple:
        """("exited", code) | ("sigbus", si_code name, vaddr) | ("killed", reason) |
        ("running",) | ("sleeping", token)."""
        tk = s[S_TASKS][t]
        st = tk[T_STATUS]
        if st == TS_EXITED:
            return ("exited", tk[T_RESULT])
        if st == TS_SIGBUS:
            code, vaddr = tk[T_RESULT]
            return ("sigbus", abi.SI_CODES.get((abi.SIGBUS, code), str(code)), vaddr)
        if st == TS_KILLED:
            return ("killed", tk[T_RESULT])
        if st == TS_SLEEP:
            return ("sleeping", tk[5])
        return ("running",)

    def bad_reads(self, s: State) -> int:
        """Accesses completed with data from a page that cannot back them (fabricated
        data): a page beyond EOF, a hole never written, or a poisoned page."""
        return s[S_GUEST][G_BADREAD]

    def imprecise_kills(self, s: State) -> list[str]:
        """Tasks killed (SIGBUS / killed) that never touched a bad page."""
        return [self.names[t] for t, tk in enumerate(s[S_TASKS])
                if tk[T_STATUS] in (TS_SIGBUS, TS_KILLED) and not tk[T_TOUCHED]]

    def exits_per_page(self, s: State) -> dict[int, int]:
        """Memory-fault exits to userspace per bad page (GPA; -1: unknown), saturating."""
        out = {}
        for g, n in s[S_VMM][M_EXITS]:
            out[-1 if g < 0 else self.gidx_gpa(g)] = n
        return out

    def failing_accesses(self, s: State) -> dict[str, int]:
        """Tasks whose current access to a bad page has failed (count, saturating): the
        "first failing access" counters; 0 once the access is resolved."""
        return {self.names[t]: tk[T_FAILS] for t, tk in enumerate(s[S_TASKS]) if tk[T_FAILS]}

    def safety_mask(self, s: State, max_tries: int) -> int:
        """The five safety labels at once, read straight from the encoding (the checker
        calls this once per distinct state; the label methods above build names, lists and
        dicts and cost several times more). Bit 0: the VM was stopped (``vm_aborted``);
        bit 1: ``bad_reads`` > 0; bit 2: ``imprecise_kills`` non-empty; bit 3: a page with
        more than one exit (``exits_per_page``); bit 4: a task whose access failed more
        than ``max_tries`` times (``failing_accesses``). tests/check asserts it agrees
        with the label methods on every explored state."""
        vmm = s[S_VMM]
        m = 1 if vmm[M_ABORT] else 0
        if s[S_GUEST][G_BADREAD]:
            m |= 2
        for tk in s[S_TASKS]:
            if tk[T_STATUS] >= TS_SIGBUS and not tk[T_TOUCHED]:  # TS_SIGBUS or TS_KILLED
                m |= 4
            if tk[T_FAILS] > max_tries:
                m |= 16
        for _g, n in vmm[M_EXITS]:
            if n > 1:
                return m | 8
        return m

    def offlined_gpas(self, s: State) -> set[int]:
        mask = s[S_GUEST][G_OFFLINED]
        return {self.gidx_gpa(g) for g in range(self.ngidx) if mask >> g & 1}

    def gidx_gpa(self, g: int) -> int:
        fi, pg = self.gidx_page[g]
        return self.files[fi].gpa(pg)

    def describe(self, s: State) -> dict[str, Any]:
        """A readable view of a state (for counterexamples)."""
        return {
            "files": {f.name: {"size": s[S_FILES][i][F_SIZE],
                               "cached": bin(s[S_FILES][i][F_CACHED])}
                      for i, f in enumerate(self.files)},
            "tasks": {self.names[t]: self.task_fate(s, t) for t in range(len(self.tasks))},
            "vcpus": [{"mode": ("run", "halted", "exit")[vc[V_MODE]],
                       "hash": vc[V_HASH], "queue": vc[V_QUEUE], "done": vc[V_DONE],
                       "exit": vc[V_EXIT], "mceq": vc[V_MCEQ]} for vc in s[S_VCPUS]],
            "offlined": sorted(hex(g) for g in self.offlined_gpas(s)),
            "vmm": {"abort": s[S_VMM][M_ABORT], "exits": s[S_VMM][M_EXITS]},
        }

    # --- helpers ------------------------------------------------------------------------

    def _emit(self, kind: str, vcpu: int | None = None, task: int | None = None,
              **fields: Any) -> None:
        if self._ev is not None:
            self._ev(kind, vcpu=vcpu, task=self.names[task] if task is not None and task >= 0
                     else None, **fields)

    # The top level has 7 components: building it as a display is about twice as fast as
    # slicing and concatenating (no intermediate tuples); these run on most transitions.
    @staticmethod
    def _set_vcpu(s: State, v: int, vc: tuple) -> State:
        vcpus = s[2]  # S_VCPUS
        return (s[0], s[1], vcpus[:v] + (vc,) + vcpus[v + 1:], s[3], s[4], s[5], s[6])

    @staticmethod
    def _set_task(s: State, t: int, tk: tuple) -> State:
        tasks = s[3]  # S_TASKS
        return (s[0], s[1], s[2], tasks[:t] + (tk,) + tasks[t + 1:], s[4], s[5], s[6])

    def _value(self, s: State, a: tuple) -> int:
        addr = a[X_ADDR]
        for k, val in s[S_MEM]:
            if k == addr:
                return val
        if a[X_GIDX] < 0:
            return 0
        f = s[S_FILES][a[X_FILE]]
        off = a[X_PAGE] * abi.PAGE_SIZE + (addr & (abi.PAGE_SIZE - 1))
        if f[F_ZEROED] >> a[X_PAGE] & 1 or off >= f[F_ZERO_FROM]:
            return 0
        return a[X_INIT]

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
        files = s[S_FILES]
        f = files[fi]
        mem = s[S_MEM]
        wlo, whi = spec.window_gpa, spec.window_gpa + spec.window_bytes
        size = ev.size if ev.size is not None else 0  # set for truncate/extend (validated)
        if ev.action == "truncate" and size > f[F_SIZE]:
            nf = H.extend(f, size, spec.pages)  # ftruncate(2) to a larger size grows it
            if self._ev is not None:
                self._emit("host_truncate", file=spec.name, old_size=f[F_SIZE], new_size=size)
        elif ev.action == "truncate":
            nf = H.truncate(f, size, spec.pages)
            mem = tuple(x for x in mem if not (wlo <= x[0] < whi and x[0] - wlo >= size))
            if self._ev is not None:
                self._emit("host_truncate", file=spec.name, old_size=f[F_SIZE], new_size=size)
        elif ev.action == "extend":
            nf = H.extend(f, size, spec.pages)
            if self._ev is not None:
                self._emit("host_extend", file=spec.name, old_size=f[F_SIZE], new_size=nf[F_SIZE])
        elif ev.action == "punch-hole":
            nf = H.punch_hole(f, ev.offset, ev.length, spec.pages)
            lo, hi = wlo + ev.offset, wlo + ev.offset + ev.length
            mem = tuple(x for x in mem if not lo <= x[0] < hi)
            if self._ev is not None:
                self._emit("host_punch_hole", file=spec.name, offset=ev.offset, length=ev.length)
        elif ev.action == "poison":
            nf = H.poison(f, ev.offset, ev.length, spec.pages)
            if self._ev is not None:
                self._emit("host_memory_failure", file=spec.name, offset=ev.offset,
                           length=ev.length)
        else:  # write
            # pwrite(2): a write past EOF extends the file (the gap is sparse); the written
            # page is allocated (no longer a hole).
            f = H.extend(f, ev.offset + 8, spec.pages)
            pg = ev.offset >> abi.PAGE_SHIFT
            bit = 1 << pg if pg < spec.pages else 0
            nf = (f[F_SIZE], f[F_CACHED] | bit, f[F_HOLES] & ~bit) + f[3:]
            mem = self._mem_set(mem, wlo + ev.offset, ev.value)
            if self._ev is not None:
                self._emit("host_write", file=spec.name, offset=ev.offset, value=hex(ev.value))
        files = files[:fi] + (nf,) + files[fi + 1:]
        s = (files, mem) + s[S_VCPUS:S_FIRED] + (s[S_FIRED] | (1 << e),)
        if self.proactive_sync:
            known = s[S_VMM][M_KNOWN][fi]
            if known[0] != nf[F_SIZE] or known[1] != nf[F_HOLES]:
                s = self._vmm_file_change(s, fi, v)
        return s

    # --- vCPU: pending work at entry -------------------------------------------------------

    def _request_exit(self, s: State, v: int) -> State:
        """The request design: KVM_REQ_MEMORY_FAULT at entry -> exit with the snapshot GFN,
        whatever task the vCPU runs."""
        vc = s[S_VCPUS][v]
        gfn = vc[V_ERR]
        gpa = gfn << abi.PAGE_SHIFT
        cur_t = self._current_task(s, v)
        nvc = (vc[V_CUR], MODE_EXIT, vc[V_HASH], vc[V_QUEUE], vc[V_DONE],
               vc[V_REQS] & ~K.REQ_MEMORY_FAULT, -1, (EXIT_REQUEST, gpa, cur_t, 0), vc[V_MCEQ],
               vc[V_APFID])
        if self._ev is not None:
            self._emit("kvm_exit", vcpu=v, task=cur_t, reason="KVM_EXIT_MEMORY_FAULT",
                       gpa=hex(gpa), size=abi.PAGE_SIZE, source="request")
        s = self._set_vcpu(s, v, nvc)
        return self._count_exit(s, gpa)

    def _count_exit(self, s: State, gpa: int) -> State:
        g = self.gpa_gidx.get(gpa & ~(abi.PAGE_SIZE - 1), -1)
        vmm = s[S_VMM]
        vmm = vmm[:M_EXITS] + (sparse_inc(vmm[M_EXITS], g, self.exit_cap),) + vmm[M_EXITS + 1:]
        return s[:S_VMM] + (vmm,) + s[S_VMM + 1:]

    def _current_task(self, s: State, v: int) -> int:
        mine = self.by_vcpu[v]
        if not mine:
            return -1
        t = mine[s[S_VCPUS][v][V_CUR] % len(mine)]
        return t if s[S_TASKS][t][T_STATUS] == TS_RUN else -1

    def _apf_ready(self, s: State, v: int) -> State:
        """kvm_check_async_pf_completion(): one completed item: kvm_arch_async_page_ready()
        (prefetch retry) then kvm_arch_async_page_present() (page-ready to the guest)."""
        vc = s[S_VCPUS][v]
        token, gfn, injected, _ok = vc[V_DONE][0]
        gpa = gfn << abi.PAGE_SHIFT
        g = self.gpa_gidx[gpa]
        fi, pg = self.gidx_page[g]
        files = s[S_FILES]
        # kvm_arch_async_page_ready(): re-run the fault as a prefetch (no async, blocking).
        res, nf = H.gup_blocking(files[fi], pg, self.holes_fail)
        if nf is not files[fi]:
            files = files[:fi] + (nf,) + files[fi + 1:]
            s = (files,) + s[1:]
        err = vc[V_ERR]
        reqs = vc[V_REQS]
        failed = res != H.GUP_OK
        if self._ev is not None:
            self._emit("kvm_arch_async_page_ready", vcpu=v, token=hex(token), gpa=hex(gpa),
                       prefetch="mapped" if not failed else "-EFAULT")
        if failed:
            if self.design == "error-gfn":
                err = K.error_add(err, gfn, self.hash_size)
                if self._ev is not None:
                    self._emit("kvm_add_error_gfn", vcpu=v, gfn=hex(gfn))
            elif self.design == "request":
                if err == -1:
                    err = gfn
                    reqs |= K.REQ_MEMORY_FAULT
                    if self._ev is not None:
                        self._emit("kvm_make_request", vcpu=v, request="KVM_REQ_MEMORY_FAULT",
                                   gfn=hex(gfn))
                else:
                    if self._ev is not None:
                        self._emit("kvm_apf_error_not_recorded", vcpu=v, gfn=hex(gfn),
                                   pending=hex(err))
            else:
                if self._ev is not None:
                    self._emit("kvm_async_pf_error_discarded", vcpu=v, gfn=hex(gfn))
        # kvm_arch_async_page_present()
        if self._ev is not None:
            self._emit("kvm_async_pf_ready", vcpu=v, token=hex(token), gpa=hex(gpa))
        hsh = K.hash_del(vc[V_HASH], gfn, self.hash_size)
        tasks = s[S_TASKS]
        if injected and self.pv_apf:
            tasks, woke = G.wake_token(tasks, self.by_vcpu[v], token)
            if self._ev is not None:
                self._emit("guest_apf_page_ready", vcpu=v, task=woke, token=hex(token),
                           error=failed and self.design == "apf-error-to-guest")
            if woke >= 0:
                if failed and self.design == "apf-error-to-guest":
                    tk = tasks[woke]
                    a = self.acc[woke][tk[T_PC]][tk[T_SUB]]
                    # The page went bad while its async fault was in flight: the woken task
                    # did touch a bad page (its access is the one that failed).
                    tk = tk[:T_TOUCHED] + (1,) + tk[T_TOUCHED + 1:]
                    tasks = (tasks[:woke] + (G.kill_sigbus(tk, abi.BUS_ADRERR, a[X_VADDR]),)
                             + tasks[woke + 1:])
                    if self._ev is not None:
                        self._emit("guest_sigbus", vcpu=v, task=woke, code="BUS_ADRERR",
                                   vaddr=hex(a[X_VADDR]))
        mode = MODE_RUN if vc[V_MODE] == MODE_HALTED else vc[V_MODE]
        nvc = (vc[V_CUR], mode, hsh, vc[V_QUEUE], vc[V_DONE][1:], reqs, err, vc[V_EXIT],
               vc[V_MCEQ], vc[V_APFID])
        s = s[:S_VCPUS] + (s[S_VCPUS][:v] + (nvc,) + s[S_VCPUS][v + 1:], tasks) + s[S_GUEST:]
        return s

    def _async_execute(self, s: State, v: int, item: tuple) -> State:
        """async_pf_execute(): get_user_pages_remote() (result discarded upstream), then
        queue the item as done and kick the vCPU (KVM_REQ_APF_READY)."""
        token, gfn, injected = item
        g = self.gpa_gidx[gfn << abi.PAGE_SHIFT]
        fi, pg = self.gidx_page[g]
        files = s[S_FILES]
        res, nf = H.gup_blocking(files[fi], pg, self.holes_fail)
        if nf is not files[fi]:
            s = (files[:fi] + (nf,) + files[fi + 1:],) + s[1:]
        ok = res == H.GUP_OK
        if self._ev is not None:
            self._emit("kvm_async_pf_completed", vcpu=v, token=hex(token),
                       gpa=hex(gfn << abi.PAGE_SHIFT),
                       result="ok" if ok else
                       ("-EHWPOISON" if res == H.GUP_HWPOISON else "-EFAULT"))
        vc = s[S_VCPUS][v]
        queue = tuple(x for x in vc[V_QUEUE] if x[0] != token)
        done = vc[V_DONE] + ((token, gfn, injected, ok),)
        nvc = (vc[V_CUR], vc[V_MODE], vc[V_HASH], queue, done,
               vc[V_REQS] | K.REQ_APF_READY, vc[V_ERR], vc[V_EXIT], vc[V_MCEQ], vc[V_APFID])
        return self._set_vcpu(s, v, nvc)

    def _guest_mce(self, s: State, v: int) -> State:
        """The guest's #MC handler for an injected machine check (one per entry: never
        while MCG_STATUS.MCIP is set)."""
        vc = s[S_VCPUS][v]
        (gpa, ar), rest = vc[V_MCEQ][0], vc[V_MCEQ][1:]
        s = self._set_vcpu(s, v, vc[:V_MCEQ] + (rest,) + vc[V_MCEQ + 1:])
        page = gpa & ~(abi.PAGE_SIZE - 1)
        g = self.gpa_gidx.get(page, -1)
        t = self._current_task(s, v)
        status, addr, misc, mcg = P.mce_encoding(gpa, ar)
        if self._ev is not None:
            self._emit("guest_mce", vcpu=v, task=t, mcg_status=hex(mcg), status=hex(status),
                       addr=hex(addr), misc=hex(misc), mce="SRAR" if ar else "SRAO")
        if g < 0:
            return s
        tasks = s[S_TASKS]
        spare = -1
        kread_eio = -1
        if ar:
            if t < 0:
                reason = "guest panic: SRAR #MC with no user context (kernel/idle)"
                if self._ev is not None:
                    self._emit("guest_panic", vcpu=v, reason=reason)
                vmm = s[S_VMM]
                return s[:S_VMM] + ((reason,) + vmm[1:],) + s[S_VMM + 1:]
            vaddr = next((va for tt, va in self.mappers[g] if tt == t), None)
            if vaddr is not None:
                vaddr += gpa - page  # the guest's task_vaddr_of_gpa(): MCi_ADDR's offset
                tk = tasks[t]
                a = self.acc[t][tk[T_PC]]
                if a and a[0][X_KIND] == A_KREAD:
                    # copy_mc-style fixup: the kernel read returns -EIO and the task exits,
                    # after memory_failure, which runs with no task to spare: an early-kill
                    # reader gets BUS_MCEERR_AO first (the guest's memory_failure(pfn, AR,
                    # -1); Linux's kill_me_never).
                    kread_eio = t
                    t_spare = -1
                else:
                    tasks = (tasks[:t] + (G.kill_sigbus(tk, abi.BUS_MCEERR_AR, vaddr),)
                             + tasks[t + 1:])
                    if self._ev is not None:
                        self._emit("guest_sigbus", vcpu=v, task=t, code="BUS_MCEERR_AR",
                                   vaddr=hex(vaddr))
                    t_spare = t
                spare = t_spare
        guest, tasks, killed = G.memory_failure(s[S_GUEST], tasks, g, self.mappers[g],
                                                self.early_kill, spare)
        if self._ev is not None:
            self._emit("guest_memory_failure", vcpu=v, gpa=hex(page),
                       flags="MF_ACTION_REQUIRED" if ar else "0")
        for kt, va in killed:
            if self._ev is not None:
                self._emit("guest_sigbus", vcpu=v, task=kt, code="BUS_MCEERR_AO", vaddr=hex(va))
        if kread_eio >= 0 and tasks[kread_eio][T_STATUS] == TS_RUN:
            tk = tasks[kread_eio]
            tasks = (tasks[:kread_eio] + (G.exit_task(tk, abi.EXIT_CODE_KREAD_EIO),)
                     + tasks[kread_eio + 1:])
            if self._ev is not None:
                self._emit("guest_kread_eio", vcpu=v, task=kread_eio, gpa=hex(gpa))
                self._emit("task_exit", vcpu=v, task=kread_eio, code=abi.EXIT_CODE_KREAD_EIO)
        return s[:S_TASKS] + (tasks, guest) + s[S_GUEST + 1:]

    def _guest_notify(self, s: State, v: int) -> State:
        """The notification interrupt: drain the ring, offline every page it names."""
        guest = s[S_GUEST]
        tasks = s[S_TASKS]
        ring = guest[G_RING]
        guest = (guest[G_OFFLINED], ()) + guest[G_RING + 1:]
        if self._ev is not None:
            self._emit("guest_notify", vcpu=v, records=len(ring))
        for first, n, cause, ar_task, _target in ring:
            for g in range(first, first + n):
                guest, tasks, killed = G.memory_failure(guest, tasks, g, self.mappers[g],
                                                        self.early_kill, ar_task)
                if self._ev is not None:
                    self._emit("guest_memory_failure", vcpu=v, gpa=hex(self.gidx_gpa(g)),
                               flags="0", cause=cause)
                for kt, va in killed:
                    if self._ev is not None:
                        self._emit("guest_sigbus", vcpu=v, task=kt, code="BUS_MCEERR_AO",
                                   vaddr=hex(va))
        return s[:S_TASKS] + (tasks, guest) + s[S_GUEST + 1:]

    # --- vCPU: a guest task step ---------------------------------------------------------

    def _step(self, s: State, v: int, pos: int, t: int) -> State:
        vc = s[S_VCPUS][v]
        if vc[V_CUR] != pos:  # the scheduler picked the next runnable task
            s = self._set_vcpu(s, v, (pos,) + vc[1:])
        tk = s[S_TASKS][t]
        pc = tk[T_PC]
        ins = self.tasks[t].program[pc]
        op = ins.op
        accs = self.acc[t][pc]
        if accs:
            a = accs[tk[T_SUB]]
            r, s = self._access(s, v, pos, t, a)
            if r != R_OK:
                return s
            tk = s[S_TASKS][t]
            if a[X_KIND] in (A_READ, A_KREAD, A_EXEC):
                value = self._value(s, a)
                if self._ev is not None:
                    self._emit("task_value", vcpu=v, task=t, vaddr=hex(a[X_VADDR]),
                               value=hex(value),
                               gpa=hex(a[X_ADDR]))
                if a[X_EXPECT] is not None and value != a[X_EXPECT]:
                    if self._ev is not None:
                        self._emit("task_exit", vcpu=v, task=t, code=abi.EXIT_CODE_EXPECT_FAILED,
                                   expected=hex(a[X_EXPECT]))
                    return self._finish_step(s, v, pos, t,
                                             G.exit_task(tk, abi.EXIT_CODE_EXPECT_FAILED))
            sub = tk[T_SUB] + 1
            if sub < len(accs):
                ntk = tk[:T_SUB] + (sub,) + tk[T_SUB + 1:T_FAILS] + (0, tk[T_RESULT])
                return self._set_task(s, t, ntk)
            ntk = (TS_RUN, pc + 1, 0, tk[T_CTRS], tk[T_STEPS], 0, tk[T_TOUCHED], 0, 0)
            return self._finish_step(s, v, pos, t, ntk)
        if op == abi.OP_EXIT:
            if self._ev is not None:
                self._emit("task_exit", vcpu=v, task=t, code=ins.arg)
            return self._finish_step(s, v, pos, t, G.exit_task(tk, ins.arg))
        if op == abi.OP_LOOP:
            li = self.loop_index[t][pc]
            ctrs = tk[T_CTRS]
            if ctrs[li] < ins.imm:
                ctrs = ctrs[:li] + (ctrs[li] + 1,) + ctrs[li + 1:]
                npc = ins.arg
            else:
                ctrs = ctrs[:li] + (0,) + ctrs[li + 1:]
                npc = pc + 1
            ntk = (TS_RUN, npc, 0, ctrs, tk[T_STEPS], 0, tk[T_TOUCHED], 0, 0)
            return self._finish_step(s, v, pos, t, ntk)
        if op in (abi.OP_YIELD, abi.OP_SPIN):
            ntk = (TS_RUN, pc + 1, 0, tk[T_CTRS], tk[T_STEPS], 0, tk[T_TOUCHED], 0, 0)
            return self._finish_step(s, v, pos, t, ntk)
        # OP_INVALID or unknown: the interpreter gives up.
        if self._ev is not None:
            self._emit("task_exit", vcpu=v, task=t, code=abi.EXIT_CODE_BAD_INSN)
        return self._finish_step(s, v, pos, t, G.exit_task(tk, abi.EXIT_CODE_BAD_INSN))

    def _finish_step(self, s: State, v: int, pos: int, t: int, ntk: tuple) -> State:
        """A completed step: count it, fire host events it triggers, yield the vCPU."""
        steps = ntk[T_STEPS] + 1
        if steps <= self.step_cap:
            ntk = ntk[:T_STEPS] + (steps,) + ntk[T_STEPS + 1:]
        if self._ev is not None:
            self._emit("task_step", vcpu=v, task=t, pc=s[S_TASKS][t][T_PC], steps=steps)
        n = len(self.by_vcpu[v])
        evs = self.trig.get((t, steps)) if steps <= self.step_cap else None
        if not evs:
            # The common case, in one rebuild: the task and the vCPU's next position.
            tasks = s[3]
            vcpus = s[2]
            vc = vcpus[v]
            return (s[0], s[1], vcpus[:v] + (((pos + 1) % n,) + vc[1:],) + vcpus[v + 1:],
                    tasks[:t] + (ntk,) + tasks[t + 1:], s[4], s[5], s[6])
        s = self._set_task(s, t, ntk)
        for e in evs:
            if not s[S_FIRED] >> e & 1:
                s = self._fire(s, e, v)
        vc = s[S_VCPUS][v]
        return self._set_vcpu(s, v, ((pos + 1) % n,) + vc[1:])

    def _yield_sleep(self, s: State, v: int, pos: int) -> State:
        vc = s[S_VCPUS][v]
        n = len(self.by_vcpu[v])
        return self._set_vcpu(s, v, ((pos + 1) % n,) + vc[1:])

    def _fail(self, s: State, t: int) -> State:
        tk = s[S_TASKS][t]
        f = min(tk[T_FAILS] + 1, self.fail_cap)
        if f == tk[T_FAILS] and tk[T_TOUCHED]:
            return s
        return self._set_task(s, t, tk[:T_TOUCHED] + (1, f, tk[T_RESULT]))

    def _access(self, s: State, v: int, pos: int, t: int, a: tuple) -> tuple[int, State]:
        """One guest access: the guest's page tables, then the EPT / KVM MMU fault path."""
        kind = a[X_KIND]
        g = a[X_GIDX]
        if g < 0:  # anonymous guest RAM: always backed
            if kind == A_WRITE:
                s = s[:S_MEM] + (self._mem_set(s[S_MEM], a[X_ADDR], a[X_WVAL]),) + s[S_MEM + 1:]
            return R_OK, s
        if kind == A_WRITE and not a[X_WRITABLE]:
            # Guest PTE read-only: the guest's own #PF -> SIGSEGV.
            tk = s[S_TASKS][t]
            if self._ev is not None:
                self._emit("guest_sigsegv", vcpu=v, task=t, vaddr=hex(a[X_VADDR]))
            ntk = (TS_KILLED,) + tk[1:T_RESULT] + ("SIGSEGV SEGV_ACCERR",)
            return R_DEAD, self._yield_sleep(self._set_task(s, t, ntk), v, pos)
        if s[S_GUEST][G_OFFLINED] >> g & 1:
            # Poisoned guest PTE: #PF in the guest (VM_FAULT_HWPOISON), no exit.
            tk = s[S_TASKS][t]
            tk = tk[:T_TOUCHED] + (1,) + tk[T_TOUCHED + 1:]
            if kind == A_KREAD:
                ntk = G.exit_task(tk, abi.EXIT_CODE_KREAD_EIO)
                if self._ev is not None:
                    self._emit("guest_kread_eio", vcpu=v, task=t, vaddr=hex(a[X_VADDR]))
                if self._ev is not None:
                    self._emit("task_exit", vcpu=v, task=t, code=abi.EXIT_CODE_KREAD_EIO)
            else:
                ntk = G.kill_sigbus(tk, abi.BUS_MCEERR_AR, a[X_VADDR])
                if self._ev is not None:
                    self._emit("guest_sigbus", vcpu=v, task=t, code="BUS_MCEERR_AR",
                               vaddr=hex(a[X_VADDR]), why="poisoned PTE")
            return R_DEAD, self._yield_sleep(self._set_task(s, t, ntk), v, pos)
        fi = a[X_FILE]
        pg = a[X_PAGE]
        f = s[S_FILES][fi]
        res = H.gup_nowait(f, pg)
        if res == H.GUP_OK:
            return self._complete(s, a, t)
        if res == H.GUP_HWPOISON:
            return R_EXIT, self._error_pfn(s, v, t, a, hwpoison=True)
        # NEEDS_IO: a cold page, or a page beyond EOF (indistinguishable here).
        gfn = (a[X_ADDR] >> abi.PAGE_SHIFT)
        vc = s[S_VCPUS][v]
        user = a[X_USER]
        can_async = self.apf_possible and (user or self.kernel_irqs_on)
        if can_async and self.design == "error-gfn" and vc[V_ERR]:
            found, err = K.error_find_and_remove(vc[V_ERR], gfn, self.hash_size)
            if found:
                if self._ev is not None:
                    self._emit("kvm_find_and_remove_error_gfn", vcpu=v, task=t, gfn=hex(gfn))
                vc = vc[:V_ERR] + (err,) + vc[V_ERR + 1:]
                s = self._set_vcpu(s, v, vc)
                can_async = False
        if can_async:
            if self._ev is not None:
                self._emit("kvm_try_async_get_page", vcpu=v, task=t, gpa=hex(a[X_ADDR]),
                           gfn=hex(gfn))
            if K.hash_find(vc[V_HASH], gfn, self.hash_size):
                if self._ev is not None:
                    self._emit("kvm_async_pf_repeated_fault", vcpu=v, task=t, gpa=hex(a[X_ADDR]))
                s = self._set_vcpu(s, v, vc[:V_MODE] + (MODE_HALTED,) + vc[V_MODE + 1:])
                if self._ev is not None:
                    self._emit("kvm_apf_halt", vcpu=v)
                return (R_RETRY, self._fail(s, t) if H.cannot_back(f, pg, self.holes_fail)
                        else s)
            if len(vc[V_QUEUE]) + len(vc[V_DONE]) < self.max_queued:
                return self._setup_async(s, v, pos, t, a, gfn, user,
                                         H.cannot_back(f, pg, self.holes_fail))
        # Synchronous: gup without FOLL_NOWAIT.
        res, nf = H.gup_blocking(f, pg, self.holes_fail)
        if nf is not f:
            files = s[S_FILES]
            s = (files[:fi] + (nf,) + files[fi + 1:],) + s[1:]
        if res == H.GUP_OK:
            return self._complete(s, a, t)
        return R_EXIT, self._error_pfn(s, v, t, a, hwpoison=res == H.GUP_HWPOISON)

    def _complete(self, s: State, a: tuple, t: int) -> tuple[int, State]:
        f = s[S_FILES][a[X_FILE]]
        if H.cannot_supply(f, a[X_PAGE]):  # never by construction: the property's witness
            guest = s[S_GUEST]
            s = s[:S_GUEST] + (guest[:G_BADREAD] + (guest[G_BADREAD] + 1,),) + s[S_GUEST + 1:]
        if a[X_KIND] == A_WRITE:
            s = s[:S_MEM] + (self._mem_set(s[S_MEM], a[X_ADDR], a[X_WVAL]),) + s[S_MEM + 1:]
        return R_OK, s

    def _setup_async(self, s: State, v: int, pos: int, t: int, a: tuple, gfn: int,
                     user: bool, bad: bool) -> tuple[int, State]:
        """kvm_arch_setup_async_pf() + kvm_arch_async_page_not_present()."""
        vc = s[S_VCPUS][v]
        apfid = vc[V_APFID]
        if self.counter_tokens:
            token, apfid = K.alloc_apf_token(apfid, v)
        else:
            in_use = {x[0] for x in vc[V_QUEUE]} | {x[0] for x in vc[V_DONE]}
            token = K.lowest_free_token(in_use, v)
        deliver = self.pv_apf and user  # kvm_can_deliver_async_pf(): send_user_only
        hsh = K.hash_add(vc[V_HASH], gfn, self.hash_size)
        if self._ev is not None:
            self._emit("kvm_async_pf_not_present", vcpu=v, task=t, token=hex(token),
                       gpa=hex(a[X_ADDR]))
        queue = vc[V_QUEUE] + ((token, gfn, deliver),)
        if deliver:
            # Synthetic #PF with CR2 = token: the guest sleeps the task on the token.
            nvc = (vc[V_CUR], vc[V_MODE], hsh, queue, vc[V_DONE], vc[V_REQS], vc[V_ERR],
                   vc[V_EXIT], vc[V_MCEQ], apfid)
            s = self._set_vcpu(s, v, nvc)
            tk = s[S_TASKS][t]
            fails = min(tk[T_FAILS] + 1, self.fail_cap) if bad else tk[T_FAILS]
            ntk = (TS_SLEEP, tk[T_PC], tk[T_SUB], tk[T_CTRS], tk[T_STEPS], token,
                   tk[T_TOUCHED] | bad, fails, tk[T_RESULT])
            s = self._set_task(s, t, ntk)
            if self._ev is not None:
                self._emit("guest_apf_sleep", vcpu=v, task=t, token=hex(token))
            return R_SLEEP, self._yield_sleep(s, v, pos)
        nvc = (vc[V_CUR], MODE_HALTED, hsh, queue, vc[V_DONE], vc[V_REQS], vc[V_ERR],
               vc[V_EXIT], vc[V_MCEQ], apfid)
        if self._ev is not None:
            self._emit("kvm_apf_halt", vcpu=v)
        s = self._set_vcpu(s, v, nvc)
        return R_RETRY, self._fail(s, t) if bad else s

    def _error_pfn(self, s: State, v: int, t: int, a: tuple, hwpoison: bool) -> State:
        """kvm_handle_error_pfn(): HWPOISON -> SIGBUS to the vCPU thread; else -EFAULT
        (annotated with KVM_EXIT_MEMORY_FAULT only in the memory-fault-exit design)."""
        gpa = a[X_ADDR] & ~(abi.PAGE_SIZE - 1)
        s = self._fail(s, t)
        if hwpoison:
            kind, reason = EXIT_HWPOISON, "SIGBUS BUS_MCEERR_AR"
        elif self.design == "memory-fault-exit":
            kind, reason = EXIT_MEMORY_FAULT, "KVM_EXIT_MEMORY_FAULT"
        else:
            kind, reason = EXIT_BARE_EFAULT, "-EFAULT"
        if self._ev is not None:
            self._emit("kvm_handle_error_pfn", vcpu=v, task=t, gpa=hex(a[X_ADDR]),
                       pfn="KVM_PFN_ERR_HWPOISON" if hwpoison else "KVM_PFN_ERR_FAULT")
        if self._ev is not None:
            self._emit("kvm_exit", vcpu=v, task=t, reason=reason,
                       gpa=hex(gpa) if kind != EXIT_BARE_EFAULT else None,
                       size=abi.PAGE_SIZE if kind != EXIT_BARE_EFAULT else None,
                       source=EXIT_SOURCES[kind])
        vc = s[S_VCPUS][v]
        # What the VMM will learn: the exact address if it decodes the instruction (every
        # in-context exit, the bare -EFAULT included; without decoding it scans the windows).
        exit_gpa = a[X_ADDR] if self.exact_gpa else gpa
        nvc = (vc[V_CUR], MODE_EXIT) + vc[V_MODE + 1:V_EXIT] + (
            (kind, exit_gpa, t, 0 if a[X_USER] else 1),) + vc[V_EXIT + 1:]
        s = self._set_vcpu(s, v, nvc)
        return self._count_exit(s, gpa)

    # --- VMM -----------------------------------------------------------------------------

    def _vmm_exit(self, s: State, v: int) -> State:
        vc = s[S_VCPUS][v]
        kind, true_gpa, t, _kern = vc[V_EXIT]
        source = EXIT_SOURCES[kind]
        vmm = s[S_VMM]
        handled = vmm[M_HANDLED]
        files = s[S_FILES]
        if kind == EXIT_BARE_EFAULT and self.exact_gpa:
            # A bare -EFAULT comes from the vCPU's own synchronous fault, so it is still in
            # the faulting context: the real VMM decodes the instruction at RIP and
            # translates its operand (faultline.vmm.decode), learning the exact address.
            gpa = true_gpa
        elif kind == EXIT_BARE_EFAULT:
            # Without decoding: recover by scanning the windows, as the VMM's fallback does.
            bad: list[int] = []
            for fi, spec in enumerate(self.files):
                pages = H.bad_pages(files[fi], spec.pages, self.holes_fail)
                bad.extend(spec.gpa(p) for p in pages)
            handled_gpas = {self.gidx_gpa(g) for g in range(self.ngidx) if handled >> g & 1}
            gpa = M.recover_bare_efault_gpa(bad, handled_gpas)
            if gpa is None and bad:
                # Every bad page is handled already: take it as the same fault again (the
                # repeat guard below bounds it). The VMM never learns true_gpa here.
                gpa = min(bad)
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
        if self._ev is not None:
            self._emit("vmm_resolve", vcpu=v, task=t, gpa=hex(gpa), hva=None, path=spec.path,
                       offset=pg * abi.PAGE_SIZE + (gpa - page), file_size=f[F_SIZE], cause=cause,
                       source=source)
        if handled >> g & 1:
            reps = sparse_inc(vmm[M_REPEATS], g, self.max_repeats + 1)
            if sparse_get(reps, g) > self.max_repeats:
                return self._abort(s, f"gpa {gpa:#x}: the same memory fault keeps coming back")
            if self._ev is not None:
                self._emit("vmm_repeated_fault", vcpu=v, gpa=hex(gpa), count=sparse_get(reps, g))
            vmm = vmm[:M_REPEATS] + (reps,)
            return self._resume(s[:S_VMM] + (vmm,) + s[S_VMM + 1:], v)
        known = vmm[M_KNOWN][fi]
        win = M.window(spec, f[F_SIZE], known[0], f[F_HOLES])
        d = P.decide(self.policy, gpa, cause, win, in_context=kind != EXIT_REQUEST)
        if isinstance(d, P.Abort):
            # The real VMM handles each vCPU's exit on that vCPU's thread: another vCPU
            # already out with a memory fault has its fault resolved (and logged) too
            # before the VM stops.
            if self._ev is not None:
                for ov, ovc in enumerate(s[S_VCPUS]):
                    if ov != v and ovc[V_MODE] == MODE_EXIT and ovc[V_EXIT] \
                            and ovc[V_EXIT][0] in (EXIT_MEMORY_FAULT, EXIT_HWPOISON):
                        self._log_resolve(s, ov)
            return self._abort(s, d.reason)
        if isinstance(d, P.InjectMce):
            # SRAR in the faulting context: MCi_ADDR is the faulting address (as exact as the
            # VMM knows it); SRAO: the page.
            mce_gpa = gpa if d.action_required else d.gpa
            status, _addr, misc, mcg = P.mce_encoding(mce_gpa, d.action_required)
            if self._ev is not None:
                self._emit("vmm_inject_mce", vcpu=v, gpa=hex(mce_gpa), bank=P.MCE_BANK,
                           status=hex(status), mcg_status=hex(mcg), misc=hex(misc),
                           mce="SRAR" if d.action_required else "SRAO")
            vmm = vmm[:M_HANDLED] + (handled | (1 << g),) + vmm[M_HANDLED + 1:]
            vc = s[S_VCPUS][v]
            s = self._set_vcpu(s, v, vc[:V_MCEQ] + (vc[V_MCEQ] + ((mce_gpa, d.action_required),),)
                               + vc[V_MCEQ + 1:])
            return self._resume(s[:S_VMM] + (vmm,) + s[S_VMM + 1:], v)
        if isinstance(d, P.Notify):
            # The first record carries the action-required access (NOTIFY_F_AR) when the
            # vCPU is in the faulting context: the guest spares that task from the
            # early-kill AO and it meets the offlined page itself (AR; a kread fails with
            # -EIO, as the real guest's per-vCPU AR mailbox makes it do before the
            # interrupt). Not for the request design's exit (whatever task runs).
            ar_task = t if kind != EXIT_REQUEST else -1
            s, vmm = self._notify(s, vmm, d, ar_task, v)
            return self._resume(s[:S_VMM] + (vmm,) + s[S_VMM + 1:], v)
        return self._resume(s, v)

    def _log_resolve(self, s: State, v: int) -> None:
        """vmm_resolve for vCPU v's pending annotated exit (no state change)."""
        kind, gpa, t, _kern = s[S_VCPUS][v][V_EXIT]
        page = gpa & ~(abi.PAGE_SIZE - 1)
        g = self.gpa_gidx.get(page, -1)
        if g < 0:
            return
        fi, pg = self.gidx_page[g]
        f = s[S_FILES][fi]
        self._emit("vmm_resolve", vcpu=v, task=t, gpa=hex(gpa), hva=None,
                   path=self.files[fi].path, offset=pg * abi.PAGE_SIZE + (gpa - page),
                   file_size=f[F_SIZE], cause=H.cause_of(f, pg), source=EXIT_SOURCES[kind])

    def _notify(self, s: State, vmm: tuple, d: P.Notify, ar_task: int = -1,
                target: int = 0) -> tuple[State, tuple]:
        """Post ring records and raise the notification interrupt on vCPU `target`."""
        handled = vmm[M_HANDLED]
        ring = s[S_GUEST][G_RING]
        for i, (first, n, cause) in enumerate(d.ranges):
            g0 = self.gpa_gidx[first]
            ring += ((g0, n, cause, ar_task if i == 0 else -1, target),)
            for g in range(g0, g0 + n):
                handled |= 1 << g
            if self._ev is not None:
                self._emit("vmm_notify", first_gpa=hex(first), npages=n, cause=cause)
        guest = s[S_GUEST]
        s = s[:S_GUEST] + ((guest[0], ring) + guest[2:],) + s[S_GUEST + 1:]
        return s, vmm[:M_HANDLED] + (handled,) + vmm[M_HANDLED + 1:]

    def _resume(self, s: State, v: int) -> State:
        vc = s[S_VCPUS][v]
        return self._set_vcpu(s, v, (vc[V_CUR], MODE_RUN) + vc[V_MODE + 1:V_EXIT] + ((),)
                              + vc[V_EXIT + 1:])

    def _abort(self, s: State, reason: str) -> State:
        if self._ev is not None:
            self._emit("vmm_abort", reason=reason)
        vmm = s[S_VMM]
        return s[:S_VMM] + ((reason,) + vmm[1:],) + s[S_VMM + 1:]

    def _vmm_file_change(self, s: State, fi: int, v: int = 0) -> State:
        """The proactive policy's file watcher saw a change of a mapped file; its
        notification interrupts vCPU `v` (the one whose step changed the file, when the
        runner waits for the watcher; else vCPU 0)."""
        vmm = s[S_VMM]
        f = s[S_FILES][fi]
        spec = self.files[fi]
        old_size, old_holes = vmm[M_KNOWN][fi]
        new_holes = f[F_HOLES] & ~old_holes
        if self._ev is not None:
            self._emit("vmm_file_change", file=spec.name, old_size=old_size, new_size=f[F_SIZE],
                       holes=M.holes_ranges(new_holes))
        d = P.on_file_change(spec.window_gpa, spec.window_bytes, old_size, f[F_SIZE],
                             M.holes_ranges(new_holes))
        known = vmm[M_KNOWN][:fi] + ((f[F_SIZE], f[F_HOLES]),) + vmm[M_KNOWN][fi + 1:]
        vmm = vmm[:M_KNOWN] + (known,) + vmm[M_KNOWN + 1:]
        if d is not None:
            s, vmm = self._notify(s, vmm, d, -1, v)
        return s[:S_VMM] + (vmm,) + s[S_VMM + 1:]
