"""The real VMM (the kvm backend). Its run defaults live here, importable without the KVM
bindings (the CLI shows them in --help)."""

DEFAULT_WATCHDOG_S = 10.0  # no vCPU made progress for this long after boot: hung
DEFAULT_MAX_STEPS = 1_000_000  # guest steps, every task's together: past it, hung
DEFAULT_MAX_SECONDS = 600.0  # wall time from the vCPUs' start: past it, hung
