"""``farebox tenants add NAME --user USER``: a RabbitMQ user that may act for one tenant, with narrow rights.

The user may publish to the default exchange (the intake and feedback queues are reached through it),
declare, bind and read reply queues (``amq.gen-...`` or aio-pika's ``amq_<hex>``, exclusive to the connection
that declared them, so no other user can consume them), and
bind them to the alerts exchange for routing keys ``budget.<tenant>`` and ``budget.<tenant>.*`` only (topic
permissions). It cannot consume the intake or another stage's queue, nor declare or delete farebox's queues.
The policy's ``auth.users`` must also map the user to the tenant: the command prints the line to add.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from typing import Any
from urllib.parse import unquote, urlsplit

from farebox.settings import Settings

NAME = re.compile(r"^[A-Za-z0-9_.@-]+$")


def permission_commands(tenant: str, user: str, vhost: str, namespace: str) -> list[list[str]]:
    """The rabbitmqctl commands that give ``user`` its rights (the user must exist)."""
    # Reply queues: server-named (amq.gen-...) or named by aio-pika (amq_<32 hex>), exclusive to the connection.
    own = r"amq\.gen-.*|amq_[0-9a-f]{32}"
    alerts = re.escape(f"{namespace}.alerts")
    return [
        ["set_permissions", "-p", vhost, user, f"^({own})$", rf"^(amq\.default|{own})$", rf"^({own}|{alerts})$"],
        [
            "set_topic_permissions",
            "-p",
            vhost,
            user,
            f"{namespace}.alerts",
            "^$",
            rf"^budget\.{re.escape(tenant)}(\..*)?$",
        ],
    ]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    if not NAME.match(args.tenant) or not NAME.match(args.user):
        print("farebox tenants add: tenant and user are letters, digits and _.@- only", file=sys.stderr)
        return 2
    vhost = args.vhost or unquote(urlsplit(settings.amqp_url.split(",")[0]).path.lstrip("/")) or "/"
    commands = permission_commands(args.tenant, args.user, vhost, settings.namespace)
    if args.password is not None:
        commands.insert(0, ["add_user", args.user, args.password])
    if args.dry_run:
        for command in commands:
            print("rabbitmqctl " + " ".join(f"'{part}'" if " " in part or "\\" in part else part for part in command))
    else:
        if shutil.which("rabbitmqctl") is None:
            print(
                "farebox tenants add: rabbitmqctl is not on PATH (run on a broker node, or use --dry-run)",
                file=sys.stderr,
            )
            return 2
        for command in commands:
            done = _run(command)
            if done.returncode != 0:
                print(f"farebox tenants add: rabbitmqctl {command[0]} failed: {done.stderr.strip()}", file=sys.stderr)
                return 1
    print(f'add to the policy: "auth": {{"mode": "user_id", "users": {{"{args.user}": ["{args.tenant}"]}}}}')
    return 0


def add_commands(sub: Any) -> None:
    group = sub.add_parser("tenants", help="RabbitMQ users that act for a tenant")
    tsub = group.add_subparsers(dest="tenants_command", required=True)
    p = tsub.add_parser("add", help="give a RabbitMQ user narrow rights to act for a tenant (rabbitmqctl)")
    p.add_argument("tenant")
    p.add_argument("--user", required=True, help="the RabbitMQ user")
    p.add_argument("--password", help="create the user with this password (else it must exist)")
    p.add_argument("--vhost", help="default: the vhost of FAREBOX_AMQP_URL")
    p.add_argument("--dry-run", action="store_true", help="print the rabbitmqctl commands instead")
    p.set_defaults(func=cmd_add)
