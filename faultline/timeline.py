"""The human timeline: one line per event, aligned columns (time, vCPU, task, event,
detail), the resolution line highlighted. Readable without colour (NO_COLOR, not a tty)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.text import Text

from faultline.outcome import Outcome

# Events worth a line in the default timeline (the log keeps everything).
_QUIET = {"memslot", "serial", "guest_boot", "vcpu_regs", "outcome", "file_check"}
_STYLE = {
    "vmm_resolve": "bold yellow",
    "kvm_exit": "cyan",
    "guest_signal": "bold red",
    "guest_sigbus": "bold red",
    "guest_memory_failure": "magenta",
    "host_event": "bold blue",
    "vm_abort": "bold red",
    "vm_hung": "bold red",
    "vmm_inject_mce": "green",
    "vmm_notify": "green",
    "task_exit": "green",
}
_SKIP_FIELDS = {"seq", "t_us", "step", "vcpu", "task", "kind", "line"}


def _detail(ev: dict[str, Any]) -> str:
    if ev.get("kind") == "vmm_resolve" and ev.get("line"):
        return str(ev["line"])
    parts = []
    for k, v in ev.items():
        if k in _SKIP_FIELDS or v is None or v == [] or v == "":
            continue
        parts.append(f"{k}={v}")
    return " ".join(parts)


def render(events: Iterable[dict[str, Any]], outcome: Outcome | None = None, *,
           console: Console | None = None, verbose: bool = False) -> None:
    con = console or Console(highlight=False)
    for ev in events:
        kind = str(ev.get("kind", "?"))
        if not verbose and kind in _QUIET:
            continue
        if "t_us" in ev:
            when = f"{ev['t_us'] / 1000:9.3f}ms"
        else:
            when = f"step {ev.get('step', 0):>5}"
        vcpu = "" if ev.get("vcpu") is None else f"vcpu{ev['vcpu']}"
        task = ev.get("task") or ""
        line = Text()
        line.append(f"{when} {vcpu:<6} {task:<10} ")
        line.append(f"{kind:<22}", style=_STYLE.get(kind, ""))
        line.append(" " + _detail(ev), style="bold" if kind == "vmm_resolve" else "")
        con.print(line, soft_wrap=True)
    if outcome is not None:
        summary(outcome, con)


def summary(outcome: Outcome, con: Console) -> None:
    head = Text(f"vm: {outcome.vm}", style="bold green" if outcome.vm == "completed"
                else "bold red")
    if outcome.reason:
        head.append(f" ({outcome.reason})")
    head.append(f"   backend {outcome.backend}, design {outcome.design}, "
                f"policy {outcome.policy}")
    con.print(head)
    for name, t in outcome.tasks.items():
        desc = t.fate
        if t.code is not None:
            desc += f" code {t.code}"
        if t.signal is not None:
            desc += f" {t.signal.code} at {t.signal.vaddr:#x}"
        con.print(f"  task {name:<12} {desc}")
    if outcome.offlined:
        con.print("  offlined: " + ", ".join(hex(g) for g in sorted(outcome.offlined)))
    exits = ", ".join(f"{k}={v}" for k, v in sorted(outcome.exits.items()))
    con.print(f"  exits: {exits or 'none'}")
    for f in outcome.faults:
        con.print(f"  fault ({f.source}): {f.line()}")
    con.print(f"  events: {outcome.events_path}")
