"""The decision module: every decision the VMM takes after a guest memory fault or a change
of a backing file, as pure functions.

Shared by the real VMM (``faultline.vmm``) and the model (``faultline.model``): no I/O, no
KVM bindings, no clocks. The caller classifies the fault (which GPA, why it is bad: beyond
EOF, a hole, poisoned, read-only), describes the file window it lies in, and gets a
:class:`Decision` back. The same holds for the other decisions: which page a bare -EFAULT
is blamed on (:func:`pick_bare_efault_page`), whether a repeated fault means the handling
failed (:func:`count_fault`), what the proactive watcher notifies after a file changed
(:func:`file_change_notify`). Each policy declares what it needs from the VMM
(:data:`NEEDS`), so the VMM never tests a policy's name.

Policies (docs/design.md):

- ``abort``: QEMU today ("kvm run failed Bad address"): stop the VM. The fault is still
  resolved and logged by the caller. A hwpoison SIGBUS still becomes an #MC, as in QEMU.
- ``mce``: inject a machine check with QEMU's encoding (SRAR when the vCPU is in the
  faulting context, SRAO otherwise) so that the guest runs memory_failure().
- ``notify``: a paravirtual notification (ring record + interrupt) naming the whole bad
  range, so the guest offlines it at once.
- ``proactive``: watch the backing files and notify on truncate / punch-hole before any
  access (:func:`file_change_notify`); a fault it missed is handled as ``notify``.

Whatever the policy, a store refused by a read-only memslot is not a memory failure: the
page is fine and stays readable. The decision is :class:`RefuseWrite`: the writer alone
gets SIGSEGV SEGV_ACCERR at its address (a notification record with cause ``read-only``
that offlines nothing), as a store to a read-only file mapping does on Linux.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass

from faultline.abi import PAGE_SHIFT, PAGE_SIZE
from faultline.pages import PageRanges
from faultline.x86mce import (
    MCG_CTL_P,
    MCG_SER_P,
    MCG_STATUS_EIPV,
    MCG_STATUS_MCIP,
    MCG_STATUS_RIPV,
    MCI_STATUS_ADDRV,
    MCI_STATUS_AR,
    MCI_STATUS_DEFERRED,
    MCI_STATUS_EN,
    MCI_STATUS_MISCV,
    MCI_STATUS_POISON,
    MCI_STATUS_S,
    MCI_STATUS_UC,
    MCI_STATUS_VAL,
    MCM_ADDR_PHYS,
)

__all__ = ["PAGE_SHIFT", "PAGE_SIZE"]  # re-exported: one PAGE_SIZE (faultline.abi's)

POLICIES = ("abort", "mce", "notify", "proactive")


@dataclass(frozen=True, slots=True)
class Needs:
    """What a policy needs from the VMM beyond the fault itself.

    ``window``: its decision reads the file window (the range to notify); the others decide
    from the cause alone, so the VMM need not look at the window for them.
    ``watch_files``: it watches the backing files and acts on a change before any access
    (:func:`file_change_notify`).
    """

    window: bool = False
    watch_files: bool = False


NEEDS = {
    "abort": Needs(),
    "mce": Needs(),
    "notify": Needs(window=True),
    "proactive": Needs(window=True, watch_files=True),
}
WINDOWED = frozenset(p for p, n in NEEDS.items() if n.window)

# Causes (the names used by FaultRecord.cause); numeric codes as in faultline.abi.CAUSE_*.
CAUSE_CODES = {"beyond-eof": 1, "hole": 2, "poisoned": 3, "read-only": 4}

# --- Machine-check encoding (QEMU target/i386/kvm/kvm.c: kvm_mce_inject) --------------
# The bits come from faultline.x86mce, not faultline.kvm: the model never depends on the
# bindings.
MCE_BANK = 9
MCACOD_SRAR_DATA_LOAD = 0x134
MCACOD_SRAO_SCRUB = 0xC0
MCI_MISC_VALUE = (MCM_ADDR_PHYS << 6) | 0xC

# How many times the VMM accepts the same (gpa, source) fault before it gives up: userspace
# "should guard against receiving the same annotated fault repeatedly" (api.rst).
MAX_REPEATS = 2


# --- Decisions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Abort:
    reason: str


@dataclass(frozen=True, slots=True)
class InjectMce:
    gpa: int
    action_required: bool


@dataclass(frozen=True, slots=True)
class Notify:
    ranges: tuple[tuple[int, int, str], ...]  # (first_gpa, npages, cause)

    @property
    def gpas(self) -> tuple[int, ...]:
        return tuple(first + i * PAGE_SIZE for first, n, _ in self.ranges for i in range(n))


@dataclass(frozen=True, slots=True)
class Ignore:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RefuseWrite:
    """A store refused by a read-only memslot: SIGSEGV SEGV_ACCERR to the writer at the
    address it wrote (``gpa``, exact), nothing offlined."""

    gpa: int


Decision = Abort | InjectMce | Notify | Ignore | RefuseWrite


@dataclass(frozen=True, slots=True)
class Window:
    """What the VMM knows about the file window a fault lies in.

    ``file_size``: the file's size now (fstat). ``known_size``: the size the VMM saw last
    (at map time or at its last notification), None if it does not track it.
    ``holes``: byte ranges (offset, length) now holes in the file.
    """

    gpa: int
    nbytes: int
    file_size: int
    known_size: int | None = None
    holes: tuple[tuple[int, int], ...] = ()

    @property
    def pages(self) -> int:
        return self.nbytes >> PAGE_SHIFT


def _pages_up(nbytes: int) -> int:
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT


def truncation_range(window_gpa: int, window_bytes: int, old_size: int,
                     new_size: int) -> tuple[int, int] | None:
    """The pages a shrink from ``old_size`` to ``new_size`` makes bad, clipped to the window.

    A page is bad when it starts at or beyond EOF (the page holding EOF is still mapped,
    its tail reads zero): [ceil(new/PAGE), ceil(old/PAGE)) ∩ [0, window pages).
    """
    first = _pages_up(new_size)
    end = min(_pages_up(old_size), window_bytes >> PAGE_SHIFT)
    if first >= end:
        return None
    return window_gpa + (first << PAGE_SHIFT), end - first


def hole_range(window_gpa: int, window_bytes: int, offset: int,
               length: int) -> tuple[int, int] | None:
    """The whole pages inside the hole [offset, offset + length), clipped to the window."""
    first = _pages_up(offset)
    end = min((offset + length) >> PAGE_SHIFT, window_bytes >> PAGE_SHIFT)
    if first >= end:
        return None
    return window_gpa + (first << PAGE_SHIFT), end - first


def bad_range(window: Window, fault_gpa: int, cause: str) -> tuple[int, int, str]:
    """The whole bad range around ``fault_gpa`` (at least its page)."""
    page_gpa = fault_gpa & ~(PAGE_SIZE - 1)
    one = (page_gpa, 1, cause)
    if not window.gpa <= page_gpa < window.gpa + window.nbytes:
        return one
    if cause == "beyond-eof":
        old = window.known_size if window.known_size is not None else window.nbytes
        r = truncation_range(window.gpa, window.nbytes, max(old, window.file_size),
                             window.file_size)
        if r is not None and r[0] <= page_gpa < r[0] + (r[1] << PAGE_SHIFT):
            return (r[0], r[1], cause)
        # Outside what the VMM knew of (e.g. a page beyond the EOF it mapped): from the
        # EOF page to the window's end.
        r = truncation_range(window.gpa, window.nbytes, window.nbytes, window.file_size)
        if r is not None and r[0] <= page_gpa < r[0] + (r[1] << PAGE_SHIFT):
            return (r[0], r[1], cause)
        return one
    if cause == "hole":
        for off, length in window.holes:
            r = hole_range(window.gpa, window.nbytes, off, length)
            if r is not None and r[0] <= page_gpa < r[0] + (r[1] << PAGE_SHIFT):
                return (r[0], r[1], cause)
        return one
    return one


def decide(policy: str, fault_gpa: int, cause: str, window: Window | None, *,
           in_context: bool = True) -> Decision:
    """What to do about a bad guest access at ``fault_gpa``.

    ``cause``: beyond-eof | hole | poisoned | read-only | unmapped | unknown.
    ``window``: the file window the GPA lies in (None: not file-backed).
    ``in_context``: the vCPU is still in the faulting access's context (a synchronous
    exit). False for exits that happen "whatever task is running" (the ``request`` design):
    an SRAR there would kill an innocent task, so ``mce`` injects SRAO instead and the
    faulting task meets the poisoned PTE on its retry.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (one of: {', '.join(POLICIES)})")
    page_gpa = fault_gpa & ~(PAGE_SIZE - 1)
    if cause not in CAUSE_CODES:
        return Abort(f"gpa {fault_gpa:#x}: unresolvable guest memory fault ({cause})")
    if cause == "read-only":
        return RefuseWrite(fault_gpa)
    if policy == "abort":
        if cause == "poisoned":
            # QEMU today: a hwpoison SIGBUS becomes an #MC (kvm_arch_on_sigbus_vcpu).
            return InjectMce(page_gpa, in_context)
        return Abort(f"gpa {fault_gpa:#x}: {cause}: kvm run failed Bad address")
    if policy == "mce":
        return InjectMce(page_gpa, in_context)
    if window is None:
        return Notify(((page_gpa, 1, cause),))
    return Notify((bad_range(window, fault_gpa, cause),))


