"""The properties faultline's model is checked against, each declared once with the
label the checker evaluates (faultline.check.contract.Property). The label reads one
record of the state (``task``: every task in turn, ``guest``, ``vmm``), so the checker
evaluates it once per distinct record; System's label methods (``vm_aborted``,
``bad_reads``, ...) are the same predicates over a whole state, for people and tests."""

from __future__ import annotations

from faultline.check.contract import LIVENESS, SAFETY, Property
from faultline.model.state import TS_KILLED, TS_SIGBUS, Guest, Task, Vmm

# first_access_reported: a task's access to a bad page may fail at most this many times
# before it is reported (an exit to userspace, or a guest SIGBUS): the first try plus one
# retry. error-gfn needs exactly that (the async try fails, the retry finds the error gfn
# and faults synchronously); a third failed try means the first failure went unreported.
FIRST_ACCESS_MAX_TRIES = 2


def _aborted(vmm: Vmm) -> bool:
    return bool(vmm.abort)


def _fabricated(guest: Guest) -> bool:
    return guest.bad_reads > 0


def _imprecise(tk: Task) -> bool:
    # (a writer refused by a read-only memslot, TS_SIGSEGV, is no kill for a bad page)
    return (tk.status == TS_SIGBUS or tk.status == TS_KILLED) and not tk.touched


def _repeated_exit(vmm: Vmm) -> bool:
    return any(n > 1 for _g, n in vmm.exits)


def _unreported(tk: Task) -> bool:
    return tk.fails > FIRST_ACCESS_MAX_TRIES


def _wrong_victim(guest: Guest) -> bool:
    return guest.wrong_mce > 0


PROPERTIES: tuple[Property, ...] = (
    Property("no_hang", LIVENESS,
             "every fair run ends: every task exited or was killed, or the VM stopped"),
    Property("vm_survives", SAFETY, "the VM never ends early: the VMM neither stops nor "
             "resets it nor exits, and the guest never panics", "vmm", _aborted),
    Property("no_fabricated_data", SAFETY,
             "no access completes from a page beyond EOF, a hole not written since, or a "
             "poisoned page", "guest", _fabricated),
    Property("precise_kill", SAFETY, "only a task that touched a bad page is killed",
             "task", _imprecise),
    Property("one_exit_per_bad_page", SAFETY,
             "at most one memory-fault exit to userspace per bad page", "vmm",
             _repeated_exit),
    Property("first_access_reported", SAFETY,
             f"an access to a bad page fails at most {FIRST_ACCESS_MAX_TRIES} times before "
             "an exit or a guest SIGBUS reports it", "task", _unreported),
    Property("right_victim", SAFETY,
             "a machine check interrupts only the context whose access touched the page, "
             "and the guest never panics on one", "guest", _wrong_victim),
)
