# ruff: noqa: RUF005  (hot path: explicit tuple concatenation/slicing is the state encoding)
"""Guest kernel model: Linux-like handling of #MC, memory_failure, poisoned PTEs, the
notification ring, and the async-PF guest protocol (sleep on a token, wake on page-ready).

Functions here transform the tasks / guest components of the state; System calls them.
"""

from __future__ import annotations

from faultline import abi
from faultline.model.state import (
    FINISHED,
    G_OFFLINED,
    T_RESULT,
    T_STATUS,
    T_TOKEN,
    TS_EXITED,
    TS_RUN,
    TS_SIGBUS,
    TS_SLEEP,
)


def kill_sigbus(task: tuple, si_code: int, vaddr: int) -> tuple:
    """force_sig_mceerr()/force_sig_fault(): SIGBUS's default action ends the task."""
    return (TS_SIGBUS,) + task[1:T_RESULT] + ((si_code, vaddr),)


def exit_task(task: tuple, code: int) -> tuple:
    return (TS_EXITED,) + task[1:T_RESULT] + (code,)


def wake_token(tasks: tuple, candidates: tuple[int, ...], token: int) -> tuple[tuple, int]:
    """The page-ready handler: wake the task sleeping on ``token`` (kvm_async_pf_task_wake).
    Returns (tasks, woken task index or -1)."""
    for t in candidates:
        tk = tasks[t]
        if tk[T_STATUS] == TS_SLEEP and tk[T_TOKEN] == token:
            nt = (TS_RUN,) + tk[1:T_TOKEN] + (0,) + tk[T_TOKEN + 1:]
            return tasks[:t] + (nt,) + tasks[t + 1:], t
    return tasks, -1


def memory_failure(guest: tuple, tasks: tuple, gidx: int, mappers: tuple[tuple[int, int], ...],
                   early_kill: tuple[bool, ...], spare: int = -1) -> tuple[tuple, tuple, list]:
    """memory_failure(pfn, flags): mark the frame HWPoison, unmap it from every task (its
    PTEs become poisoned: a later access faults in the guest), and send BUS_MCEERR_AO to
    the tasks that asked for early kill. ``spare``: the task getting AR instead.
    Returns (guest, tasks, [(task, vaddr) killed with AO]).
    """
    killed = []
    guest = (guest[G_OFFLINED] | (1 << gidx),) + guest[1:]
    for t, vaddr in mappers:
        if t == spare or not early_kill[t]:
            continue
        if tasks[t][T_STATUS] in FINISHED:
            continue
        tasks = tasks[:t] + (kill_sigbus(tasks[t], abi.BUS_MCEERR_AO, vaddr),) + tasks[t + 1:]
        killed.append((t, vaddr))
    return guest, tasks, killed