def _mce_fields(action_required: bool) -> tuple[int, int, int]:
    status = (MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_EN | MCI_STATUS_MISCV
              | MCI_STATUS_ADDRV | MCI_STATUS_S)
    mcg_status = MCG_STATUS_MCIP | MCG_STATUS_RIPV
    if action_required:
        status |= MCI_STATUS_AR | MCACOD_SRAR_DATA_LOAD
        mcg_status |= MCG_STATUS_EIPV
    else:
        status |= MCACOD_SRAO_SCRUB
    return status, MCI_MISC_VALUE, mcg_status


# (MCi_STATUS, MCi_MISC, MCG_STATUS) by action_required: computed once, read per injection
MCE_FIELDS = {True: _mce_fields(True), False: _mce_fields(False)}

# The record QEMU's cpu_x86_inject_mce() broadcasts to every other vCPU with
# MCE_INJECT_BROADCAST (bank 1, no address): no AR, no S.
MCI_BROADCAST = MCI_STATUS_VAL | MCI_STATUS_UC
MCG_BROADCAST = MCG_STATUS_MCIP | MCG_STATUS_RIPV


def _mce_fields_amd(action_required: bool) -> tuple[int, int, int]:
    """kvm_mce_inject() for an AMD guest CPU (IS_AMD_CPU(env); QEMU >= 9.1): no S, no AR,
    no MCACOD; an SRAR is UC|POISON, an SRAO a deferred error (DEFERRED|POISON: POISON
    marks the address usable for the guest's memory_failure())."""
    status = MCI_STATUS_VAL | MCI_STATUS_EN | MCI_STATUS_MISCV | MCI_STATUS_ADDRV
    mcg_status = MCG_STATUS_MCIP | MCG_STATUS_RIPV
    if action_required:
        status |= MCI_STATUS_UC | MCI_STATUS_POISON
        mcg_status |= MCG_STATUS_EIPV
    else:
        status |= MCI_STATUS_DEFERRED | MCI_STATUS_POISON
    return status, MCI_MISC_VALUE, mcg_status


