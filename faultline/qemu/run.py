"""The qemu backend: faultline's guest kernel under the system's QEMU with KVM.

One asyncio loop drives everything: QEMU's process (started paused, in its own session,
killed with us), its QMP monitor (the ``qemu.qmp`` client, faultline listening), and the
report doorbell (QEMU's isa-debugcon on a unix socket, faultline listening).

A report (abi.py, "Reports under QEMU"): the guest fills its record in RAM, sets the
record's pending word and writes one byte to the doorbell; faultline reads the record from
the shared RAM file, handles it as our VMM handles an I/O exit (event log, outcome, host
events it triggers) and clears the pending word; only then does the guest go on. A host
event with several vCPUs also runs between QMP ``stop`` and ``cont``, as our VMM parks the
other vCPUs for it.

QEMU has no policy: ``policy = "qemu"``. The VM ends ``completed`` (every task finished,
every vCPU idle: faultline sends ``quit``), ``aborted`` (QEMU stopped the VM by itself,
e.g. ``internal-error`` after "kvm run failed Bad address"), ``reset`` (QEMU reset the
guest, e.g. do_inject_x86_mce()'s "Previous MCE still in progress": with ``-no-reboot``
a SHUTDOWN event, reason ``guest-reset``), ``panic`` (the guest panicked: its panic
report, or QEMU's GUEST_PANICKED), ``crashed`` (the QEMU process died: the signal and
QEMU's last stderr line are kept; unfinished tasks are ``lost``) or ``hung`` (no report
for the watchdog's time: QEMU is killed). The model says the same words.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import mmap
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from faultline import abi
from faultline.outcome import EventLog, Outcome, Signal, TaskOutcome, unfinished_fate
from faultline.qemu.command import (
    QemuLayoutError,
    QemuUnavailable,
    RunPaths,
    command,
    find_qemu,
    maxmem,
    qemu_version,
)
from faultline.scenario import HostEvent, Scenario, file_contents
from faultline.vmm.hostevents import needs_real_poison
from faultline.vmm.reports import signal_fate
from faultline.vmm.runner import BackendError, Interrupted

POLICY = "qemu"
DESIGN = "host"  # this host's KVM, as on the kvm backend
START_TIMEOUT_S = 30.0  # QEMU's start-up until its monitor connects
# The guest boots through SeaBIOS, emulated on this host: the first report may take longer
# than the watchdog allows between two reports.
BOOT_ALLOWANCE_S = 20.0
QUIT_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1
# The vm word for a SHUTDOWN event's reason (QEMU's ShutdownCause) when it says how the
# guest ended; any other reason: aborted. With -no-reboot, qemu_system_reset_request()
# (SHUTDOWN_CAUSE_GUEST_RESET) shuts the VM down instead of resetting it: "guest-reset".
_SHUTDOWN_VM = {"guest-reset": "reset", "guest-panic": "panic"}
# KVM's per-vCPU counters sampled when a run hangs (binary stats, QMP query-stats)
KVM_STATS = ("exits", "pf_taken", "pf_fixed", "halt_wakeup", "mmio_exits", "io_exits")
_PENDING = abi.REPORT_PENDING_OFFSET


class QemuFailed(Exception):
    """QEMU itself could not run the scenario (missing, failing to start, ...): not bad
    input, so the CLI keeps the event log; one line, exit 2."""


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL it if faultline dies (even by SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


class QemuRun:
    """One run of a scenario under QEMU. Use :func:`run_qemu`."""

    def __init__(self, scenario: Scenario, *, events_path: str | Path | None = None,
                 log: EventLog | None = None, watchdog_s: float = 10.0, keep: bool = False,
                 qemu: str | None = None, kernel: str | Path | None = None,
                 cpu: str | None = None, extra_args: list[str] | None = None,
                 boot_allowance_s: float = BOOT_ALLOWANCE_S) -> None:
        if (why := needs_real_poison(scenario)) is not None:
            raise BackendError(why)
        self.sc = scenario
        self._task_names = tuple(t.name for t in scenario.tasks)
        self.watchdog_s = watchdog_s
        self.boot_allowance_s = boot_allowance_s
        self.keep = keep
        self.qemu_arg = qemu
        self.kernel = kernel
        self.cpu = cpu
        self.extra_args = extra_args
        self.own_log = log is None  # a caller's log stays open: it may add an error line
        self.log = log if log is not None else EventLog(events_path)
        self.outcome = Outcome(scenario.name, "qemu", DESIGN, POLICY, profile="qemu",
                               events_path=self.log.path)
        self.outcome.qemu = {}
        for t in scenario.tasks:
            self.outcome.tasks[t.name] = TaskOutcome()
        self.run_dir: Path | None = None  # made once QEMU is found (vm_create names it)
        self.fds: dict[str, int] = {}  # file name -> fd (host events, the file check)
        self.ram: mmap.mmap | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.finished_tasks: set[str] = set()
        self.idle: set[int] = set()
        self.steps: dict[str, int] = {}
        self.writes: dict[int, int] = {}  # window gpa -> last value a task wrote there
        self.doorbells = 0
        self.bad_reports = 0
        self.last_progress = 0.0
        self.booted = False
        self.ending = False  # faultline decided the run is over (quit/kill are ours)
        self.done = asyncio.Event()

    # --- set-up ---------------------------------------------------------------------------
    @property
    def paths(self) -> RunPaths:
        d = self.run_dir
        assert d is not None
        return RunPaths(ram=d / "ram", boot_info=d / "bootinfo.bin", doorbell=d / "doorbell.sock",
                        qmp=d / "qmp.sock", serial=d / "serial.txt",
                        windows=tuple(d / f.path for f in self.sc.files))

    def _prepare(self) -> list[str]:
        from faultline.guest.build import kernel_path
        from faultline.vmm import boot

        sc = self.sc
        maxmem(sc)  # a layout QEMU cannot build is refused before anything starts
        binary = find_qemu(self.qemu_arg)
        version = qemu_version(binary)
        assert self.outcome.qemu is not None
        self.outcome.qemu["version"] = version
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.run_dir = Path(tempfile.mkdtemp(prefix="faultline-qemu-", dir=shm))
        self.log.emit("vm_create", scenario=sc.name, policy=POLICY, vcpus=sc.vcpus,
                      ram_bytes=sc.ram_bytes, run_dir=str(self.run_dir), qemu=binary,
                      qemu_version=version)
        root = self.run_dir.resolve()
        for f, path in zip(sc.files, self.paths.windows, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() or not str(path.resolve()).startswith(str(root) + os.sep):
                raise BackendError(f"{sc.source}: files.{f.name}.path: {f.path!r} leaves the "
                                   "run directory (symlink?)")
            # QEMU refuses a backing file smaller than its window (and grows an empty one):
            # it starts on a full-size file, cut to the scenario's size before the guest runs.
            data = file_contents(f)
            path.write_bytes(data + bytes(max(0, f.window_bytes - len(data))))
            self.fds[f.name] = os.open(path, os.O_RDWR)
        with open(self.paths.ram, "wb") as fh:
            fh.truncate(sc.ram_bytes)
        info = bytearray(boot.build_boot_info(sc))
        fields = list(abi.BOOT_HEADER.unpack_from(info, 0))
        fields[8] |= abi.BOOT_OPT_DOORBELL  # the header's options
        abi.BOOT_HEADER.pack_into(info, 0, *fields)
        self.paths.boot_info.write_bytes(bytes(info))
        fd = os.open(self.paths.ram, os.O_RDWR)
        try:
            self.ram = mmap.mmap(fd, sc.ram_bytes, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        kernel = Path(self.kernel) if self.kernel is not None else kernel_path()
        return command(binary, sc, kernel, self.paths, self.cpu, self.extra_args)

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> Outcome:
        try:
            try:
                argv = self._prepare()
            except QemuLayoutError as e:
                raise BackendError(str(e)) from None
            except QemuUnavailable as e:
                raise QemuFailed(str(e)) from None
            except OSError as e:
                raise QemuFailed(f"cannot set up the QEMU run: {e}") from None
            try:
                asyncio.run(self._main(argv))
            except KeyboardInterrupt:
                self._end("aborted", "interrupted")
                self._finish()
                raise Interrupted(self.outcome) from None
            self._finish()
            return self.outcome
        finally:
            self._teardown()

    async def _main(self, argv: list[str]) -> None:
        from qemu.qmp import QMPClient, Runstate

        # qemu.qmp logs a traceback when QEMU drops the monitor (it dies, or we kill it):
        # that is an outcome here (crashed, hung), reported once, by us.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        qmp = QMPClient(f"faultline-{self.sc.name}")
        doorbell_conn: asyncio.Future[asyncio.StreamReader] = \
            asyncio.get_running_loop().create_future()

        async def on_doorbell(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not doorbell_conn.done():
                doorbell_conn.set_result(reader)

        server = await asyncio.start_unix_server(on_doorbell, path=str(self.paths.doorbell))
        tasks: list[asyncio.Task[Any]] = []
        try:
            await qmp.start_server(str(self.paths.qmp))
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent)
            self.pid = self.proc.pid
            self.log.emit("qemu_start", pid=self.pid, argv=argv)
            tasks.append(asyncio.create_task(self._read_stderr()))
            exited = asyncio.create_task(self.proc.wait())
            tasks.append(exited)
            accept = asyncio.create_task(qmp.accept())
            tasks.append(accept)
            await asyncio.wait({accept, exited}, timeout=START_TIMEOUT_S,
                               return_when=asyncio.FIRST_COMPLETED)
            if not accept.done() or accept.exception() is not None:
                await self._start_failed(exited, accept)
            reader = await asyncio.wait_for(doorbell_conn, START_TIMEOUT_S)
            ver = await qmp.execute("query-version")
            self.log.emit("qmp_connected", version=ver)
            self._resize_files()
            for ev in self.sc.events:
                if ev.trigger.task is None:
                    await self._fire(qmp, ev, None)
            self.last_progress = time.monotonic()
            await qmp.execute("cont")
            self.log.emit("qmp_cont")
            tasks.append(asyncio.create_task(self._doorbell_loop(qmp, reader)))
            events = asyncio.create_task(self._qmp_events(qmp))
            tasks.append(events)
            done_wait = asyncio.create_task(self.done.wait())
            tasks.append(done_wait)
            while not done_wait.done() and not exited.done():
                await asyncio.wait({done_wait, exited}, timeout=0.1,
                                   return_when=asyncio.FIRST_COMPLETED)
                limit = self.watchdog_s + (0 if self.booted else self.boot_allowance_s)
                if not self.ending and time.monotonic() - self.last_progress > limit:
                    self._end("hung", f"watchdog: no report from the guest for {limit:g} s")
                    self.log.emit("vm_hung", reason=self.outcome.reason)
            if exited.done() and not self.ending:
                await asyncio.sleep(0.05)  # let QEMU's last stderr line and events arrive
                self._crashed(exited.result())
            elif not exited.done():
                if self.outcome.vm == "hung":
                    await self._hung_stats(qmp)
                    self._kill()  # the vCPUs may be stuck; QEMU itself answers or not
                else:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(qmp.execute("quit"), QUIT_TIMEOUT_S)
                try:
                    await asyncio.wait_for(asyncio.shield(exited), QUIT_TIMEOUT_S)
                except TimeoutError:
                    self._kill()
                    await exited
            self.outcome.qemu = {**(self.outcome.qemu or {}),
                                 "exit_status": self.proc.returncode}
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if qmp.runstate in (Runstate.RUNNING, Runstate.DISCONNECTING):
                with contextlib.suppress(Exception):
                    await qmp.disconnect()
            server.close()
            self._kill()
            if self.proc is not None and self.proc.returncode is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.proc.wait(), QUIT_TIMEOUT_S)

    async def _hung_stats(self, qmp: Any) -> None:
        """Where a hung VM's vCPUs are: KVM's own counters (QMP query-stats), sampled twice
        a second apart. Page faults taken with no exit to QEMU is KVM retrying a fault it
        cannot resolve (its async page-fault path), not a guest spinning."""
        samples = []
        for i in range(2):
            try:
                res = await asyncio.wait_for(qmp.execute("query-stats", {"target": "vcpu"}), 2)
            except Exception as e:  # stats are evidence, not the verdict
                self.log.emit("qmp_stats_error", error=f"{type(e).__name__}: {e}")
                return
            samples.append([{s["name"]: s["value"] for p in v.get("providers", [v])
                             for s in p.get("stats", []) if s["name"] in KVM_STATS}
                            for v in res])
            if i == 0:
                await asyncio.sleep(1.0)
        per_vcpu = [{k: b.get(k, 0) - a.get(k, 0) for k in KVM_STATS}
                    for a, b in zip(samples[0], samples[1], strict=False)]
        self.log.emit("qemu_kvm_stats", per_second=per_vcpu)
        assert self.outcome.qemu is not None
        self.outcome.qemu["kvm_stats_per_s"] = per_vcpu
        looping = [f"vCPU {i}: {st['pf_taken']} page faults/s in KVM, "
                   f"{st['mmio_exits'] + st['io_exits']} exits to QEMU"
                   for i, st in enumerate(per_vcpu) if st["pf_taken"]]
        if looping:
            self.outcome.reason += f" ({'; '.join(looping)})"

    async def _start_failed(self, exited: asyncio.Task[int], accept: asyncio.Task[None]) -> None:
        """QEMU exited (or never connected its monitor) before the guest ran."""
        if not exited.done() and accept.done():
            # the monitor connected, then went: QEMU is on its way out (e.g. a bad -cpu)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), QUIT_TIMEOUT_S)
        if not exited.done():
            self._kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), QUIT_TIMEOUT_S)
            why = (f"its monitor failed ({accept.exception()})" if accept.done()
                   else f"it did not connect its monitor within {START_TIMEOUT_S:g} s")
            raise QemuFailed(f"QEMU failed to start: {why}"
                               + (f": {self.stderr_tail[-1]}" if self.stderr_tail else ""))
        await asyncio.sleep(0.05)  # the stderr reader's last line
        rc = exited.result()
        how = f"killed by {_signal_name(-rc)}" if rc < 0 else f"exit status {rc}"
        last = self.stderr_tail[-1] if self.stderr_tail else "no message"
        raise QemuFailed(f"QEMU failed to start ({how}): {last}")

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.stderr_tail.append(text)
                self.log.emit("qemu_stderr", text=text)

    async def _qmp_events(self, qmp: Any) -> None:
        """QEMU stopping, resetting or shutting down the VM by itself ends the run."""
        async for ev in qmp.events:
            name = ev["event"]
            data = ev.get("data", {})
            self.log.emit("qmp_event", event=name, data=data)
            if self.ending:
                continue
            if name == "SHUTDOWN":
                why = data.get("reason", "?")
                self._end(_SHUTDOWN_VM.get(why, "aborted"), f"QEMU shut the VM down ({why})")
            elif name == "GUEST_PANICKED":
                self._end("panic", f"QEMU: guest panicked ({data})")
            elif name == "STOP":
                status = (await qmp.execute("query-status")).get("status", "?")
                if status in ("internal-error", "io-error", "guest-panicked", "shutdown"):
                    last = f": {self.stderr_tail[-1]}" if self.stderr_tail else ""
                    self._end("panic" if status == "guest-panicked" else "aborted",
                              f"QEMU stopped the VM ({status}){last}")

    def _end(self, vm: str, reason: str) -> None:
        if self.ending:
            return
        self.ending = True
        self.outcome.vm = vm
        self.outcome.reason = reason
        if vm == "aborted":
            self.log.emit("vm_abort", reason=reason)
        self.done.set()

    def _crashed(self, rc: int) -> None:
        """QEMU's process died under the running guest."""
        last = self.stderr_tail[-1] if self.stderr_tail else ""
        sig = _signal_name(-rc) if rc < 0 else None
        how = f"killed by {sig}" if sig else f"exited with status {rc}"
        self._end("crashed", f"QEMU {how}" + (f": {last}" if last else ""))
        assert self.outcome.qemu is not None
        self.outcome.qemu.update({"signal": sig, "stderr": last or None})
        self.log.emit("qemu_crash", exit_status=rc, signal=sig, stderr=last or None)

    def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def _resize_files(self) -> None:
        """QEMU has mapped the full-size files: cut them to the scenario's sizes."""
        for f in self.sc.files:
            if f.size < f.window_bytes:
                os.ftruncate(self.fds[f.name], f.size)

    # --- reports ----------------------------------------------------------------------------
    async def _doorbell_loop(self, qmp: Any, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(256):
            for byte in data:
                self.doorbells += 1
                await self._on_doorbell(qmp, byte)

    async def _on_doorbell(self, qmp: Any, byte: int) -> None:
        ram = self.ram
        assert ram is not None
        gpa = abi.REPORT_BUF_GPA + byte * abi.DOORBELL_UNIT
        if gpa + _PENDING + 8 > len(ram):
            self._bad_report(f"doorbell {byte:#x}: record gpa {gpa:#x} outside RAM")
            return
        try:
            await self._report(qmp, gpa)
        finally:
            ram[gpa + _PENDING:gpa + _PENDING + 8] = bytes(8)  # the guest goes on

    async def _report(self, qmp: Any, gpa: int) -> None:
        assert self.ram is not None
        try:
            kind, vcpu, task, r = abi.decode_report(self.ram, gpa, self._task_names)
        except abi.BadReport as e:
            self._bad_report(str(e))
            return
        self.last_progress = time.monotonic()
        emit = self.log.emit
        if kind == abi.R_BOOT:
            self.booted = True
            emit("guest_boot", vcpu=vcpu, tasks=r.tasks)
        elif kind == abi.R_TASK_START:
            emit("task_start", vcpu=vcpu, task=task, insns=r.insns)
        elif kind == abi.R_STEP and task is not None:
            prog = self.sc.task(task).program
            emit("task_step", vcpu=vcpu, task=task, pc=r.pc, steps=r.steps,
                 insn=prog[r.pc].text if r.pc < len(prog) else None)
            self.steps[task] = r.steps
            await self._fire_triggers(qmp, task, r.steps, vcpu)
        elif kind == abi.R_VALUE:
            self._value(vcpu, task, r)
        elif kind == abi.R_EXIT and task is not None:
            emit("task_exit", vcpu=vcpu, task=task, code=r.code)
            self._finish_task(task, TaskOutcome("exited", r.code, None))
            # `exit` is a step (docs/scenarios.md) reported with R_EXIT: triggers fire here
            steps = self.steps.get(task, 0) + 1
            self.steps[task] = steps
            await self._fire_triggers(qmp, task, steps, vcpu)
        elif kind == abi.R_SIGNAL:
            code = abi.SI_CODES.get((r.signo, r.si_code), f"sig{r.signo}/{r.si_code}")
            emit("guest_signal", vcpu=vcpu, task=task, signo=r.signo, code=code,
                 vaddr=hex(r.vaddr), gpa=hex(r.gpa))
            if task is not None:
                self._finish_task(task, TaskOutcome(signal_fate(r.signo), None,
                                                    Signal(code, r.vaddr)))
        elif kind == abi.R_OFFLINE:
            npages = max(1, min(r.pages, 1 << 20))
            self.outcome.offlined.update(range(r.gpa, r.gpa + npages * abi.PAGE_SIZE,
                                               abi.PAGE_SIZE))
            emit("guest_memory_failure", vcpu=vcpu, gpa=hex(r.gpa), pages=npages,
                 source=r.source)
        elif kind == abi.R_EXCEPTION:
            emit("guest_exception", vcpu=vcpu, task=task, vector=r.vector,
                 error_code=hex(r.error_code), rip=hex(r.rip), cr2=hex(r.cr2))
        elif kind == abi.R_IDLE:
            emit("vcpu_idle", vcpu=vcpu)
            self.idle.add(vcpu)
        elif kind == abi.R_PANIC:
            what = abi.PANIC_NAMES.get(r.code, f"unknown panic code {r.code}")
            emit("guest_panic", vcpu=vcpu, code=r.code, what=what,
                 detail=[hex(r.detail1), hex(r.detail2), hex(r.detail3)])
            self._end("panic", f"guest panic on vCPU {vcpu}: {what}")
        else:  # R_MCE, R_NOTIFY: QEMU injected nothing of ours; log what the guest said
            emit(f"guest_{abi.REPORT_KINDS[kind]}", vcpu=vcpu, task=task,
                 **{k: hex(x) for k, x in r._asdict().items()})
        if len(self.finished_tasks) == len(self.sc.tasks) and len(self.idle) >= self.sc.vcpus:
            self.ending = True  # completed: the quit that follows is ours
            self.done.set()

    def _value(self, vcpu: int, task: str | None, r: abi.ValueReport) -> None:
        kind = abi.VALUE_OPS.get(r.op, str(r.op))
        self.log.emit("guest_value", vcpu=vcpu, task=task, op=kind, vaddr=hex(r.vaddr),
                      value=hex(r.value), gpa=hex(r.gpa))
        f = next((f for f in self.sc.files
                  if f.window_gpa <= r.gpa < f.window_gpa + f.window_bytes), None)
        if f is None:
            return
        if kind == "write":
            self.writes[r.gpa] = r.value
            return
        offset = (r.gpa & ~(abi.PAGE_SIZE - 1)) - f.window_gpa
        if offset >= os.fstat(self.fds[f.name]).st_size:
            self.outcome.bad_values.append(
                f"task {task} read {r.value:#x} from gpa {r.gpa:#x}, a page that cannot be "
                "backed")

    def _bad_report(self, why: str) -> None:
        self.bad_reports += 1
        self.log.emit("guest_bad_report", error=why)
        if self.bad_reports >= 64:
            self._end("aborted", f"guest protocol error: {self.bad_reports} bad reports")

    def _finish_task(self, task: str, fate: TaskOutcome) -> None:
        if task not in self.finished_tasks:
            self.finished_tasks.add(task)
            self.outcome.tasks[task] = fate

    # --- host events ----------------------------------------------------------------------
    async def _fire_triggers(self, qmp: Any, task: str, step: int, vcpu: int) -> None:
        for ev in self.sc.events:
            if ev.trigger.task == task and ev.trigger.step == step:
                await self._fire(qmp, ev, vcpu)

    async def _fire(self, qmp: Any, ev: HostEvent, vcpu: int | None) -> None:
        """The reporting vCPU waits for its acknowledgement; the others are stopped with
        QMP `stop` while the file changes (our VMM parks them the same way)."""
        stop = vcpu is not None and self.sc.vcpus > 1
        if stop:
            await qmp.execute("stop")
        try:
            self._change_file(ev, vcpu)
        finally:
            if stop:
                await qmp.execute("cont")

    def _change_file(self, ev: HostEvent, vcpu: int | None) -> None:
        from faultline.vmm.hostevents import apply_host_event

        i = self.sc.files.index(self.sc.file(ev.file))
        apply_host_event(ev, self.fds[ev.file], str(self.paths.windows[i]), self.log, vcpu)

    # --- end of run ---------------------------------------------------------------------------
    def _finish(self) -> None:
        o = self.outcome
        for name, t in o.tasks.items():
            if name not in self.finished_tasks:
                t.fate = unfinished_fate(o.vm)
        o.count_exit("doorbell", self.doorbells)
        self._serial()
        self._check_files()
        self.log.emit("vm_stop", vm=o.vm, reason=o.reason)
        self.log.emit("outcome", outcome=o.to_json())

    def _serial(self) -> None:
        if self.run_dir is None:
            return
        with contextlib.suppress(OSError):
            for line in self.paths.serial.read_text(errors="replace").splitlines():
                self.log.emit("serial", vcpu=None, text=line)

    def _check_files(self) -> None:
        """The DAX files must hold what the tasks wrote (where the page still exists)."""
        for gpa, value in sorted(self.writes.items()):
            f = next(f for f in self.sc.files
                     if f.window_gpa <= gpa < f.window_gpa + f.window_bytes)
            off = gpa - f.window_gpa
            fd = self.fds[f.name]
            if off + 8 > os.fstat(fd).st_size:
                continue
            got = int.from_bytes(os.pread(fd, 8, off), "little")
            if got != value:
                self.outcome.file_mismatches.append(
                    f"{f.name} +{off:#x}: the guest wrote {value:#x}, the file has {got:#x}")
        self.log.emit("file_check", writes=len(self.writes),
                      mismatches=self.outcome.file_mismatches)

    def _teardown(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            # whatever happened above (an interrupt mid-teardown): no QEMU outlives the run
            assert self.pid is not None
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        if self.ram is not None:
            self.ram.close()
            self.ram = None
        if self.own_log:
            self.log.close()
        else:
            self.log.flush()
        if not self.keep and self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def run_qemu(scenario: Scenario, *, events_path: str | Path | None = None,
             **kw: Any) -> Outcome:
    """Run a scenario under QEMU and return its outcome (the event log is written as it
    goes, also when the run fails)."""
    return QemuRun(scenario, events_path=events_path, **kw).run()


def qemu_available(binary: str | None = None) -> tuple[bool, str]:
    """Whether QEMU can be used here, and its version or why not."""
    try:
        return True, qemu_version(find_qemu(binary))
    except QemuUnavailable as e:
        return False, str(e)
