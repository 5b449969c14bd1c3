"""The monitor on a kvm run: :class:`~faultline.qmp.control.VmControl` over the run's
:class:`~faultline.vmm.control.RunControl`, and the monitor's life around the run.

``faultline run SCENARIO --qmp PATH [--qmp-wait]``: the CLI makes a :class:`KvmMonitor`
(the socket is bound then: a bad path fails before any VM is built), the kvm backend
hands it the run's control before the VM is built (:meth:`attach`: the server starts and
follows the run's event log; with ``--qmp-wait`` the vCPUs are held before their first
KVM_RUN), and the CLI closes it after the run, also after SIGINT (the clients get the
SHUTDOWN event, the socket is removed).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from faultline.qmp import control as ctl
from faultline.qmp.server import QmpServer

if TYPE_CHECKING:
    from faultline.scenario import Scenario
    from faultline.vmm.control import RunControl


class KvmControl:
    """VmControl for a kvm run. ``wait``: the run was started held (--qmp-wait): QEMU's
    ``prelaunch`` until the first ``cont``."""

    def __init__(self, rc: RunControl, scenario: Scenario, wait: bool) -> None:
        self._rc = rc
        self._sc = scenario
        self._prelaunch = wait
        self._paused = False  # by `stop` (also while the VM is still being built)

    def run_state(self) -> str:
        if self._rc.state() == "stopped":
            return ctl.SHUTDOWN
        if self._prelaunch:
            return ctl.PRELAUNCH
        return ctl.PAUSED if self._paused else ctl.RUNNING

    def pause(self) -> None:
        # False: a vCPU did not park in time (it parks at its next exit); paused anyway.
        self._rc.pause()
        self._paused = True

    def resume(self) -> None:
        self._prelaunch = self._paused = False
        self._rc.resume()

    def request_stop(self, reason: str) -> None:
        self._rc.request_stop(reason)

    def host_events(self) -> list[dict[str, Any]]:
        return [{"index": i, "action": ev.action, "file": ev.file, "trigger": str(ev.trigger)}
                for i, ev in enumerate(self._sc.events)]

    def fire_host_event(self, index: int) -> dict[str, Any]:
        n = len(self._sc.events)
        if not 0 <= index < n:
            raise ctl.ControlError(f"the scenario has no host event {index} (it has {n})")
        # The backing files exist once the VM is built: a command early in the run waits
        # for that (a second or so at most) rather than fail.
        deadline = time.monotonic() + 60.0
        while self._rc.state() == "setup":
            if time.monotonic() > deadline:
                raise ctl.ControlError("the VM is still being set up")
            time.sleep(0.01)
        if self._rc.state() == "stopped":
            raise ctl.ControlError("the run has ended")
        self._rc.fire_event(index)
        return {}


class KvmMonitor:
    """A QMP monitor for one kvm run, from :meth:`attach` (given to the backend) to
    :meth:`close` (after the run, whatever its end)."""

    def __init__(self, path: str | Path, *, wait: bool = False) -> None:
        """Binds the socket: QmpSetupError (one line) if it cannot be."""
        self.path = Path(path)
        self.wait = wait
        self.server: QmpServer | None = QmpServer(self.path)
        self.server.bind()
        self._unsubscribe: Any = None

    def attach(self, rc: RunControl, scenario: Scenario) -> None:
        """Serve the run: follow its event log and, with ``wait``, hold the vCPUs until a
        client sends ``cont``."""
        server = self.server
        assert server is not None, "KvmMonitor.attach() after close()"
        server.control = KvmControl(rc, scenario, self.wait)
        self._unsubscribe = rc.subscribe(server.feed)
        if self.wait:
            # Held before anyone is served: a client's `cont` as soon as it connects (it
            # sees prelaunch) must find the VM held, or the hold would come after it and
            # keep the vCPUs parked for good.
            rc.pause()
        server.start()

    def close(self, *, interrupted: bool = False) -> None:
        """After the run: deliver what is queued (SHUTDOWN), hang up, remove the socket.
        ``interrupted``: SIGINT/SIGTERM ended it (the SHUTDOWN reason if the run could
        not log its end)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.server is not None:
            self.server.close(interrupted=interrupted)
            self.server = None