MCE_FIELDS_AMD = {True: _mce_fields_amd(True), False: _mce_fields_amd(False)}


def mce_encoding(gpa: int, action_required: bool,
                 guest_cpu: str = "intel") -> tuple[int, int, int, int]:
    """(MCi_STATUS, MCi_ADDR, MCi_MISC, MCG_STATUS) as QEMU's kvm_mce_inject() for an
    ``intel`` or ``amd`` guest CPU; bank 9."""
    fields = MCE_FIELDS_AMD if guest_cpu == "amd" else MCE_FIELDS
    status, misc, mcg_status = fields[bool(action_required)]
    return status, gpa, misc, mcg_status


def pick_bare_efault_page(bad: Iterable[tuple[int, int]],
                          handled: Container[int]) -> int | None:
    """Recover the GPA of a bare -EFAULT: the lowest bad page (``bad``: page ranges (first
    gpa, npages), ascending, from a scan of the file windows) not yet handled; None if
    there is none (the caller gives up: abort). Ranges: a truncated 1 GiB window is one
    range, never a list of 131,072 pages."""
    for first, npages in bad:
        for k in range(npages):
            gpa = first + k * PAGE_SIZE
            if gpa not in handled:
                return gpa
    return None


# --- Repeats ---------------------------------------------------------------------------
HANDLE, IN_FLIGHT, GIVE_UP = "handle", "in-flight", "give-up"


