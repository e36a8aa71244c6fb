"""Named KEYS/ARGV for Lua scripts: names -> positions, the prologue made from the same names, and
the errors a missing or unknown name gives; then a script run against the real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from farebox.settings import Settings
from farebox.stages.lua import CrossSlot, Layout, LayoutError, NamedScript, Scalar, check_one_slot

LEDGERISH = Layout(keys=("result_key", "lease_key"), key_tail="budget_keys", args=("job_id", "ttl_s", "cost"))


@pytest.mark.parametrize(
    ("layout", "args", "tail", "expected"),
    [
        (LEDGERISH, {"job_id": "j1", "ttl_s": 60, "cost": 1.5}, (), ["j1", 60, 1.5]),
        (LEDGERISH, {"cost": 1.5, "ttl_s": 60, "job_id": "j1"}, (), ["j1", 60, 1.5]),  # mapping order is ignored
        (Layout(args=("a",), arg_tail="rest"), {"a": "x"}, (1, 2), ["x", 1, 2]),
        (Layout(args=("a",), arg_tail="rest"), {"a": "x"}, (), ["x"]),
        (Layout(arg_tail="rest"), {}, ("p", "q"), ["p", "q"]),
        (Layout(), {}, (), []),
    ],
)
def test_args_go_in_the_layout_order(
    layout: Layout, args: dict[str, Scalar], tail: tuple[Scalar, ...], expected: list[Scalar]
) -> None:
    assert layout.arg_list(args, tail) == expected


def test_keys_go_in_the_layout_order_then_the_tail() -> None:
    named = {"lease_key": "k:lease", "result_key": "k:result"}
    assert LEDGERISH.key_list(named, ["k:b1", "k:b2"]) == ["k:result", "k:lease", "k:b1", "k:b2"]


@pytest.mark.parametrize(
    ("layout", "args", "tail", "message"),
    [
        (LEDGERISH, {"job_id": "j1", "ttl_s": 60}, (), "ARGV: missing cost"),
        (LEDGERISH, {"job_id": "j1", "ttl_s": 60, "cost": 1, "cots": 2}, (), "ARGV: unknown cots"),
        (LEDGERISH, {"job_id": "j1"}, (), "ARGV: missing ttl_s, cost"),
        (LEDGERISH, {"job_id": "j1", "ttl_s": 60, "cost": 1}, ("extra",), "no tail"),
    ],
)
def test_a_missing_unknown_or_unexpected_value_is_an_error(
    layout: Layout, args: dict[str, Scalar], tail: tuple[Scalar, ...], message: str
) -> None:
    with pytest.raises(LayoutError, match=message):
        layout.arg_list(args, tail)


def test_a_missing_key_is_an_error() -> None:
    with pytest.raises(LayoutError, match="KEYS: missing lease_key"):
        LEDGERISH.key_list({"result_key": "k"})


def test_the_prologue_binds_each_name_to_its_position() -> None:
    assert LEDGERISH.prologue() == (
        "local result_key = KEYS[1]\n"
        "local lease_key = KEYS[2]\n"
        "local budget_keys = {unpack(KEYS, 3)}\n"
        "local job_id = ARGV[1]\n"
        "local ttl_s = ARGV[2]\n"
        "local cost = ARGV[3]\n"
    )
    assert Layout(arg_tail="rest").prologue() == "local rest = {unpack(ARGV, 1)}\n"


@pytest.mark.parametrize(
    "kw",
    [
        {"args": ("end",)},  # a Lua keyword
        {"args": ("error",)},  # would hide the Lua global
        {"keys": ("KEYS",)},
        {"args": ("job-id",)},  # not an identifier
        {"keys": ("job_id",), "args": ("job_id",)},  # one name, two positions
        {"args": ("a",), "arg_tail": "a"},
    ],
)
def test_names_that_cannot_be_lua_locals_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(LayoutError):
        Layout(**kw)


async def test_a_named_script_reads_its_values_by_name(redis: Redis, settings: Settings) -> None:
    layout = Layout(keys=("counter",), key_tail="others", args=("step", "label"), arg_tail="extras")
    script = NamedScript(
        redis,
        layout,
        """
local total = redis.call('INCRBY', counter, step)
return {total, label, #others, others[1] or false, #extras, extras[2] or false}
""",
    )
    counter = f"{settings.redis_prefix}{{lua}}:counter"
    other = f"{settings.redis_prefix}{{lua}}:other"
    reply = await script(
        keys={"counter": counter}, key_tail=[other], args={"label": "hello", "step": 5}, arg_tail=["x", "y"]
    )
    assert reply == [5, b"hello", 1, other.encode(), 2, b"y"]
    assert await redis.get(counter) == b"5"
    with pytest.raises(LayoutError):
        await script(keys={"counter": counter}, args={"step": 1})  # refused before anything is sent
    with pytest.raises(CrossSlot):  # keys a Redis Cluster node could not run together, on one server too
        await script(keys={"counter": counter}, key_tail=[f"{settings.redis_prefix}lua:other"], args=STEP_AND_LABEL)
    assert await redis.get(counter) == b"5"


STEP_AND_LABEL = {"label": "x", "step": 1}


def test_keys_in_one_slot_pass_and_keys_of_two_slots_are_named() -> None:
    check_one_slot(["a{t}:1", "b{t}:2", "{t}"])
    check_one_slot(["only-one"])
    with pytest.raises(CrossSlot, match=r"ledger record: keys in more than one .*a:1 \(slot \d+\), b:2"):
        check_one_slot(["a:1", "b:2"], "ledger record")
