"""Designs as plug-ins: a design file loaded from outside the package checks exactly like
the shipped design it copies, and every way a design file can be unusable is one clear
line naming the file (and the hook) with exit 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from faultline import cli
from faultline.check import cli as check_cli
from faultline.check.properties import check_system
from faultline.model import System
from faultline.model.designs import SHIPPED, DesignError, load_design_file
from faultline.scenario import POLICIES, load
from tests.conftest import SCENARIOS

DESIGNS_DIR = Path(__file__).resolve().parents[2] / "faultline" / "model" / "designs"
STANDARD = SCENARIOS / "check-standard.toml"


def _copy(tmp_path: Path, shipped: str, new_name: str) -> Path:
    """The shipped design's file, renamed, in a directory outside the package."""
    text = (DESIGNS_DIR / f"{SHIPPED[shipped]}.py").read_text()
    assert f'name = "{shipped}"' in text
    out = tmp_path / f"{SHIPPED[shipped]}_copy.py"
    out.write_text(text.replace(f'name = "{shipped}"', f'name = "{new_name}"'))
    return out


def _results(system: System) -> dict:
    r = check_system(system)
    return {"states": r.states, "transitions": r.transitions,
            "props": {n: (p.holds, [st["action"] for st in p.counterexample])
                      for n, p in r.properties.items()}}


@pytest.mark.parametrize("shipped", sorted(SHIPPED))
def test_a_copied_design_checks_like_the_shipped_one(tmp_path: Path, shipped: str) -> None:
    path = _copy(tmp_path, shipped, f"my-{shipped}")
    sc = load(STANDARD)
    for policy in POLICIES:
        mine = System(sc, str(path), policy)
        assert mine.design == f"my-{shipped}"
        assert _results(mine) == _results(System(sc, shipped, policy)), policy


def _check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    check_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["check", *argv])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_check_design_file_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _copy(tmp_path, "request", "my-request")
    rc, out, _err = _check([str(STANDARD), "--design", "request", "--design-file", str(path),
                            "--json", "--workers", "2"], capsys)
    assert rc == 0
    cells = {(c["design"], c["policy"]): c for c in json.loads(out)["cells"]}
    for policy in POLICIES:
        a, b = cells[("request", policy)], cells[("my-request", policy)]
        assert (a["states"], a["properties"]) == (b["states"], b["properties"])


def test_run_design_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _copy(tmp_path, "error-gfn", "my-error-gfn")
    rc = cli.main(["run", str(SCENARIOS / "dax-truncate.toml"), "--backend", "model",
                   "--design-file", str(path), "--policy", "mce", "--json",
                   "--events", str(tmp_path / "ev.jsonl")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["design"] == "my-error-gfn"
    assert out["tasks"]["toucher"]["signal"]["code"] == "BUS_MCEERR_AR"


HEADER = "from faultline.model.design import Design\n"
BAD = {
    "syntax": ("def (:\n", "does not import: SyntaxError"),
    "raises": ("raise RuntimeError('boom')\n", "does not import: RuntimeError: boom"),
    "missing-import": ("import no_such_module_here\n", "does not import: ModuleNotFoundError"),
    "no-design": (HEADER + "X = 1\n", "defines no design"),
    "two-designs": (HEADER + "class A(Design):\n    name = 'a'\nclass B(Design):\n"
                    "    name = 'b'\n", "defines several designs (A, B)"),
    "not-a-design": ("DESIGN = 42\n", "DESIGN is a int, not a Design"),
    "shipped-name": (HEADER + "class U(Design):\n    name = 'upstream'\n",
                     "design name 'upstream' is a shipped design's"),
    "unhashable": (HEADER + "class U(Design):\n    name = 'u'\n    vcpu_init = []\n",
                   "vcpu_init must be hashable"),
}
# Fails only once the model runs it: named with the hook.
HOOK_RAISES = (HEADER + "class Boom(Design):\n    name = 'boom'\n"
               "    def kvm_arch_async_page_ready(self, m, s, v, work, failed):\n"
               "        raise KeyError('oops')\n")
HOOK_RETURNS = (HEADER + "class Bad(Design):\n    name = 'bad'\n"
                "    def kvm_mmu_faultin_pfn(self, m, s, v, t, gfn):\n        return True\n")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_design_file(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    text, want = BAD[case]
    path = tmp_path / "d.py"
    path.write_text(text)
    with pytest.raises(DesignError, match=str(path)):
        load_design_file(path)
    rc, out, err = _check([str(STANDARD), "--design-file", str(path)], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and str(path) in err and want in err, err
    rc = cli.main(["run", str(STANDARD), "--backend", "model", "--design-file", str(path),
                   "--events", str(tmp_path / "ev.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and want in err, err
    assert not (tmp_path / "ev.jsonl").exists()


def test_missing_design_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _out, err = _check([str(STANDARD), "--design-file", str(tmp_path / "nope.py")], capsys)
    assert rc == 2 and "no such design file" in err and err.count("\n") == 1


@pytest.mark.parametrize(("text", "want"), [
    (HOOK_RAISES, "hook kvm_arch_async_page_ready raised KeyError: 'oops'"),
    (HOOK_RETURNS, "hook kvm_mmu_faultin_pfn returned bool, expected (bool, State)"),
])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_failing_hook_is_named(tmp_path: Path, text: str, want: str, workers: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.py"
    path.write_text(text)
    rc, _out, err = _check([str(STANDARD), "--design-file", str(path), "--policy", "mce",
                           "--workers", workers], capsys)
    assert rc == 2 and err == f"faultline: error: {path}: {want}\n"
    rc = cli.main(["run", str(STANDARD), "--backend", "model", "--design-file", str(path),
                   "--policy", "mce", "--events", str(tmp_path / "ev.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.endswith(f"{path}: {want}\n") and err.count("\n") == 1, err


def test_the_worked_example_of_docs_designs_md() -> None:
    # docs/designs.md shows this design's matrix: the same failing properties as request
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "retry_exit.py"
    sc = load(STANDARD)
    for policy, states in (("abort", 335), ("mce", 543), ("notify", 575), ("proactive", 203)):
        # (docs/designs.md runs it under faultline-vmm, the profile of the shipped matrix)
        r = check_system(System(sc, str(path), policy, symmetry=True, profile="faultline-vmm"))
        assert r.states == states
        assert r.failing() == (["vm_survives"] if policy == "abort" else []), policy
