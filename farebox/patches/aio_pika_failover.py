"""A robust aio-pika connection over the nodes of a RabbitMQ cluster, that moves to another node when its own goes.

aio-pika's ``RobustConnection`` takes one URL and, when the connection is lost, tries that URL again every
``reconnect_interval`` until it answers: with a node that is gone for good, forever. ``FailoverConnection`` is
a ``RobustConnection`` (so its channels, queues and consumers are restored after a reconnect as before) given
a list of nodes. Each transport attempt, the first connect and every reconnect, goes over the nodes in turn
until one answers: the first connect from the first node given, a reconnect from the node after the one that
was in use (that one last: it has just gone away), so a dead node costs one refused attempt a round, never the
connection. A reconnect after a loss first waits ``move_pause_s`` (once per loss). Only when no node answers
does aio-pika's own loop take over: it waits ``reconnect_interval`` and starts another round (the first connect
fails at once, ``fail_fast``, as it does for one URL).

farebox/amqp_connect.py builds it (which node a process starts at); nothing else should.

It overrides the private per-attempt coroutine that ``RobustConnection``'s reconnect loop calls
(``__connect_transport``, name-mangled), wrapping the original. When aio-pika no longer has it, ``supported``
is False and farebox/amqp_connect.py says so in a warning and connects to the first node alone, as
``connect_robust`` would.

What it relies on in aio-pika (pinned ``aio-pika>=10.2,<10.3`` in pyproject.toml), and the tests of
tests/test_amqp_failover.py that fail when that changes:

| relied on                                   | how                          | pinned by                              |
|---------------------------------------------|------------------------------|----------------------------------------|
| ``RobustConnection._RobustConnection__``    | overridden: one attempt per  | test_the_private_hook_is_there,        |
| ``connect_transport`` (private), called by  | node in turn, the original   | test_a_lost_node_moves_the_connection* |
| the reconnect loop for every attempt        | wrapped                      | test_the_first_connect_skips_dead*     |
| ``Connection.url`` read by ``Connection.``  | set to the node to try       | test_a_lost_node_moves_the_connection*,|
| ``connect`` on every attempt                |                              | test_the_first_connect_skips_dead*     |
| ``CONNECTION_EXCEPTIONS``: what a node that | caught: the next node is     | test_the_first_connect_skips_dead*,    |
| does not answer raises                      | tried                        | test_no_node_answering_fails_fast      |
| the constructor (url, loop, ssl_context,    | the ``connect_robust`` call  | every stage test (the stages connect   |
| client_properties, **kwargs) and ``connect``| made by hand                 | through farebox/amqp_connect.py)       |
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from yarl import URL

log = logging.getLogger("farebox.patches.aio_pika_failover")

_HOOK = "_RobustConnection__connect_transport"
_original: Callable[[RobustConnection], Awaitable[None]] | None = RobustConnection.__dict__.get(_HOOK)
supported = asyncio.iscoroutinefunction(_original)


def failover_order(count: int, in_use: int | None) -> list[int]:
    """The nodes (indexes into ``count`` of them) one attempt round tries, in order: from the first when none was
    in use yet, else from the one after the node in use, which comes last."""
    first = 0 if in_use is None else in_use + 1
    return [(first + step) % count for step in range(count)]


def censored(url: URL) -> str:
    """The URL without its password, for logs."""
    return str(url.with_password("******") if url.password else url)


class FailoverConnection(RobustConnection):
    """A ``RobustConnection`` over ``nodes`` (already in the order this process prefers)."""

    def __init__(
        self,
        nodes: Sequence[URL],
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        move_pause_s: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not nodes:
            raise ValueError("FailoverConnection needs at least one node")
        super().__init__(nodes[0], loop=loop, **kwargs)
        self.nodes: tuple[URL, ...] = tuple(nodes)
        self.in_use: int | None = None  # index of the node of the current (or last) transport
        self.move_pause_s = move_pause_s
        self._lost_one = False  # a transport was up: the next attempt round follows its loss

    async def _RobustConnection__connect_transport(self) -> None:  # the private name it overrides
        assert _original is not None  # amqp_connect builds this class only when supported
        if self._lost_one and self.move_pause_s > 0:
            # Once per loss, not per round: why, in farebox/amqp_connect.py (MOVE_PAUSE_S).
            self._lost_one = False
            await asyncio.sleep(self.move_pause_s)
        order = failover_order(len(self.nodes), self.in_use)
        for position, index in enumerate(order):
            self.url = self.nodes[index]
            try:
                await _original(self)
            except CONNECTION_EXCEPTIONS as err:
                if position == len(order) - 1:
                    raise  # no node answered: aio-pika's loop waits reconnect_interval and calls again
                log.warning(
                    "RabbitMQ node %s failed us (%s: %s); trying %s",
                    censored(self.url),
                    type(err).__name__,
                    err,
                    censored(self.nodes[order[position + 1]]),
                )
                continue
            if self.in_use is not None and index != self.in_use:
                log.warning("connection moved to RabbitMQ node %s", censored(self.url))
            self.in_use = index
            self._lost_one = True
            return
