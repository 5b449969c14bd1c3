"""Shared fixtures. Tests marked `kvm` need a usable /dev/kvm; where it is absent they are
skipped with the reason printed (pytest -ra shows it)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


@functools.cache
def _kvm_status() -> tuple[bool, str]:
    try:
        from faultline.kvm import Kvm

        with Kvm() as k:
            return True, f"KVM API {k.api_version()}"
    except Exception as e:  # any failure to open means: skip, and say why
        return False, f"/dev/kvm is not usable here: {e}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ok, why = _kvm_status()
    if ok:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        # the marker, not item.keywords: keywords also hold the directory names (tests/kvm)
        if item.get_closest_marker("kvm") is not None:
            item.add_marker(skip)


@pytest.fixture
def scenarios_dir() -> Path:
    return SCENARIOS
