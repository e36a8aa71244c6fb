"""The policy and catalog published once to Redis (``farebox policy push``) instead of files on every host.

A pushed version is a *bundle*: the policy file, the catalog file and the learned router files the policy
names by a relative path (its router and its experiment arms' routers), each under its path relative to the
policy's folder. ``push`` checks the bundle as a worker would load it and refuses it in one line otherwise;
versions are numbered 1, 2, ... and the newest ``VERSIONS_KEPT`` are kept.

A worker with ``FAREBOX_CONFIG_SOURCE=redis`` writes the newest version into a folder of its own and points
``current`` at it (a symbolic link replaced in one rename), and the hot reload of the files
(farebox/routing/store.py) does the rest: it sees the change within its check interval, loads and
cross-checks the unit, and keeps serving the previous one, with one log line, if the new one is unusable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from redis.asyncio import Redis

from farebox.constants import RedisKeys, as_text
from farebox.errors import REDIS_DOWN, InvalidRequest
from farebox.routing.catalog import CatalogError
from farebox.routing.policy import load_policy, rule_location
from farebox.routing.store import load_routing
from farebox.routing.strategies import FixedModel
from farebox.stages.lua import Layout, NamedScript

log = logging.getLogger("farebox.config")

POLICY_FILE = "policy.json"
CATALOG_FILE = "model_costs.json"
META = "_meta"
VERSIONS_KEPT = 10
MAX_BUNDLE_BYTES = 64 * 1024 * 1024  # a Redis value may hold 512 MB; routers are a few MB at most
POLL_S = 2.0

_PUSH_LAYOUT = Layout(keys=("version_key",), args=("version_prefix", "kept"), arg_tail="fields")
# One slot ({config} in RedisKeys): the number and the bundle are written together, and the oldest goes.
_PUSH = """
local version = redis.call('INCR', version_key)
redis.call('HSET', version_prefix .. version, unpack(fields))
redis.call('DEL', version_prefix .. (version - tonumber(kept)))
return version
"""


class ConfigSourceError(InvalidRequest):
    """Nothing usable is published in Redis for a worker that takes its policy from there."""


@dataclass(frozen=True)
class Bundle:
    """The files of one version, by their path relative to the policy's folder."""

    files: dict[str, bytes]

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return digest.hexdigest()


def bundle_of(policy_path: Path, catalog_path: Path) -> tuple[Bundle, list[str]]:
    """The files a worker needs to route as ``policy_path`` with ``catalog_path`` does, and the check's warnings
    (a worker serves such a unit, with its fallbacks); CatalogError (one line) when the unit does not load, or
    a router file lies outside the policy's folder."""
    _, warnings = load_routing(catalog_path, policy_path)  # exactly the check a worker makes before serving
    policy = load_policy(policy_path)
    files = {POLICY_FILE: policy_path.read_bytes(), CATALOG_FILE: catalog_path.read_bytes()}
    rules = [policy.router, *(a.strategy for e in policy.experiments for a in e.arms)]
    for rule in rules:
        if isinstance(rule, FixedModel):
            continue
        where = rule_location(rule, policy_path)
        if not isinstance(where, Path):
            continue  # the rules router or the builtin one: nothing to send
        if Path(str(rule.path)).expanduser().is_absolute():
            raise CatalogError(
                f"{policy_path}: router file {rule.path} is an absolute path; give it relative to the policy's "
                "folder so that it is pushed with the policy"
            )
        relative = PurePosixPath(os.path.relpath(where, policy_path.parent))
        if ".." in relative.parts:
            raise CatalogError(f"{policy_path}: router file {rule.path} is outside the policy's folder")
        files[str(relative)] = where.read_bytes()
    size = sum(len(b) for b in files.values())
    if size > MAX_BUNDLE_BYTES:
        raise CatalogError(
            f"{policy_path}: the policy with its catalog and routers is {size} bytes, over {MAX_BUNDLE_BYTES}"
        )
    return Bundle(files), warnings


async def push(redis: Redis, keys: RedisKeys, bundle: Bundle, *, source: str) -> int:
    """Publish ``bundle`` as the next version; returns its number."""
    meta = {"sha256": bundle.sha256, "pushed_at": time.time(), "source": source, "files": sorted(bundle.files)}
    fields: list[str | bytes] = [META, json.dumps(meta)]
    for name, data in bundle.files.items():
        fields += [name, data]
    script = NamedScript(redis, _PUSH_LAYOUT, _PUSH)
    version = await script(
        keys={"version_key": keys.config_version},
        args={"version_prefix": keys.config_bundle(""), "kept": VERSIONS_KEPT},
        arg_tail=fields,  # type: ignore[arg-type]  # bytes go through redis-py as they are
    )
    return int(version)


