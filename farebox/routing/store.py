"""Hot reload of the catalog and policy files for long-running workers.

``current()`` is on the routing hot path, so it only looks at the clock most of the time and stats the two
files at most every ``check_interval_s``. A changed pair is loaded and cross-checked as a unit; if that fails,
the previous pair keeps serving and the failure is logged once per distinct broken file state, so a bad edit
produces one clear line instead of one per check. The pair served is the cross-checked one: a default or
baseline model the catalog lacks is replaced by its fallback (farebox/routing/policy.py), and each check
warning, that one included, is logged once, not again on every reload that still has it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from farebox.routing.catalog import Catalog, CatalogError, load_catalog
from farebox.routing.policy import Policy, checked_policy, load_policy

log = logging.getLogger("farebox.catalog")

# (mtime_ns, size, inode) per file; None when the file cannot be stat'ed.
_Stamp = tuple[int, int, int] | None


def _stamp(path: Path) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_pair(catalog_path: Path, policy_path: Path) -> tuple[Catalog, Policy, list[str]]:
    """(catalog, the policy to route with, check warnings); CatalogError when the pair is unusable."""
    catalog = load_catalog(catalog_path)
    policy, warnings = checked_policy(load_policy(policy_path), catalog, str(policy_path))
    return catalog, policy, warnings


class CatalogStore:
    def __init__(
        self,
        catalog_path: Path,
        policy_path: Path,
        *,
        check_interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._paths = (Path(catalog_path), Path(policy_path))
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # The first load must succeed: with nothing to fall back on, the caller has to see the error.
        self._stamps = self._read_stamps()
        catalog, policy, warnings = load_pair(*self._paths)
        self._pair = (catalog, policy)
        self._warned: frozenset[str] = frozenset()
        self._log_warnings(warnings)
        self._next_check = clock() + check_interval_s
        self._refused: tuple[_Stamp, _Stamp] | None = None
        self.reloads = 0
        self.last_error: str | None = None

    def _log_warnings(self, warnings: list[str]) -> None:
        for w in warnings:
            if w not in self._warned:
                log.warning("catalog check: %s", w)
        self._warned = frozenset(warnings)

    def _read_stamps(self) -> tuple[_Stamp, _Stamp]:
        return (_stamp(self._paths[0]), _stamp(self._paths[1]))

    def current(self) -> tuple[Catalog, Policy]:
        if self._clock() < self._next_check:
            return self._pair
        with self._lock:
            now = self._clock()
            if now >= self._next_check:
                self._next_check = now + self._interval
                self._maybe_reload()
            return self._pair

    def _maybe_reload(self) -> None:
        stamps = self._read_stamps()
        if stamps == self._stamps or stamps == self._refused:
            return
        try:
            catalog, policy, warnings = load_pair(*self._paths)
        except CatalogError as exc:
            self._refused = stamps
            self.last_error = str(exc)
            log.error("catalog reload refused, still serving the previous version: %s", exc)
            return
        self._pair = (catalog, policy)
        self._log_warnings(warnings)
        self._stamps = stamps
        self._refused = None
        self.last_error = None
        self.reloads += 1
        log.info("catalog reloaded: %d models from %s, policy %s", len(catalog), *self._paths)
