"""`faultline compare`: one scenario on QEMU and on faultline's VMM under each policy the
scenario lists, in one table (vm state, each task's fate, exits) or as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faultline.outcome import EventLog, Outcome, TaskOutcome
from faultline.scenario import Scenario


@dataclass
class Row:
    vmm: str  # "qemu" | "faultline"
    policy: str  # "qemu" for QEMU (it has none), else the faultline policy
    outcome: Outcome | None = None
    error: str = ""  # why this row could not run (QEMU missing, no /dev/kvm, ...)

    def to_json(self) -> dict[str, Any]:
        return {"vmm": self.vmm, "policy": self.policy,
                "outcome": self.outcome.to_json() if self.outcome else None,
                "reason": self.outcome.reason if self.outcome else None,
                "error": self.error or None}


def compare(sc: Scenario, *, events_dir: Path | None = None, watchdog_s: float = 10.0,
            policies: Sequence[str] | None = None) -> list[Row]:
    """Run `sc` under QEMU, then on faultline's VMM (kvm backend) per policy."""
    from faultline.qemu.run import QemuFailed, run_qemu
    from faultline.vmm.runner import BackendError, run_kvm

    def events(backend: str, policy: str) -> EventLog:
        if events_dir is None:
            return EventLog(None)
        events_dir.mkdir(parents=True, exist_ok=True)
        return EventLog(events_dir / f"compare-{sc.name}-{backend}-{policy}.jsonl")

    rows = [Row("qemu", "qemu")]
    log = events("qemu", "qemu")
    try:
        rows[0].outcome = run_qemu(sc, log=log, watchdog_s=watchdog_s)
    except (BackendError, QemuFailed) as e:
        log.emit("error", error=str(e))
        rows[0].error = str(e)
    finally:
        log.close()
    for policy in policies or sc.policies:
        row = Row("faultline", policy)
        rows.append(row)
        log = events("kvm", policy)
        try:
            row.outcome = run_kvm(sc, policy, log=log, watchdog_s=watchdog_s)
        except BackendError as e:
            log.emit("error", error=str(e))
            row.error = str(e)
        finally:
            log.close()
    return rows


def fate_cell(t: TaskOutcome | None) -> str:
    if t is None:
        return "-"
    if t.fate == "exited":
        return f"exit {t.code}"
    if t.signal is not None:
        where = "" if t.signal.vaddr is None else f" @{t.signal.vaddr:#x}"
        return f"{t.fate} {t.signal.code}{where}"
    return t.fate


def vm_cell(o: Outcome) -> str:
    if o.vm == "crashed" and o.qemu and o.qemu.get("signal"):
        return f"crashed ({o.qemu['signal']})"
    return o.vm


def exits_cell(o: Outcome) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(o.exits.items())) or "-"


def render(sc: Scenario, rows: Sequence[Row], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console(highlight=False)
    if not con.is_terminal:
        con.width = max(con.width, 160)  # a log or a pipe: do not fold the table to 80
    qemu = next((r.outcome.qemu for r in rows if r.outcome and r.outcome.qemu), None)
    title = f"faultline compare: {sc.name}" + (
        f" (QEMU {qemu['version'].split()[0]})" if qemu and qemu.get("version") else "")
    table = Table(title=title)
    names = [t.name for t in sc.tasks]
    for col in ("vmm", "policy", "vm", *names, "exits"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r.outcome is None:
            table.add_row(r.vmm, r.policy, "[yellow]not run[/]", *["" for _ in names], "")
            continue
        o = r.outcome
        table.add_row(r.vmm, r.policy, vm_cell(o), *(fate_cell(o.tasks.get(n)) for n in names),
                      exits_cell(o))
    con.print(table)
    for r in rows:
        if r.error:
            con.print(f"{r.vmm} [{r.policy}]: not run: {r.error}", markup=False)
        elif r.outcome is not None and r.outcome.reason:
            con.print(f"{r.vmm} [{r.policy}]: {r.outcome.vm}: {r.outcome.reason}", markup=False)


def dumps(sc: Scenario, rows: Sequence[Row]) -> str:
    return json.dumps({"scenario": sc.name, "rows": [r.to_json() for r in rows]}, indent=2)
