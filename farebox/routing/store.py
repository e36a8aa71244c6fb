"""Hot reload of the catalog and policy files, and the learned router file the policy names, for long-running
workers.

``current()`` is on the routing hot path, so it only looks at the clock most of the time and stats the
files at most every ``check_interval_s``. A changed file is loaded and cross-checked with the others as a
unit (catalog, policy, router: a router file retrained in place reloads like an edited policy); if that fails,
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
from farebox.routing.learned import LearnedRouter
from farebox.routing.policy import Policy, checked_policy, load_policy, load_policy_router, router_location

log = logging.getLogger("farebox.catalog")

# (mtime_ns, size, inode) per file; None when the file cannot be stat'ed.
_Stamp = tuple[int, int, int] | None
_Stamps = tuple[_Stamp, _Stamp, _Stamp]  # catalog, policy, router file (None: rules or builtin router)
Unit = tuple[Catalog, Policy, LearnedRouter | None]


def _stamp(path: Path | None) -> _Stamp:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_pair(catalog_path: Path, policy_path: Path) -> tuple[Catalog, Policy, LearnedRouter | None, list[str]]:
    """(catalog, the policy to route with, its learned router or None, check warnings); CatalogError when
    the unit is unusable (a router file missing or corrupt included)."""
    catalog = load_catalog(catalog_path)
    policy, warnings = checked_policy(load_policy(policy_path), catalog, str(policy_path))
    return catalog, policy, load_policy_router(policy, policy_path), warnings


def router_file(policy: Policy, policy_path: Path) -> Path | None:
    """The router file to watch for ``policy`` (None for the rules router and the builtin one)."""
    where = router_location(policy, policy_path)
    return where if isinstance(where, Path) else None


def _named_router_file(policy_path: Path) -> Path | None:
    """The router file a policy file names, if it parses (to watch it while a reload of it is refused)."""
    try:
        return router_file(load_policy(policy_path), policy_path)
    except CatalogError:
        return None


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
        self._watch: Path | None = None
        self._stamps = self._read_stamps()
        catalog, policy, router, warnings = load_pair(*self._paths)
        self._unit: Unit = (catalog, policy, router)
        self._watched(router_file(policy, self._paths[1]))
        self._warned: frozenset[str] = frozenset()
        self._log_warnings(warnings)
        self._next_check = clock() + check_interval_s
        self._refused: _Stamps | None = None
        self.reloads = 0
        self.last_error: str | None = None

    def _log_warnings(self, warnings: list[str]) -> None:
        for w in warnings:
            if w not in self._warned:
                log.warning("catalog check: %s", w)
        self._warned = frozenset(warnings)

    def _read_stamps(self) -> _Stamps:
        return (_stamp(self._paths[0]), _stamp(self._paths[1]), _stamp(self._watch))

    def _watched(self, path: Path | None) -> None:
        """Watch ``path`` as the router file from now on (the one the policy just loaded or refused names)."""
        if path != self._watch:
            self._watch = path
            self._stamps = (*self._stamps[:2], _stamp(path))

    def current(self) -> tuple[Catalog, Policy]:
        catalog, policy, _ = self.current_unit()
        return catalog, policy

    def current_unit(self) -> Unit:
        """(catalog, policy, learned router or None): one consistent unit, as loaded together."""
        if self._clock() < self._next_check:
            return self._unit
        with self._lock:
            now = self._clock()
            if now >= self._next_check:
                self._next_check = now + self._interval
                self._maybe_reload()
            return self._unit

    def _maybe_reload(self) -> None:
        stamps = self._read_stamps()
        if stamps == self._stamps or stamps == self._refused:
            return
        try:
            catalog, policy, router, warnings = load_pair(*self._paths)
        except CatalogError as exc:
            # Watch the router file the refused policy names: writing (or fixing) it is then seen as a change.
            watch = _named_router_file(self._paths[1])
            if watch != self._watch:
                self._watch = watch
                stamps = (*stamps[:2], _stamp(watch))
            self._refused = stamps
            self.last_error = str(exc)
            log.error("catalog reload refused, still serving the previous version: %s", exc)
            return
        self._unit = (catalog, policy, router)
        self._log_warnings(warnings)
        self._stamps = stamps
        self._watched(router_file(policy, self._paths[1]))
        self._refused = None
        self.last_error = None
        self.reloads += 1
        routed_by = router.describe() if router is not None else "rules"
        log.info("catalog reloaded: %d models from %s, policy %s, router %s", len(catalog), *self._paths, routed_by)
