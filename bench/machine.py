"""This machine, as the measurements see it: memory sampling inside a worker (anonymous RSS), dropping the
page cache, and the environment recorded with the results."""

from __future__ import annotations

import os
import platform
import threading
import time

GB = 1e9


def statm() -> tuple[int, int]:
    """(resident, anonymous) bytes of this process: anonymous = resident - file-backed/shared pages."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    resident, shared = int(fields[1]) * page, int(fields[2]) * page
    return resident, resident - shared


class PeakSampler:
    """Samples this process's anonymous RSS every `interval` s on a thread; `phase()` restarts the peak."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, statm()[1])
            time.sleep(self.interval)

    def phase(self) -> int:
        """Start a new phase; answers the anonymous RSS now (the phase's baseline)."""
        now = statm()[1]
        self.peak = now
        return now

    def end(self) -> int:
        self.peak = max(self.peak, statm()[1])
        return self.peak

    def stop(self):
        self._stop.set()


def drop_caches() -> bool:
    """sync and drop the page cache (needs root); False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def environment() -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "?"

    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) * 1024 / 2**30
    return {"machine": platform.machine() + " " + platform.processor(), "cpus": os.cpu_count(), "ram_gb": ram,
            "python": platform.python_version(), "torch": version("torch"), "megatron_core": version("megatron-core"),
            "transformers": version("transformers"), "safetensors": version("safetensors")}
