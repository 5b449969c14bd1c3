"""Guest kernel model: Linux-like handling of #MC, memory_failure, poisoned PTEs, the
notification ring, and the async-PF guest protocol (sleep on a token, wake on page-ready).

Functions here transform the tasks / guest records of the state; System calls them.
"""

from __future__ import annotations

from faultline import abi
from faultline.model.state import (
    FINISHED,
    TS_EXITED,
    TS_RUN,
    TS_SIGBUS,
    TS_SLEEP,
    Guest,
    Task,
    put,
)


def kill_sigbus(task: Task, si_code: int, vaddr: int) -> Task:
    """force_sig_mceerr()/force_sig_fault(): SIGBUS's default action ends the task."""
    return task._replace(status=TS_SIGBUS, result=(si_code, vaddr))


def exit_task(task: Task, code: int) -> Task:
    return task._replace(status=TS_EXITED, result=code)


def sleeper(tasks: tuple[Task, ...], candidates: tuple[int, ...], token: int) -> int:
    """The task sleeping on ``token`` (_find_apf_task()), else -1."""
    for t in candidates:
        tk = tasks[t]
        if tk.status == TS_SLEEP and tk.token == token:
            return t
    return -1


def wake_token(tasks: tuple[Task, ...], candidates: tuple[int, ...], token: int
               ) -> tuple[tuple[Task, ...], int]:
    """The page-ready handler: wake the task sleeping on ``token`` (kvm_async_pf_task_wake).
    Returns (tasks, woken task index or -1)."""
    t = sleeper(tasks, candidates, token)
    if t < 0:
        return tasks, -1
    return put(tasks, t, tasks[t]._replace(status=TS_RUN, token=0)), t


def memory_failure(guest: Guest, tasks: tuple[Task, ...], gidx: int,
                   mappers: tuple[tuple[int, int], ...], early_kill: tuple[bool, ...],
                   spare: int = -1) -> tuple[Guest, tuple[Task, ...], list[tuple[int, int]]]:
    """memory_failure(pfn, flags): mark the frame HWPoison, unmap it from every task (its
    PTEs become poisoned: a later access faults in the guest), and send BUS_MCEERR_AO to
    the tasks that asked for early kill. ``spare``: the task getting AR instead.
    Returns (guest, tasks, [(task, vaddr) killed with AO]).
    """
    killed = []
    guest = guest._replace(offlined=guest.offlined | (1 << gidx))
    for t, vaddr in mappers:
        if t == spare or not early_kill[t]:
            continue
        if tasks[t].status in FINISHED:
            continue
        tasks = put(tasks, t, kill_sigbus(tasks[t], abi.BUS_MCEERR_AO, vaddr))
        killed.append((t, vaddr))
    return guest, tasks, killed
