"""Smoke tests for `faultline bench`: every benchmark runs at a tiny size and returns sane,
positive numbers. No timing assertions: benchmarks are not tests."""

from __future__ import annotations

import json

import pytest

from faultline.bench import check, cli, exit_loop, fault, lookup, offline_range
from faultline.bench.common import Result
from faultline.kvm import Kvm, KvmError


def _kvm_or_skip() -> None:
    try:
        Kvm().close()
    except KvmError as e:
        pytest.skip(f"cannot open /dev/kvm: {e}")


def _positive(r: Result) -> None:
    assert r.faultline is not None and r.faultline > 0
    if r.baseline is not None:
        assert r.baseline > 0 and r.ratio is not None and r.ratio > 0
    doc = r.to_json()
    assert {"name", "unit", "faultline", "baseline", "ratio", "runs"} <= set(doc)
    json.dumps(doc)


@pytest.mark.kvm
def test_exit_loop_tiny() -> None:
    _kvm_or_skip()
    # (I(N) - I(0)) / N: N large enough that the N exits (~30 ms) outweigh a loaded host's
    # jitter on the two intervals; with 200 (~2 ms) both sides once came out negative
    r = exit_loop.run(exits=3000, runs=1)
    _positive(r)
    assert r.extra["exits"] == 3000 and r.extra["min_ratio"] > 0


@pytest.mark.kvm
def test_fault_tiny() -> None:
    _kvm_or_skip()
    r = fault.run(runs=1)
    _positive(r)
    # Both sides saw the fault arrive the same way on this host.
    assert r.extra["exit_faultline"] == r.extra["exit_baseline"]
    # The VMM's share (fault exit -> KVM_X86_SET_MCE) is part of the whole, on both sides.
    assert 0 < r.extra["faultline_vmm_us"] < r.extra["faultline_us"]
    assert 0 < r.extra["baseline_vmm_us"] < r.extra["baseline_us"]
    assert set(r.extra["warmup_us"]) == {"faultline", "baseline"}
    assert r.extra["exit_to_mce_ratio"] > 0 and r.extra["min_ratio"] > 0


@pytest.mark.kvm
def test_offline_range_tiny() -> None:
    _kvm_or_skip()
    r = offline_range.run(window_bytes=16 * 4096, runs=1)
    _positive(r)
    assert r.extra["pages"] == 8 and r.extra["guest_offline_s"] > 0


def test_lookup_tiny() -> None:
    r = lookup.run(counts=(10, 50), lookups=200)
    _positive(r)
    assert set(r.extra["by_regions"]) == {"10", "50"}


def test_check_reports_cleanly() -> None:
    r = check.run(1)
    doc = r.to_json()
    assert doc["name"] == "check"
    if doc.get("available"):
        assert r.faultline is not None and r.faultline > 0
    else:
        assert doc["faultline"] is None and doc["reason"]


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    from faultline.cli import main

    assert main(["bench", "lookup", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmarks"][0]["name"] == "lookup"
    assert cli.BENCHMARKS[0] == "exit-loop"
