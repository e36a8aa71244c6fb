"""Redis Lua scripts whose KEYS and ARGV are named, not numbered.

A script declares the names of its keys and arguments once, in a ``Layout``. The same declaration
writes the script's Lua prologue (``local job_id = ARGV[1]`` ...) and puts the caller's mapping
of named values in that order, so the Python side and the Lua side cannot disagree about which
position holds what. A name the layout does not list, or one it lists that the caller leaves out,
is an error before anything is sent.

Every call's keys must hash to one Redis Cluster slot (``CrossSlot`` otherwise, on a single server too): a
script on a cluster runs on one node, which holds one slot's keys. Checking it on every call makes every
test of every script a check of its keys' hash tags (farebox/constants.py, RedisKeys). The one exception is a
script declared ``one_server``, which the stages send only where Redis is one server (farebox/stages/one_trip.py,
ledger_scripts.WHOLE).

A script with a variable number of keys or arguments (one per budget, say) declares a *tail*:
whatever follows the named positions, bound in Lua to a table of that name (``{unpack(KEYS, 8)}``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

Scalar = str | int | float
_T = TypeVar("_T")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Lua keywords, and the globals the scripts call: a local of that name would hide it.
_RESERVED = frozenset(
    "and break do else elseif end false for function if in local nil not or repeat return then true until while"
    " KEYS ARGV redis tonumber tostring unpack ipairs pairs math string table error type select next cjson".split()
)


def one_server(redis: Redis) -> bool:
    """Whether ``redis`` is one server (alone, or a Sentinel's master): not a Redis Cluster's client."""
    return not isinstance(redis, RedisCluster)


class LayoutError(ValueError):
    """A script's named keys or arguments do not match its layout."""


class CrossSlot(LayoutError):
    """A script's keys do not all hash to one Redis Cluster slot."""


def check_one_slot(keys: Sequence[str], what: str = "script") -> None:
    """CrossSlot unless every key of ``keys`` hashes to the same Redis Cluster slot."""
    if len(keys) < 2:
        return
    first = key_slot(keys[0].encode())
    for key in keys[1:]:
        if key_slot(key.encode()) != first:
            slots = ", ".join(f"{k} (slot {key_slot(k.encode())})" for k in keys)
            raise CrossSlot(f"{what}: keys in more than one Redis Cluster slot: {slots}")


@dataclass(frozen=True)
class Layout:
    """The order of a script's KEYS and ARGV, by name; ``*_tail`` names the table of the rest."""

    keys: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    key_tail: str | None = None
    arg_tail: str | None = None

    def __post_init__(self) -> None:
        names = [*self.keys, *self.args, *(t for t in (self.key_tail, self.arg_tail) if t is not None)]
        for name in names:
            if not _IDENT.match(name) or name in _RESERVED:
                raise LayoutError(f"{name!r} cannot be a Lua local name")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise LayoutError(f"names used twice: {', '.join(repeated)}")

    def prologue(self) -> str:
        """The Lua lines that bind every name to its position."""
        lines = [f"local {name} = KEYS[{i}]" for i, name in enumerate(self.keys, 1)]
        if self.key_tail is not None:
            lines.append(f"local {self.key_tail} = {{unpack(KEYS, {len(self.keys) + 1})}}")
        lines += [f"local {name} = ARGV[{i}]" for i, name in enumerate(self.args, 1)]
        if self.arg_tail is not None:
            lines.append(f"local {self.arg_tail} = {{unpack(ARGV, {len(self.args) + 1})}}")
        return "".join(f"{line}\n" for line in lines)

    def key_list(self, named: Mapping[str, str], tail: Sequence[str] = ()) -> list[str]:
        return _ordered("KEYS", self.keys, named, self.key_tail, tail)

    def arg_list(self, named: Mapping[str, Scalar], tail: Sequence[Scalar] = ()) -> list[Scalar]:
        return _ordered("ARGV", self.args, named, self.arg_tail, tail)


def _ordered(
    what: str, names: tuple[str, ...], named: Mapping[str, _T], tail_name: str | None, tail: Sequence[_T]
) -> list[_T]:
    if tail and tail_name is None:
        raise LayoutError(f"{what}: {len(tail)} values beyond the named ones, and the layout has no tail")
    # The per-job path: as many values as names and every name there means none is unknown either.
    if len(named) == len(names) and all(n in named for n in names):
        return [named[n] for n in names] + list(tail)
    missing = [n for n in names if n not in named]
    unknown = sorted(set(named) - set(names))
    problems = [
        f"{label} {', '.join(listed)}" for label, listed in (("missing", missing), ("unknown", unknown)) if listed
    ]
    raise LayoutError(f"{what}: {'; '.join(problems)}")


class NamedScript:
    """A registered script called with named keys and arguments (plus the tails, if any)."""

    def __init__(self, redis: Redis, layout: Layout, body: str, name: str = "script", one_server: bool = False) -> None:
        self.layout = layout
        self.name = name
        # A script only ever sent to one Redis server (never to a cluster) may touch keys of several slots.
        self.one_server = one_server
        self.source = layout.prologue() + body
        self._script = redis.register_script(self.source)

    async def __call__(
        self,
        *,
        keys: Mapping[str, str] | None = None,
        args: Mapping[str, Scalar] | None = None,
        key_tail: Sequence[str] = (),
        arg_tail: Sequence[Scalar] = (),
    ) -> Any:
        key_list = self.layout.key_list(keys or {}, key_tail)
        if not self.one_server:
            check_one_slot(key_list, self.name)
        return await self._script(keys=key_list, args=self.layout.arg_list(args or {}, arg_tail))
