"""Property tests over random small scenarios (hypothesis)."""

from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultline import scenario
from faultline.model.system import System
from faultline.scenario import DESIGNS, POLICIES

PAGES = 3


@st.composite
def small_scenarios(draw):
    vcpus = draw(st.integers(1, 2))
    ntasks = draw(st.integers(1, 3))
    tasks = []
    for i in range(ntasks):
        prog = []
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["read", "kread", "write", "yield", "anon"]))
            page = draw(st.integers(0, PAGES - 1))
            if op == "read":
                prog.append(f"read dax0[{page}] expect=@")
            elif op == "kread":
                prog.append(f"kread dax0[{page}]")
            elif op == "write":
                prog.append(f"write dax0[{page}] {draw(st.integers(1, 9))}")
            elif op == "anon":
                prog.append("write anon[0] 0x77")
            else:
                prog.append("yield")
        prog.append("exit 0")
        tasks.append({"name": f"t{i}", "vcpu": draw(st.integers(0, vcpus - 1)), "program": prog,
                      "early_kill": draw(st.booleans())})
    events = []
    for _ in range(draw(st.integers(0, 2))):
        action = draw(st.sampled_from(["truncate", "punch-hole", "poison", "extend"]))
        t = draw(st.integers(0, ntasks - 1))
        after = draw(st.sampled_from(["start", f"t{t}:1"]))
        ev = {"action": action, "file": "dax0", "after": after}
        if action in ("truncate", "extend"):
            ev["size"] = draw(st.sampled_from([0, 0x1000, 0x1800, 0x2000, 0x3000]))
        else:
            ev["offset"] = draw(st.integers(0, PAGES - 1)) * 0x1000
            ev["length"] = 0x1000
        events.append(ev)
    raw = {"name": "prop", "vm": {"vcpus": vcpus, "apf": draw(st.booleans())},
           "files": [{"name": "dax0", "size": PAGES * 0x1000}], "tasks": tasks,
           "events": events}
    design = draw(st.sampled_from(DESIGNS))
    policy = draw(st.sampled_from(POLICIES))
    params = {"cached_at_start": draw(st.booleans()),
              "kernel_irqs_on": draw(st.booleans()),
              "async_pf_per_vcpu": draw(st.sampled_from([1, 2, 64])),
              "hash_size": 64}
    return scenario.from_dict(raw, source="prop"), design, policy, params


def _explore(system, limit=1500):
    s0 = system.init()
    seen = {s0}
    q = deque([s0])
    while q and len(seen) < limit:
        s = q.popleft()
        yield s
        for _name, n in system.actions(s):
            if n not in seen:
                seen.add(n)
                q.append(n)


_SETTINGS = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


def _canon(x):
    """Every component is a tuple / int / str / bool: no dataclasses, lists, sets."""
    if isinstance(x, tuple):
        return all(_canon(y) for y in x)
    return isinstance(x, (int, str, bool))


@_SETTINGS
@given(small_scenarios())
def test_states_hashable_canonical_and_actions_deterministic(case):
    sc, design, policy, params = case
    a = System(sc, design, policy, **params)
    b = System(sc, design, policy, **params)
    assert a.init() == b.init() and hash(a.init()) == hash(b.init())
    for i, s in enumerate(_explore(a, 400)):
        assert _canon(s)
        hash(s)
        first = a.actions(s)
        assert first == a.actions(s) == b.actions(s)
        names = [n for n, _ in first]
        assert len(names) == len(set(names))
        if i > 200:
            break


@_SETTINGS
@given(small_scenarios())
def test_no_read_ever_completes_from_beyond_eof(case):
    sc, design, policy, params = case
    system = System(sc, design, policy, **params)
    events = []
    for s in _explore(system):
        assert system.bad_reads(s) == 0
    # And on one traced run, every value a task read came from a page within EOF.
    from faultline.model import simulate
    o = simulate(sc, design, policy, seed=1, max_steps=3000, **params)
    assert not o.bad_values
    size = sc.files[0].size
    for e in o.events:
        if e["kind"] in ("host_truncate", "host_extend"):
            size = e["new_size"]
        elif e["kind"] == "task_value" and int(e["gpa"], 16) >= sc.files[0].window_gpa:
            off = int(e["gpa"], 16) - sc.files[0].window_gpa
            assert (off & ~0xFFF) < size, e
    del events


@_SETTINGS
@given(small_scenarios())
def test_simulation_always_ends(case):
    sc, design, policy, params = case
    o = simulate_any(sc, design, policy, params)
    assert o.vm in ("completed", "aborted", "hung", "crashed", "reset", "panic")
    assert o.vm == "completed" or o.reason
    for name, t in o.tasks.items():
        # lost: gone with the VMM process, and only then
        assert t.fate in ("exited", "sigbus", "killed", "hung", "lost"), name
        assert (t.fate == "lost") <= (o.vm == "crashed"), name


def simulate_any(sc, design, policy, params):
    from faultline.model import simulate
    return simulate(sc, design, policy, max_steps=5000, **params)
