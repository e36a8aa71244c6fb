"""``farebox policy push FILE`` and ``farebox policy show``: the policy and catalog published once to Redis,
for workers started with ``FAREBOX_CONFIG_SOURCE=redis`` (farebox/stages/config_sync.py)."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path
from typing import Any

from farebox.settings import Settings


def cmd_push(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.redis_connect import connect_redis
    from farebox.stages.config_sync import bundle_of, push

    policy_path = Path(args.file)
    catalog_path = Path(args.catalog) if args.catalog else settings.catalog
    bundle, warnings = bundle_of(policy_path, catalog_path)  # CatalogError: the CLI prints its one line, exit 2
    for warning in warnings:
        print(f"farebox: warning: {warning}", file=sys.stderr)

    async def run() -> int:
        redis = connect_redis(settings.redis_url, socket_timeout=5.0)
        try:
            return await push(redis, settings.keys, bundle, source=f"{socket.gethostname()}:{policy_path}")
        finally:
            await redis.aclose()

    version = asyncio.run(run())
    routers = sorted(set(bundle.files) - {"policy.json", "model_costs.json"})
    print(
        f"policy version {version} published ({bundle.sha256[:12]}): {policy_path} with catalog {catalog_path}"
        + (f" and router file(s) {', '.join(routers)}" if routers else "")
        + "; workers with FAREBOX_CONFIG_SOURCE=redis take it within seconds"
    )
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.redis_connect import connect_redis
    from farebox.stages.config_sync import latest, safe_name

    async def run() -> Any:
        redis = connect_redis(settings.redis_url, socket_timeout=5.0)
        try:
            return await latest(redis, settings.keys)
        finally:
            await redis.aclose()

    found = asyncio.run(run())
    if found is None:
        print("no policy published in Redis (farebox policy push FILE)", file=sys.stderr)
        return 1
    number, bundle, meta = found
    pushed = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(meta.get("pushed_at", 0))))
    print(f"policy version {number} ({bundle.sha256[:12]}), pushed {pushed} from {meta.get('source')}")
    for name in sorted(bundle.files):
        print(f"  {name}  {len(bundle.files[name])} bytes")
    if args.output:
        out = Path(args.output)
        for name, data in bundle.files.items():
            if not safe_name(name):
                print(f"farebox: refusing to write {name!r}: outside {out}", file=sys.stderr)
                return 2
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        print(f"written to {out}")
    return 0


def add_commands(sub: Any) -> None:
    group = sub.add_parser("policy", help="publish the policy and catalog to Redis for every worker")
    psub = group.add_subparsers(dest="policy_command", required=True)
    p = psub.add_parser("push", help="check a policy file and publish it, its catalog and routers, as a new version")
    p.add_argument("file", help="the policy file (its learned router files go with it)")
    p.add_argument("--catalog", help="the catalog file to publish with it (default: FAREBOX_CATALOG)")
    p.set_defaults(func=cmd_push)
    p = psub.add_parser("show", help="the newest published version")
    p.add_argument("-o", "--output", help="also write its files into this folder")
    p.set_defaults(func=cmd_show)