def count_fault(times: int, in_flight: bool) -> tuple[int, str]:
    """The same page faulting again on the same vCPU: counted per (page, vCPU), since
    several vCPUs may each touch a page before the guest offlines it, and each one's task
    needs its own event.

    ``times``: how often this (page, vCPU) fault was handled already. ``in_flight``: an
    event for this page is on its way to this vCPU (notified or queued, and the page not
    yet offlined): the fault is that event not having arrived yet, not the handling
    failing, so it is neither counted nor answered with a second event.

    Returns (the new count, verdict): :data:`HANDLE` (decide and act), :data:`IN_FLIGHT`
    (re-enter, nothing new), :data:`GIVE_UP` (handled more than :data:`MAX_REPEATS` times
    and still coming back: abort rather than loop).
    """
    if in_flight:
        return times, IN_FLIGHT
    times += 1
    return times, GIVE_UP if times > MAX_REPEATS else HANDLE


# --- The proactive watcher ---------------------------------------------------------------
def file_change_notify(now_bad: PageRanges, seen: PageRanges, notified: PageRanges,
                       eof_gpa: int) -> Notify | None:
    """What the watcher notifies after a backing file changed: the pages of the window that
    are bad now (``now_bad``: holes and beyond EOF), minus those already bad at its last
    look (``seen``: e.g. a window mapped beyond EOF from the start is not news) and those
    the fault path already notified. One record per range and cause: holes below the page
    holding EOF (``eof_gpa``: the first gpa at or beyond the end of file), beyond-eof from
    it."""
    fresh = now_bad.minus(seen).minus(notified)
    if not fresh:
        return None
    holes, beyond = fresh.split_at(eof_gpa)
    return Notify(tuple((first, n, cause) for part, cause in ((holes, "hole"),
                                                             (beyond, "beyond-eof"))
                        for first, n in part.ranges()))


# --- Machine-check capability ---------------------------------------------------------
MCG_CAP_BANKS = 10  # QEMU's MCE_BANKS_DEF (target/i386/cpu.h); bank 9 is the one it uses


def mcg_cap(supported: int) -> int:
    """MCG_CAP for KVM_X86_SETUP_MCE, from KVM_X86_GET_MCE_CAP_SUPPORTED: QEMU's
    MCE_CAP_DEF bits (MCG_CTL_P | MCG_SER_P; SER, software error recovery, is what makes
    SRAR/SRAO meaningful) where KVM supports them, and MCE_BANKS_DEF banks
    (target/i386/cpu.h)."""
    return (supported & (MCG_CTL_P | MCG_SER_P)) | MCG_CAP_BANKS
