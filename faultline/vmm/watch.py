"""The backing-file watcher (for a policy that declares ``watch_files``): inotify on every
window's file; on a change, the pages that became bad are notified to the guest before
anyone touches them (what to notify: ``policy.file_change_notify``)."""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path
from typing import Any

from faultline import abi
from faultline.memory import PageRanges, Region
from faultline.vmm import policy as pol
from faultline.vmm.faults import bad_ranges
from faultline.vmm.inject import Injector
from faultline.vmm.machine import Machine, VcpuState

SYNC_TIMEOUT_S = 1.0


class FileWatcher:
    def __init__(self, m: Machine, injector: Injector, run_dir: Path) -> None:
        self.m = m
        self.injector = injector
        self.run_dir = run_dir
        self.lock = threading.Lock()  # one reader of the inotify fd at a time
        self.inotify: Any = None
        self.paths: dict[int, str] = {}  # inotify wd -> window name
        self.bad_seen: dict[str, PageRanges] = {}  # window -> bad pages at the last look

    def start(self) -> None:
        from inotify_simple import INotify, flags

        m = self.m
        self.inotify = INotify()
        for r in m.memory:  # pages bad from the start (window beyond EOF) are not news
            if r.kind == "file":
                self.bad_seen[r.name] = bad_ranges(r)
        mask = flags.MODIFY | flags.ATTRIB | flags.CLOSE_WRITE
        for f in m.sc.files:
            wd = self.inotify.add_watch(str(self.run_dir / f.path), mask)
            self.paths[wd] = f.name
        m.log.emit("vmm_watch", files=[f.name for f in m.sc.files])
        threading.Thread(target=self._thread, name="watch", daemon=True).start()

    def close(self) -> None:
        with self.lock:
            if self.inotify is not None:
                self.inotify.close()
                self.inotify = None

    def _thread(self) -> None:
        while not self.m.stopping and self.inotify is not None:
            try:
                ready, _, _ = select.select([self.inotify.fileno()], [], [], 0.1)
                if ready:
                    self.poll(None)
            except (OSError, ValueError):
                return

    def poll(self, v: VcpuState | None) -> int:
        """Read pending inotify events (the change may come from any process) and notify
        the guest of every page that became bad and that it was not told about yet
        (vCPU v takes the interrupt; None: the first running vCPU). Returns the number of
        pages notified. Never blocks on the VM lock while reading."""
        m = self.m
        with self.lock:
            ino = self.inotify
            if ino is None:
                return 0
            events = ino.read(timeout=0)
            names = sorted({n for e in events if (n := self.paths.get(e.wd))})
            total = 0
            for name in names:
                region = m.memory.region(name)
                size = os.fstat(region.fd).st_size
                now_bad = bad_ranges(region)
                eof_page = -(-max(size - region.file_offset, 0) // abi.PAGE_SIZE)
                d = pol.file_change_notify(now_bad, self.bad_seen.get(name, PageRanges()),
                                           m.notified, region.gpa + eof_page * abi.PAGE_SIZE)
                self.bad_seen[name] = now_bad
                m.log.emit("vmm_file_change", file=name, size_before=m.known_size[name],
                           size_after=size, bad_pages=sum(n for _, n, _ in d.ranges) if d else 0)
                m.known_size[name] = size
                target = v if v is not None else m.irq_target()
                if d is not None and target is not None:
                    self.injector.notify(target, d.ranges, ar_gpa=None)
                    total += sum(n for _, n, _ in d.ranges)
            return total

    def sync(self, v: VcpuState | None, region: Region) -> None:
        """After a host event the run itself caused: wait (briefly) until the watcher has
        seen it, so the policy really acts before the guest runs on."""
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while time.monotonic() < deadline:
            if bad_ranges(region) == self.bad_seen.get(region.name):
                return
            self.poll(v)
            time.sleep(0.001)
        self.m.log.emit("vmm_watch_timeout", file=region.name)
