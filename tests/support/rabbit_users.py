"""Real RabbitMQ users, for the tests of who a message comes from (auth mode user_id): made with
rabbitmqctl on this host's broker, named per run so parallel or leftover runs never share one, and
removed afterwards."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

PASSWORD = "pw"


def rabbitmqctl(*args: str) -> str:
    """rabbitmqctl's stdout; raises when it fails."""
    done = subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60)
    return done.stdout


def fresh_name(role: str) -> str:
    """A user name no other run uses; the fbtest- prefix marks it as a test's, should one be left."""
    return f"fbtest-{uuid.uuid4().hex[:8]}-{role}"


def delete_user(name: str) -> None:
    # Not checked: cleanup must not hide the test's own failure, and the user may never have been made.
    subprocess.run(["rabbitmqctl", "delete_user", name], capture_output=True, timeout=60)


@contextlib.contextmanager
def rabbit_users(*roles: str) -> Iterator[dict[str, str]]:
    """A user per role (role -> user name), password PASSWORD and every right on vhost /, deleted on exit."""
    assert shutil.which("rabbitmqctl"), "rabbitmqctl is needed to create test users"
    users = {role: fresh_name(role) for role in roles}
    try:
        for name in users.values():
            rabbitmqctl("add_user", name, PASSWORD)
            rabbitmqctl("set_permissions", "-p", "/", name, ".*", ".*", ".*")
        yield users
    finally:
        for name in users.values():
            delete_user(name)


def as_user(url: str, user: str) -> str:
    """The AMQP ``url`` logged in as ``user`` (password PASSWORD) instead of its own credentials."""
    parts = urlsplit(url)
    netloc = f"{user}:{PASSWORD}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
