"""lookup: GPA -> region -> file/offset with faultline.memory.GuestMemory (bisect over the
sorted region starts) at 100 / 1,000 / 10,000 file-backed regions, against a linear scan of
the same regions in the same process (the baseline). Also the full resolve() without and
with its /proc/self/maps cross-check at the largest count (the latter is what the fault
path does, and it grows with the number of mappings)."""

from __future__ import annotations

import os
import random
import time

from faultline import abi
from faultline.bench.common import Result, scratch
from faultline.memory import GuestMemory, Region

BASE_GPA = 0x1_0000_0000


def _per_lookup_ns(fn: object, gpas: list[int]) -> float:
    f = fn  # local for the loop
    t = time.perf_counter_ns()
    for g in gpas:
        f(g)  # type: ignore[operator]
    return (time.perf_counter_ns() - t) / len(gpas)


def _linear(regions: list[Region]) -> object:
    def find(gpa: int) -> int | None:
        for r in regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.file_offset + (gpa - r.gpa)
        return None
    return find


def run(counts: tuple[int, ...] = (100, 1_000, 10_000), lookups: int = 20_000) -> Result:
    rng = random.Random(1)
    per_count: dict[str, dict[str, float]] = {}
    extra: dict[str, object] = {}
    with scratch("faultline-bench-") as d:
        path = d / "backing"
        with open(path, "wb") as f:
            f.truncate(max(counts) * abi.PAGE_SIZE)  # sparse: one page per region
        for n in counts:
            with GuestMemory() as mem:
                # Regions two pages apart (a gap between each): misses are possible too.
                for i in range(n):
                    mem.add_file(f"r{i}", BASE_GPA + 2 * i * abi.PAGE_SIZE, path,
                                 file_offset=i * abi.PAGE_SIZE, size=abi.PAGE_SIZE)
                span = 2 * n * abi.PAGE_SIZE
                gpas = [BASE_GPA + rng.randrange(span) for _ in range(lookups)]

                def bisect_lookup(gpa: int, mem: GuestMemory = mem) -> int | None:
                    r = mem.find_region(gpa)
                    return None if r is None else r.file_offset_of(gpa)

                fl = _per_lookup_ns(bisect_lookup, gpas)
                lin_gpas = gpas[: max(200, lookups * 100 // n)]  # linear is slow at 10k
                lin = _per_lookup_ns(_linear(list(mem)), lin_gpas)
                per_count[str(n)] = {"faultline_ns": round(fl, 1), "linear_ns": round(lin, 1)}
                if n == max(counts):
                    hits = [g for g in gpas if mem.find_region(g) is not None][:500]
                    extra["resolve_no_maps_us"] = round(_per_lookup_ns(
                        lambda g, m=mem: m.resolve(g, cross_check=False), hits) / 1000, 2)
                    extra["resolve_with_maps_us"] = round(_per_lookup_ns(
                        lambda g, m=mem: m.resolve(g), hits[:20]) / 1000, 1)
                    extra["process_mappings"] = sum(1 for _ in open(f"/proc/{os.getpid()}/maps"))
    top = per_count[str(max(counts))]
    return Result("lookup", "ns/lookup", top["faultline_ns"], top["linear_ns"], 1,
                  {"regions": max(counts), "by_regions": per_count, "lookups": lookups,
                   **extra})
