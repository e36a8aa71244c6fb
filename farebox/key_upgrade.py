"""``python -m farebox.key_upgrade [--apply]``: move a single Redis server's farebox keys from the names of
before the Redis Cluster layout (``farebox:result:<tenant>/<job_id>``, ``farebox:budget:<tenant>:...``) to
today's (``farebox:{j:<tenant>/<job_id>}:result``, ``farebox:{b:<tenant>}:budget:...``: farebox/constants.py).

Run it with the pipeline stopped, after its queues are drained, and before the new version starts. Without
``--apply`` it only counts what it would move. Each key is renamed only when its new name is free (RENAMENX);
a budget whose new key exists already (the new version ran first) has its spend and reservations added to it,
so the period's limit still holds. Any other key whose new name is taken stays under its old name and is
counted: ``farebox report`` reads old-named day aggregates too, and the rest expire as they always did. Rate
buckets, concurrency slots and circuits are not moved (they last minutes). A Redis Cluster has no keys of
before to move: a cluster deployment starts with today's names.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from redis.asyncio import Redis

from farebox.constants import JobRecord, RedisKeys, as_text
from farebox.errors import describe_validation_error
from farebox.redis_connect import connect_redis, parse_redis_url
from farebox.settings import Settings

BATCH = 500
Rename = Callable[[RedisKeys, re.Match[str]], str]

# The old name (after the prefix) -> the new one; the first match wins (feedback:arms before feedback:<record>).
RULES: tuple[tuple[str, re.Pattern[str], Rename], ...] = (
    ("result", re.compile(r"^result:(.+)$"), lambda k, m: k.result(JobRecord(m[1]))),
    ("outcome", re.compile(r"^outcome:(.+)$"), lambda k, m: k.outcome(JobRecord(m[1]))),
    ("ledger entry", re.compile(r"^ledger:job:(.+)$"), lambda k, m: k.ledger_entry(JobRecord(m[1]))),
    ("ledger stream", re.compile(r"^ledger:stream$"), lambda k, m: k.ledger_stream),
    ("ledger day", re.compile(r"^ledger:day:(.+)$"), lambda k, m: k.ledger_agg(m[1])),
    ("ledger days", re.compile(r"^ledger:days$"), lambda k, m: k.ledger_days),
    ("ledger arms", re.compile(r"^ledger:arms:(.+)$"), lambda k, m: k.ledger_arms(m[1])),
    ("feedback arms", re.compile(r"^feedback:arms:(.+)$"), lambda k, m: k.feedback_arms(m[1])),
    ("feedback index", re.compile(r"^feedback:jobs$"), lambda k, m: k.feedback_jobs),
    ("feedback", re.compile(r"^feedback:(.+/.*)$"), lambda k, m: k.feedback(JobRecord(m[1]))),
    ("arm", re.compile(r"^arm:(.+)$"), lambda k, m: k.arm(JobRecord(m[1]))),
    ("prompt", re.compile(r"^prompt:(.+)$"), lambda k, m: k.prompt(JobRecord(m[1]))),
    ("reservation", re.compile(r"^reservation:(.+)$"), lambda k, m: k.reservation(JobRecord(m[1]))),
    (
        "budget",
        re.compile(r"^budget:([^:]+):(?:([^:]+):)?((?:day|month):[^:]+)(:alerts)?$"),
        lambda k, m: k.budget(m[1], m[3], m[2]) + (m[4] or ""),
    ),
    ("cache", re.compile(r"^cache:(.+)$"), lambda k, m: k.cache(m[1])),
    ("lease", re.compile(r"^inflight:(.+)$"), lambda k, m: k.inflight(m[1])),
)


def new_name(keys: RedisKeys, old: str) -> tuple[str, str] | None:
    """(kind, today's name) of an old-named key, or None when ``old`` is not one (today's names included)."""
    rest = old.removeprefix(keys.prefix)
    if rest == old or rest.startswith("{"):
        return None
    for kind, pattern, rename in RULES:
        match = pattern.match(rest)
        if match:
            return kind, rename(keys, match)
    return None


async def upgrade(redis: Redis, keys: RedisKeys, *, apply: bool) -> Counter[str]:
    """Counts of the keys moved (or to move) by kind, and of those kept (``kept: <kind>``)."""
    counts: Counter[str] = Counter()
    pending: list[tuple[str, str, str]] = []
    async for raw in redis.scan_iter(match=f"{keys.prefix}*", count=1000):
        found = new_name(keys, as_text(raw))
        if found is not None:
            pending.append((found[0], as_text(raw), found[1]))
        if len(pending) >= BATCH:
            await _move(redis, pending, counts, apply)
            pending = []
    await _move(redis, pending, counts, apply)
    return counts


async def _move(redis: Redis, batch: Sequence[tuple[str, str, str]], counts: Counter[str], apply: bool) -> None:
    if not apply:
        counts.update(kind for kind, _, _ in batch)
        return
    pipe = redis.pipeline(transaction=False)
    for _, old, new in batch:
        pipe.renamenx(old, new)
    moved = await pipe.execute(raise_on_error=False)
    for (kind, old, new), done in zip(batch, moved, strict=True):
        if done is True or done == 1:
            counts[kind] += 1
        elif kind == "budget" and not old.endswith(":alerts"):
            await _merge_budget(redis, old, new)
            counts[kind] += 1
        else:
            counts[f"kept: {kind}"] += 1


async def _merge_budget(redis: Redis, old: str, new: str) -> None:
    """A budget the new version has already written to: add the old spend and reservations to it."""
    fields = await redis.hgetall(old)
    pipe = redis.pipeline(transaction=True)
    for field, value in fields.items():
        pipe.hincrby(new, as_text(field), int(value))
    pipe.delete(old)
    await pipe.execute()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m farebox.key_upgrade", description=__doc__.split("\n\n")[0])
    parser.add_argument("--apply", action="store_true", help="rename the keys (without it: only count them)")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as err:
        print(f"farebox key_upgrade: invalid FAREBOX_* setting: {describe_validation_error(err)}", file=sys.stderr)
        return 2
    if parse_redis_url(settings.redis_url).kind == "cluster":
        print("farebox key_upgrade: a Redis Cluster has no keys of before to move", file=sys.stderr)
        return 2

    async def run() -> Counter[str]:
        redis = connect_redis(settings.redis_url)
        try:
            return await upgrade(redis, settings.keys, apply=args.apply)
        finally:
            await redis.aclose()

    counts = asyncio.run(run())
    verb = "moved" if args.apply else "to move (run again with --apply)"
    print(f"farebox key_upgrade: {sum(v for k, v in counts.items() if not k.startswith('kept'))} keys {verb}")
    for kind, count in sorted(counts.items()):
        print(f"  {kind}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
