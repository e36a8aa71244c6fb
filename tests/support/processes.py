"""Stopping the servers a test started: SIGTERM to all, then SIGKILL to any that has not exited in time."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable


def stop_all(processes: Iterable[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    procs = list(processes)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
