"""The memo footprint (System.memo_footprint: a vCPU's actions read and write only that
vCPU, its tasks and the shared records) is checked, not argued: a design that writes
another vCPU is caught on the memo miss; one that reads another vCPU is caught by the
debug check (FAULTLINE_CHECK_MEMO=1 / check_memo=True), which re-runs the model on every
memoised expansion."""

from __future__ import annotations

import pytest

from faultline.check.adapter import MemoContractError
from faultline.check.properties import check_system
from faultline.model import System
from faultline.model.design import Design
from faultline.model.designs import SHIPPED, get_design
from faultline.model.state import ApfDone, State
from faultline.scenario import load
from tests.conftest import SCENARIOS

STANDARD = SCENARIOS / "check-standard.toml"


class WritesOtherVcpu(Design):
    """Breaks the contract on the write side: page-ready on vCPU v halts the other vCPU."""
    name = "writes-other-vcpu"

    def kvm_arch_async_page_ready(self, m: System, s: State, v: int, work: ApfDone,
                                  failed: bool) -> State:
        o = 1 - v
        return m.set_vcpu(s, o, s.vcpus[o]._replace(requests=s.vcpus[o].requests | 4))


class ReadsOtherVcpu(Design):
    """Breaks it on the read side: vCPU v's fault goes async only while the other vCPU
    has no async work queued (its result depends on a record outside v's footprint)."""
    name = "reads-other-vcpu"

    def kvm_mmu_faultin_pfn(self, m: System, s: State, v: int, t: int, gfn: int
                            ) -> tuple[bool, State]:
        return not s.vcpus[1 - v].apf_queue, s


def test_writing_outside_the_footprint_is_caught_on_a_miss() -> None:
    sc = load(STANDARD)
    with pytest.raises(MemoContractError, match=r"_apf_ready of vCPU \d changed vcpus"):
        check_system(System(sc, WritesOtherVcpu(), "mce"), check_memo=False)


def test_reading_outside_the_footprint_is_caught_by_the_debug_check() -> None:
    sc = load(STANDARD)
    # Without the debug check the memo silently reuses a wrong successor...
    check_system(System(sc, ReadsOtherVcpu(), "mce"), check_memo=False)
    # ...with it, the model's own successor differs from the memo entry: caught.
    with pytest.raises(MemoContractError, match="reads state outside its declared memo"):
        check_system(System(sc, ReadsOtherVcpu(), "mce"), check_memo=True)


def test_the_env_var_turns_the_debug_check_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAULTLINE_CHECK_MEMO", "1")
    with pytest.raises(MemoContractError):
        check_system(System(load(STANDARD), ReadsOtherVcpu(), "mce"))


@pytest.mark.parametrize("design", sorted(SHIPPED))
def test_the_shipped_designs_keep_the_contract(design: str) -> None:
    sc = load(SCENARIOS / "check-large.toml")
    # a bounded slice of the large scenario, every expansion re-checked
    r = check_system(System(sc, get_design(design), "notify"), max_states=6_000,
                     liveness=False, check_memo=True)
    assert r.stop_reason == "max_states"


def test_the_global_memo_footprint_holds_and_a_wrong_one_is_caught() -> None:
    # linux-qemu's deferred SRAO: the guest's workqueue (_guest_mf_work) runs
    # memory_failure(), which sends BUS_MCEERR_AO to `watcher` (early_kill, maps dax0[2]).
    sc = load(SCENARIOS / "conf-shared-page.toml")
    system = System(sc, "request", "mce", profile="linux-qemu")
    assert system.memo_footprint.global_tasks == (3,)
    r = check_system(system, check_memo=True)
    assert r.states == 54_019
    # Declared without watcher's task, the memo would splice a stale task record.
    wrong = System(sc, "request", "mce", profile="linux-qemu")
    wrong.memo_footprint = wrong.memo_footprint._replace(global_tasks=())
    with pytest.raises(MemoContractError, match=r"_guest_mf_work changed tasks\[3\] outside"):
        check_system(wrong, check_memo=False)


def test_the_broadcasting_exit_is_wide_not_local() -> None:
    # QEMU's MCE broadcast: vCPU v's exit handling that injects an SRAR (error-gfn's, in
    # the faulting context) queues an #MC on the other vCPU.
    sc = load(STANDARD)
    local = System(sc, "error-gfn", "mce", profile="linux-qemu")
    fp = local.memo_footprint
    local.memo_footprint = fp._replace(actions=fp.actions | fp.wide, wide=frozenset())
    with pytest.raises(MemoContractError, match=r"_vmm_exit of vCPU \d changed vcpus"):
        check_system(local, check_memo=False)
    # declared wide, it keeps the contract, every expansion re-checked
    check_system(System(sc, "error-gfn", "mce", profile="linux-qemu"), check_memo=True)