async def latest(redis: Redis, keys: RedisKeys) -> tuple[int, Bundle, dict[str, object]] | None:
    """The newest version, its bundle and its metadata (None when nothing was pushed)."""
    number = await redis.get(keys.config_version)
    return None if number is None else await version_at(redis, keys, int(number))


async def version_at(redis: Redis, keys: RedisKeys, number: int) -> tuple[int, Bundle, dict[str, object]]:
    raw = await redis.hgetall(keys.config_bundle(number))
    files = {as_text(k): v if isinstance(v, bytes) else v.encode() for k, v in raw.items()}
    meta = json.loads(files.pop(META, b"{}"))
    return number, Bundle(files), meta


def safe_name(name: str) -> bool:
    """A bundle file name that stays inside the folder it is written to (names come from Redis)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


class ConfigSync:
    """Keeps ``folder/current`` holding the newest pushed version (``paths`` are what the hot reload reads)."""

    def __init__(self, redis: Redis, keys: RedisKeys, folder: Path) -> None:
        self.redis = redis
        self.keys = keys
        self.folder = folder
        self.version = 0
        self._refused = 0  # a version found unusable, not fetched again

    @property
    def paths(self) -> tuple[Path, Path]:
        """(catalog file, policy file) of the version in force."""
        return self.folder / "current" / CATALOG_FILE, self.folder / "current" / POLICY_FILE

    @classmethod
    async def start(cls, redis: Redis, keys: RedisKeys) -> ConfigSync:
        """Fetch the newest version before the worker starts; ConfigSourceError when there is none."""
        sync = cls(redis, keys, Path(tempfile.mkdtemp(prefix="farebox-config-")))
        try:
            if not await sync.fetch():
                raise ConfigSourceError(
                    "FAREBOX_CONFIG_SOURCE=redis and no policy is published there: run `farebox policy push FILE`"
                )
        except REDIS_DOWN as err:
            sync.close()
            raise ConfigSourceError(f"FAREBOX_CONFIG_SOURCE=redis and Redis does not answer ({err})") from None
        except BaseException:
            sync.close()
            raise
        return sync

    async def fetch(self) -> bool:
        """Write the newest version out if it is newer than the one in force; True when one is in force."""
        newest = await self.redis.get(self.keys.config_version)
        if newest is None:
            return self.version > 0
        if int(newest) in (self.version, self._refused):  # the poll's usual answer: one GET, not the bundle
            return True
        # A number lower than ours is a version too (Redis restored or flushed and pushed again): it is what
        # is published now.
        number, bundle, meta = await version_at(self.redis, self.keys, int(newest))
        if not all(safe_name(name) for name in bundle.files):
            log.error(
                "policy version %d names a file outside its folder; still serving version %d", number, self.version
            )
            self._refused = number
            return self.version > 0
        if POLICY_FILE not in bundle.files or CATALOG_FILE not in bundle.files:
            log.error("policy version %d lacks its policy or catalog; still serving version %d", number, self.version)
            self._refused = number
            return self.version > 0
        await asyncio.to_thread(self._write, number, bundle)  # up to MAX_BUNDLE_BYTES: not in the event loop
        log.info(
            "policy version %d (%s, pushed from %s) in force",
            number,
            str(meta.get("sha256", ""))[:12],
            meta.get("source"),
        )
        self.version = number
        return True

    def _write(self, number: int, bundle: Bundle) -> None:
        target = self.folder / f"v{number}"
        for name, data in bundle.files.items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        link = self.folder / f".current-{number}"
        link.unlink(missing_ok=True)
        link.symlink_to(target.name)
        os.replace(link, self.folder / "current")  # the hot reload sees one version or the other, never a mix
        for old in self.folder.glob("v*"):
            if old != target and old.name != f"v{self.version}":
                shutil.rmtree(old, ignore_errors=True)

    async def run(self, stop: asyncio.Event, poll_s: float = POLL_S) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
            if stop.is_set():
                break
            try:
                await self.fetch()
            except REDIS_DOWN:
                pass  # the version in force goes on serving; the next poll tries again

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
