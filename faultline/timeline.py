"""The human timeline: one line per event, aligned columns (time, vCPU, task, event,
detail), the resolution line highlighted. Readable without colour (NO_COLOR, not a tty)."""

from __future__ import annotations

import os
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


# A pipe or a file has no width: rich would assume 80 columns and fold tables and long
# lines for a script to unfold. Wide enough for any table we print.
PIPE_WIDTH = 1000
# On an endless run (interrupted, or capped) the default timeline shows the first and the
# last events, not all of them: the event log has them all.
MAX_LINES = 2_000


def make_console(*, stderr: bool = False) -> Console:
    """A console that does not fold output when it is not a terminal (COLUMNS wins)."""
    con = Console(highlight=False, stderr=stderr)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con.width = PIPE_WIDTH
    return con


def make_progress() -> Any:
    """A progress bar on stderr for long work on a terminal (the caller starts it only
    when stderr is one): what runs now, a bar, done of total, time left."""
    from rich.progress import MofNCompleteColumn, Progress

    return Progress(*Progress.get_default_columns(), MofNCompleteColumn(),
                    console=Console(stderr=True), transient=True)


RESOLVE_MARK = ">>"  # marks the resolution line without colour (NO_COLOR, a pipe)


def _resolution(ev: dict[str, Any]) -> str:
    """The GPA -> HVA -> file line: the real VMM logs it ready-made (``line``); the model
    logs the fields only."""
    if ev.get("line"):
        return str(ev["line"])
    hva = ev.get("hva")
    hva_s = (hva if isinstance(hva, str) else f"{hva:#x}") if hva is not None else "hva ?"
    if not str(hva_s).startswith("hva"):
        hva_s = f"hva {hva_s}"
    off, size = ev.get("offset"), ev.get("file_size")
    where = (f"{ev.get('path')} +{off:#x} (file size {size:#x})"
             if isinstance(off, int) and isinstance(size, int) and ev.get("path")
             else "no backing file")
    return f"gpa {ev.get('gpa')} -> {hva_s} -> {where}: {ev.get('cause')}"


def _detail(ev: dict[str, Any]) -> str:
    if ev.get("kind") == "vmm_resolve":
        return _resolution(ev)
    parts = []
    for k, v in ev.items():
        if k in _SKIP_FIELDS or v is None or v == [] or v == "":
            continue
        parts.append(f"{k}={v}")
    return " ".join(parts)


def render(events: Iterable[dict[str, Any]], outcome: Outcome | None = None, *,
           console: Console | None = None, verbose: bool = False,
           max_lines: int = MAX_LINES) -> None:
    con = console or make_console()
    shown = [ev for ev in events if verbose or str(ev.get("kind", "?")) not in _QUIET]
    cut = 0
    if len(shown) > max_lines:
        cut = len(shown) - max_lines
        shown = [*shown[:max_lines // 2], {"kind": "...", "cut": cut},
                 *shown[-(max_lines // 2):]]
    # Column widths from the events themselves, so long kernel-style names stay aligned.
    task_w = max([10, *(len(str(ev.get("task") or "")) for ev in shown)])
    kind_w = max([22, *(len(str(ev.get("kind", "?"))) for ev in shown)])
    for ev in shown:
        kind = str(ev.get("kind", "?"))
        if kind == "...":
            con.print(f"   ... {ev['cut']} events not shown (the event log has them all)",
                      style="dim")
            continue
        if "t_us" in ev:
            when = f"{ev['t_us'] / 1000:9.3f}ms"
        else:
            when = f"step {ev.get('step', 0):>5}"
        vcpu = "" if ev.get("vcpu") is None else f"vcpu{ev['vcpu']}"
        task = ev.get("task") or ""
        resolve = kind == "vmm_resolve"
        line = Text()
        line.append(f"{RESOLVE_MARK if resolve else '  '} {when} {vcpu:<6} {task:<{task_w}} ")
        line.append(f"{kind:<{kind_w}}", style=_STYLE.get(kind, ""))
        line.append(" " + _detail(ev), style="bold reverse" if resolve else "")
        con.print(line, soft_wrap=True)
    if outcome is not None:
        summary(outcome, con)


def summary(outcome: Outcome, con: Console) -> None:
    head = Text(f"vm: {outcome.vm}", style="bold green" if outcome.vm == "completed"
                else "bold red")
    if outcome.reason:
        head.append(f" ({outcome.reason})")
    head.append(f"   backend {outcome.backend}, profile {outcome.profile}, "
                f"design {outcome.design}, policy {outcome.policy}")
    con.print(head, soft_wrap=True)
    for name, t in outcome.tasks.items():
        desc = t.fate
        if t.code is not None:
            desc += f" code {t.code}"
        if t.signal is not None:
            desc += f" {t.signal.code}" + ("" if t.signal.vaddr is None
                                           else f" at {t.signal.vaddr:#x}")
        con.print(f"  task {name:<12} {desc}", soft_wrap=True)
    if outcome.offlined:
        con.print("  offlined: " + ", ".join(hex(g) for g in sorted(outcome.offlined)),
                  soft_wrap=True)
    exits = ", ".join(f"{k}={v}" for k, v in sorted(outcome.exits.items()))
    con.print(f"  exits: {exits or 'none'}", soft_wrap=True)
    for f in outcome.faults:
        con.print(f"  fault ({f.source}): {f.line()}", soft_wrap=True)
    con.print(f"  events: {outcome.events_path}", soft_wrap=True)
