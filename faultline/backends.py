"""Pick a backend and run a scenario on it: the one entry point the CLI, the conformance
suite and the tests share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from faultline.outcome import EventLog, Outcome
from faultline.scenario import DESIGNS, POLICIES, Scenario

if TYPE_CHECKING:
    from faultline.model.design import Design


class UsageError(Exception):
    """Bad arguments (unknown design/policy/backend): one line, exit 2."""


def resolve_backend(backend: str) -> str:
    if backend not in ("kvm", "model", "qemu", "auto"):
        raise UsageError(f"unknown backend {backend!r} (one of: kvm, model, qemu, auto)")
    if backend != "auto":
        return backend
    from faultline.vmm.runner import kvm_available

    return "kvm" if kvm_available()[0] else "model"


def run_scenario(scenario: Scenario, *, backend: str = "auto",
                 design: str | Design | None = None, policy: str | None = None,
                 events_path: str | Path | None = None, log: EventLog | None = None,
                 seed: int | None = None, monitor: Any = None, profile: str | None = None,
                 **kw: Any) -> Outcome:
    """Run `scenario` on `backend` ("kvm", "model", "qemu" or "auto") and return its
    Outcome. ``design``: a model design's name, or a Design (e.g. from a design file).
    `monitor` (kvm only): a faultline.qmp.kvm.KvmMonitor, attached to the run's control
    before the VM is built. ``profile``: the model's (docs/linux-qemu.md); the kvm
    backend is faultline-vmm."""
    if monitor is not None and backend != "kvm":
        raise UsageError("a QMP monitor serves the kvm backend only (backend='kvm')")
    if backend != "model" and profile not in (None, "faultline-vmm"):
        raise UsageError(f"--profile {profile} is for the model; the {backend} backend runs "
                         "faultline's own VMM and guest (profile faultline-vmm)")
    if backend == "qemu":
        if design not in (None, "host") or policy not in (None, "qemu"):
            raise UsageError("the qemu backend runs this host's KVM under QEMU: no --design, "
                             "and no --policy (QEMU has none; its outcome says policy qemu)")
        from faultline.qemu.run import run_qemu

        return run_qemu(scenario, events_path=events_path, log=log, **kw)
    policy = policy or scenario.policies[0]
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r} (one of: {', '.join(POLICIES)})")
    backend = resolve_backend(backend)
    if backend == "kvm":
        if design not in (None, "host"):
            raise UsageError(f"--design {design} is for the model; the kvm backend runs "
                             "this host's KVM (design 'host')")
        from faultline.vmm.runner import KvmRun

        run = KvmRun(scenario, policy, events_path=events_path, log=log, **kw)
        if monitor is not None:  # a client may hold the VM's start (--qmp-wait)
            monitor.attach(run.control, scenario)
        return run.run()
    design = design or scenario.design
    if isinstance(design, str) and design not in DESIGNS:
        raise UsageError(f"unknown design {design!r} (one of: {', '.join(DESIGNS)})")
    from faultline.model.simulate import simulate

    return simulate(scenario, design, policy, seed=seed, events_path=events_path, log=log,
                    profile=profile, **kw)
