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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from farebox.routing.catalog import Catalog, CatalogError, load_catalog
from farebox.routing.learned import LearnedRouter
from farebox.routing.policy import (
    Policy,
    checked_policy,
    load_policy,
    load_policy_router,
    load_rule_router,
    router_location,
    rule_location,
)
from farebox.routing.strategies import FixedModel

log = logging.getLogger("farebox.catalog")

# (mtime_ns, size, inode) per file; None when the file cannot be stat'ed.
_Stamp = tuple[int, int, int] | None
_Stamps = tuple[_Stamp, _Stamp, _Stamp]  # catalog, policy, router file (None: rules or builtin router)
Unit = tuple[Catalog, Policy, LearnedRouter | None]


@dataclass(frozen=True)
class ArmPlan:
    """How an experiment arm routes: the policy with the arm's router in place of the policy's, that router
    (None for rules), or a fixed model. Built once per load, so a job in an arm costs no more to route."""

    policy: Policy
    router: LearnedRouter | None
    model: str | None = None


@dataclass(frozen=True)
class Routing:
    """One consistent unit, as loaded together: catalog, policy, its learned router and the experiments' arms."""

    catalog: Catalog
    policy: Policy
    router: LearnedRouter | None
    arms: Mapping[tuple[str, str], ArmPlan] = field(default_factory=dict)  # (experiment, arm) -> plan

    @property
    def unit(self) -> Unit:
        return self.catalog, self.policy, self.router


def arm_plans(policy: Policy, policy_path: Path, router: LearnedRouter | None) -> dict[tuple[str, str], ArmPlan]:
    """The plan of every arm of the policy's experiments; a router file is read once however many arms use it
    (the policy's own router is reused). CatalogError names the arm whose router file cannot be read."""
    loaded: dict[str, LearnedRouter | None] = {str(router_location(policy, policy_path)): router}
    plans: dict[tuple[str, str], ArmPlan] = {}
    for experiment in policy.experiments:
        for arm in experiment.arms:
            strategy = arm.strategy
            if isinstance(strategy, FixedModel):
                plans[experiment.name, arm.name] = ArmPlan(policy, router, strategy.model)  # pinned: never scored
                continue
            where = str(rule_location(strategy, policy_path))
            if where not in loaded:
                loaded[where] = load_rule_router(strategy, policy_path, f"experiments.{experiment.name}.{arm.name}")
            plans[experiment.name, arm.name] = ArmPlan(policy.model_copy(update={"router": strategy}), loaded[where])
    return plans


def load_routing(catalog_path: Path, policy_path: Path) -> tuple[Routing, list[str]]:
    catalog, policy, router, warnings = load_pair(catalog_path, policy_path)
    return Routing(catalog, policy, router, arm_plans(policy, policy_path, router)), warnings


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
        routing, warnings = load_routing(*self._paths)
        self._routing = routing
        self._watched(router_file(routing.policy, self._paths[1]))
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
        return self.current_routing().unit

    def current_routing(self) -> Routing:
        """The unit in force, with the experiments' arm plans."""
        if self._clock() < self._next_check:
            return self._routing
        with self._lock:
            now = self._clock()
            if now >= self._next_check:
                self._next_check = now + self._interval
                self._maybe_reload()
            return self._routing

    def _maybe_reload(self) -> None:
        stamps = self._read_stamps()
        if stamps == self._stamps or stamps == self._refused:
            return
        try:
            routing, warnings = load_routing(*self._paths)
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
        self._routing = routing
        self._log_warnings(warnings)
        self._stamps = stamps
        self._watched(router_file(routing.policy, self._paths[1]))
        self._refused = None
        self.last_error = None
        self.reloads += 1
        routed_by = routing.router.describe() if routing.router is not None else "rules"
        log.info(
            "catalog reloaded: %d models from %s, policy %s, router %s, %d experiment(s)",
            len(routing.catalog),
            *self._paths,
            routed_by,
            len(routing.policy.experiments),
        )
