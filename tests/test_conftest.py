"""The kvm gate in conftest.py: only tests carrying the `kvm` marker skip without /dev/kvm
(not every test whose keywords mention kvm, e.g. by living in tests/kvm/)."""

from __future__ import annotations

from typing import Any

import pytest

from . import conftest


class _Item:
    def __init__(self, marked: bool) -> None:
        self.keywords = {"kvm": 1, "test_exits.py": 1}  # what a test in tests/kvm/ has
        self.marked = marked
        self.added: list[Any] = []

    def get_closest_marker(self, name: str) -> Any:
        return object() if self.marked and name == "kvm" else None

    def add_marker(self, marker: Any) -> None:
        self.added.append(marker)


def test_only_marked_tests_skip_without_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "_kvm_status", lambda: (False, "no /dev/kvm"))
    marked, unmarked = _Item(True), _Item(False)
    conftest.pytest_collection_modifyitems(None, [marked, unmarked])  # type: ignore[arg-type, list-item]
    assert len(marked.added) == 1 and unmarked.added == []
    assert marked.added[0].kwargs["reason"] == "no /dev/kvm"
