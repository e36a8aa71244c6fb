"""A settable clock and a file writer that makes each change visible, for the hot-reload tests."""

from __future__ import annotations

import json
import os
from pathlib import Path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, data: object, bump: int) -> None:
    """Write ``data`` (JSON unless a string) and move the mtime ``bump`` seconds on, so that filesystems
    with coarse mtimes still show the change."""
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))
