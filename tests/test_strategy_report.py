"""`farebox report --by strategy`: per experiment arm and feedback source, the mean score with a normal 95%
interval and the difference from the control arm (the experiment's first arm in the policy) with its p-value.
The statistics are checked against numbers worked out by hand, the rows against hashes seeded in the real Redis."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from farebox.cli import main
from farebox.constants import NANO, RedisKeys
from farebox.errors import InvalidRequest
from farebox.settings import Settings
from farebox.strategy_report import (
    Aggregates,
    ScoreStats,
    build_rows,
    compare,
    load_strategy_rows,
    ordered_arms,
    score_stats,
)


def stats_of(scores: Sequence[float]) -> ScoreStats:
    return score_stats(len(scores), sum(scores), sum(s * s for s in scores))


def approx(value: Any) -> Any:
    return pytest.approx(value, abs=1e-6)


FORTY_OF_FIFTY = [1.0] * 40 + [0.0] * 10
HALF_OF_FIFTY = [1.0] * 25 + [0.0] * 25


@pytest.mark.parametrize(
    ("scores", "mean", "var", "se", "ci95"),
    [
        # n=4, sum 3, sumsq 3: mean 3/4 = .75; var (3 - 4 * .5625) / 3 = .75 / 3 = .25; se sqrt(.25 / 4) = .25;
        # ci .75 -/+ 1.96 * .25 = .75 -/+ .49
        ([1, 1, 0, 1], 0.75, 0.25, 0.25, (0.26, 1.24)),
        # n=4, sum 1, sumsq 1: mean .25; var (1 - 4 * .0625) / 3 = .25; se .25; ci .25 -/+ .49
        ([0, 1, 0, 0], 0.25, 0.25, 0.25, (-0.24, 0.74)),
        # n=50, sum 40, sumsq 40: mean .8; var (40 - 50 * .64) / 49 = 8/49; se sqrt(8/49 / 50) = .4/7 = .0571429;
        # ci .8 -/+ 1.96 * .4/7 = .8 -/+ .112
        (FORTY_OF_FIFTY, 0.8, 8 / 49, 0.4 / 7, (0.688, 0.912)),
        # n=2, sum 1.2, sumsq .74: mean .6; var (.74 - 2 * .36) / 1 = .02; se sqrt(.02 / 2) = .1; ci .6 -/+ .196
        ([0.5, 0.7], 0.6, 0.02, 0.1, (0.404, 0.796)),
        # all alike: var 0, se 0, the interval is the mean
        ([1, 1, 1], 1.0, 0.0, 0.0, (1.0, 1.0)),
        # 3 x .1: sumsq - n * mean^2 rounds to -3.5e-18, clamped at 0 (else sqrt of a negative)
        ([0.1, 0.1, 0.1], 0.1, 0.0, 0.0, (0.1, 0.1)),
        # n=1: a mean, no variance
        ([0.6], 0.6, None, None, None),
        # n=0: nothing
        ([], None, None, None, None),
    ],
)
def test_score_stats_by_hand(
    scores: list[float], mean: float | None, var: float | None, se: float | None, ci95: tuple[float, float] | None
) -> None:
    got = stats_of(scores)
    assert got.n == len(scores)
    assert (got.mean, got.var, got.se) == (approx(mean), approx(var), approx(se))
    assert got.ci95 == (None if ci95 is None else approx(ci95))
    assert got.var is None or got.var >= 0


@pytest.mark.parametrize(
    ("arm", "control", "diff", "se", "ci95", "p", "significant"),
    [
        # .75 - .25 = .5; se sqrt(.25^2 + .25^2) = sqrt(.125) = .3535534; z = .5 / .3535534 = sqrt(2);
        # p = erfc(sqrt(2) / sqrt(2)) = erfc(1) = .1572992; ci .5 -/+ 1.96 * .3535534 = .5 -/+ .6929646
        ([1, 1, 0, 1], [0, 1, 0, 0], 0.5, math.sqrt(0.125), (-0.1929646, 1.1929646), 0.1572992, False),
        # the other way round: the sign flips, the p-value does not
        ([0, 1, 0, 0], [1, 1, 0, 1], -0.5, math.sqrt(0.125), (-1.1929646, 0.1929646), 0.1572992, False),
        # .8 - .5 = .3; se sqrt((.4/7)^2 + (.5/7)^2) = sqrt(.41)/7 = .0914732; z = 3.2796490;
        # p = erfc(3.2796490 / sqrt(2)) = .0010394; ci .3 -/+ 1.96 * .0914732 = .3 -/+ .1792875
        (FORTY_OF_FIFTY, HALF_OF_FIFTY, 0.3, math.sqrt(0.41) / 7, (0.1207125, 0.4792875), 0.0010394, True),
        # an arm with one score: the difference .6 - .25 = .35, nothing else
        ([0.6], [0, 1, 0, 0], 0.35, None, None, None, None),
        # a control with one score: the same
        ([1, 1, 0, 1], [1], -0.25, None, None, None, None),
        # an arm without scores: nothing at all
        ([], [0, 1, 0, 0], None, None, None, None, None),
        # se 0 both sides and the same mean: p 1, not significant
        ([1, 1, 1], [1, 1], 0.0, 0.0, (0.0, 0.0), 1.0, False),
        # se 0 both sides and different means: p 0, significant
        ([1, 1, 1], [0, 0, 0], 1.0, 0.0, (1.0, 1.0), 0.0, True),
    ],
)
def test_compare_by_hand(
    arm: list[float],
    control: list[float],
    diff: float | None,
    se: float | None,
    ci95: tuple[float, float] | None,
    p: float | None,
    significant: bool | None,
) -> None:
    got = compare(stats_of(arm), stats_of(control))
    assert (got.diff, got.se, got.p_value) == (approx(diff), approx(se), approx(p))
    assert got.ci95 == (None if ci95 is None else approx(ci95))
    assert got.significant is significant


@pytest.mark.parametrize(
    ("order", "seen", "expected"),
    [
        ({"e": ["ctrl", "alt"]}, {"alt", "ctrl"}, ["ctrl", "alt"]),
        ({"e": ["ctrl", "alt"]}, {"alt", "zed", "beta"}, ["ctrl", "alt", "beta", "zed"]),  # control without data
        ({}, {"ctrl", "alt"}, ["alt", "ctrl"]),
        ({"other": ["z"]}, {"b", "a"}, ["a", "b"]),
    ],
)
def test_arm_order(order: dict[str, list[str]], seen: set[str], expected: list[str]) -> None:
    assert ordered_arms("e", seen, order) == expected


def test_fields_split_experiment_and_arm_left_and_metric_right() -> None:
    aggs = Aggregates.empty()
    aggs.add_feedback("exp.1|arm-a|rater: a.b-c d|n", b"2")
    aggs.add_feedback("exp.1|arm-a|rater: a.b-c d|sum", b"1.5")
    aggs.add_feedback("exp.1|arm-a|rater: a.b-c d|sumsq", "1.25")
    aggs.add_feedback("exp.1|arm-a|nostat", "1")  # malformed: ignored
    aggs.add_feedback("exp.1|arm-a|src|mean", "1")  # unknown stat: ignored
    aggs.add_ledger("exp.1|arm-a|jobs", b"3")
    aggs.add_ledger("exp.1|arm-a|tokens", b"9")  # unknown metric: ignored
    assert dict(aggs.feedback) == {("exp.1", "arm-a", "rater: a.b-c d"): [2.0, 1.5, 1.25]}
    assert aggs.ledger[("exp.1", "arm-a")]["jobs"] == 3
    [row] = build_rows(aggs)
    assert (row["source"], row["feedback"], row["mean_score"], row["jobs"]) == ("rater: a.b-c d", 2, 0.75, 3)


DAYS = ("2026-11-30", "2026-12-01")
LEDGER: dict[str, dict[str, int]] = {
    DAYS[0]: {
        "tone|ctrl|jobs": 2,
        "tone|ctrl|cost_nusd": 2_000_000,
        "tone|ctrl|baseline_nusd": 3_000_000,
        "tone|alt|jobs": 1,
        "tone|alt|cost_nusd": 500_000,
        "tone|alt|shadow_nusd": 100_000,
        "beta|only|jobs": 5,
        "beta|only|cost_nusd": 0,
    },
    DAYS[1]: {
        "tone|ctrl|jobs": 2,
        "tone|ctrl|cost_nusd": 2_000_000,
        "tone|ctrl|errors": 1,
        "tone|alt|jobs": 3,
        "tone|alt|cost_nusd": 1_500_000,
        "tone|alt|cache_hits": 1,
    },
}
FEEDBACK: dict[str, dict[tuple[str, str, str], list[float]]] = {
    DAYS[0]: {("tone", "ctrl", "human"): [0, 1], ("tone", "alt", "human"): [1, 1]},
    DAYS[1]: {
        ("tone", "ctrl", "human"): [0, 0],
        ("tone", "alt", "human"): [1, 0],
        ("tone", "alt", "shadow"): [0.5, 0.7],
    },
}


def queue_seed(pipe: Any, keys: RedisKeys) -> None:
    """Queue the seeding commands on a pipeline, sync or async (their commands queue alike)."""
    for day in DAYS:
        pipe.sadd(keys.ledger_days, day)
        pipe.hset(keys.ledger_arms(day), mapping=LEDGER[day])
        for (exp, arm, source), scores in FEEDBACK[day].items():
            field = f"{exp}|{arm}|{source}"
            for s in scores:
                pipe.hincrby(keys.feedback_arms(day), f"{field}|n", 1)
                pipe.hincrbyfloat(keys.feedback_arms(day), f"{field}|sum", s)
                pipe.hincrbyfloat(keys.feedback_arms(day), f"{field}|sumsq", s * s)


async def seed(redis: Redis, keys: RedisKeys) -> None:
    pipe = redis.pipeline(transaction=False)
    queue_seed(pipe, keys)
    await pipe.execute()


def seed_sync(settings: Settings) -> None:
    """For the command-line tests, which are not coroutines: the CLI runs its own event loop."""
    client = SyncRedis.from_url(settings.redis_url)
    try:
        pipe = client.pipeline(transaction=False)
        queue_seed(pipe, settings.keys)
        pipe.execute()
    finally:
        client.close()


def brief(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str | None, int, int]]:
    return [(r["experiment"], r["arm"], r["control"], r["source"], r["jobs"], r["feedback"]) for r in rows]


async def test_rows_over_both_days(redis: Redis, settings: Settings) -> None:
    await seed(redis, settings.keys)
    rows = await load_strategy_rows(redis, settings.keys, arm_order={"tone": ["ctrl", "alt"]})
    assert brief(rows) == [
        ("beta", "only", "only", None, 5, 0),  # jobs, no feedback: one row, source None
        ("tone", "ctrl", "ctrl", "human", 4, 4),
        ("tone", "alt", "ctrl", "human", 4, 4),
        ("tone", "alt", "ctrl", "shadow", 4, 2),
    ]
    beta, ctrl, alt, shadow = rows
    assert beta["cost_per_job_usd"] == 0.0 and beta["cost_ratio_vs_control"] is None  # control costs nothing
    assert beta["mean_score"] is None and beta["ci95"] is None and beta["significant"] is None
    # ctrl: scores 0,1,0,0 (mean .25, se .25); 4 jobs for $0.004, $0.001 a job
    assert ctrl["cost_usd"] == approx(0.004) and ctrl["cost_per_job_usd"] == approx(0.001)
    assert (ctrl["baseline_cost_usd"], ctrl["errors"]) == (approx(0.003), 1)
    assert (ctrl["mean_score"], ctrl["ci95"]) == (approx(0.25), approx([-0.24, 0.74]))
    assert ctrl["diff_vs_control"] is None and ctrl["p_value"] is None  # the control is not compared with itself
    assert ctrl["cost_ratio_vs_control"] == approx(1.0)
    # alt: scores 1,1,1,0 (mean .75, se .25): diff .5, p erfc(1); 4 jobs for $0.002, half the control's per job
    assert (alt["mean_score"], alt["ci95"]) == (approx(0.75), approx([0.26, 1.24]))
    assert alt["diff_vs_control"] == approx(0.5) and alt["diff_ci95"] == approx([-0.1929646, 1.1929646])
    assert (alt["p_value"], alt["significant"]) == (approx(math.erfc(1)), False)
    assert alt["cost_ratio_vs_control"] == approx(0.5)
    assert (alt["cache_hits"], alt["shadow_cost_usd"]) == (1, approx(100_000 / NANO))
    # shadow: .5, .7 (mean .6, se .1); the control has no shadow scores, so no difference
    assert (shadow["mean_score"], shadow["ci95"]) == (approx(0.6), approx([0.404, 0.796]))
    assert shadow["diff_vs_control"] is None and shadow["significant"] is None
    assert json.loads(json.dumps(rows)) == rows  # JSON as it is


async def test_since_keeps_the_later_days(redis: Redis, settings: Settings) -> None:
    await seed(redis, settings.keys)
    rows = await load_strategy_rows(redis, settings.keys, since=DAYS[1], arm_order={"tone": ["ctrl", "alt"]})
    assert brief(rows) == [
        ("tone", "ctrl", "ctrl", "human", 2, 2),
        ("tone", "alt", "ctrl", "human", 3, 2),
        ("tone", "alt", "ctrl", "shadow", 3, 2),
    ]
    # ctrl 0,0 (mean 0, se 0), alt 1,0 (mean .5, var .5, se .5): diff .5, se .5, z 1, p erfc(1/sqrt 2) = .3173105
    alt = rows[1]
    assert (alt["diff_vs_control"], alt["p_value"]) == (approx(0.5), approx(0.3173105))
    assert alt["diff_ci95"] == approx([-0.48, 1.48])
    assert await load_strategy_rows(redis, settings.keys, since="2026-12-02") == []
    with pytest.raises(InvalidRequest, match="'12/01/2026' is not a date"):
        await load_strategy_rows(redis, settings.keys, since="12/01/2026")


async def test_without_arm_order_the_first_arm_by_name_is_the_control(redis: Redis, settings: Settings) -> None:
    await seed(redis, settings.keys)
    rows = await load_strategy_rows(redis, settings.keys, arm_order={"other": ["x", "y"]})
    assert brief(rows)[1:] == [
        ("tone", "alt", "alt", "human", 4, 4),
        ("tone", "alt", "alt", "shadow", 4, 2),
        ("tone", "ctrl", "alt", "human", 4, 4),
    ]
    assert rows[3]["diff_vs_control"] == approx(-0.5) and rows[3]["cost_ratio_vs_control"] == approx(2.0)


async def test_source_filter(redis: Redis, settings: Settings) -> None:
    await seed(redis, settings.keys)
    rows = await load_strategy_rows(redis, settings.keys, arm_order={"tone": ["ctrl", "alt"]}, source="shadow")
    assert brief(rows) == [
        ("beta", "only", "only", None, 5, 0),
        ("tone", "ctrl", "ctrl", None, 4, 0),  # no shadow scores: still shown, feedback 0
        ("tone", "alt", "ctrl", "shadow", 4, 2),
    ]
    assert rows[2]["diff_vs_control"] is None


def write_policy(tmp_path: Path, settings: Settings) -> Path:
    body = json.loads(settings.policy.read_text())
    body["experiments"] = [
        {
            "name": "tone",
            "arms": [
                {"name": "ctrl", "strategy": {"kind": "rules"}},
                {"name": "alt", "strategy": {"kind": "model", "model": "openai/gpt-4o-mini"}},
            ],
        }
    ]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(body))
    return path


def cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings, policy: Path) -> None:
    monkeypatch.setenv("FAREBOX_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("FAREBOX_REDIS_PREFIX", settings.redis_prefix)
    monkeypatch.setenv("FAREBOX_POLICY", str(policy))


def test_cli_json_takes_the_control_from_the_policy(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_sync(settings)
    cli_env(monkeypatch, settings, write_policy(tmp_path, settings))
    assert main(["report", "--by", "strategy", "--json", "--since", DAYS[0]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "normal approximation" in out["note"] and "1.96" in out["note"]
    assert brief(out["rows"])[1:] == [
        ("tone", "ctrl", "ctrl", "human", 4, 4),
        ("tone", "alt", "ctrl", "human", 4, 4),
        ("tone", "alt", "ctrl", "shadow", 4, 2),
    ]
    assert out["rows"][2]["p_value"] == approx(math.erfc(1))
    assert main(["report", "--by", "strategy", "--json", "--source", "human"]) == 0
    assert [r["source"] for r in json.loads(capsys.readouterr().out)["rows"]] == [None, "human", "human"]


def test_cli_without_a_policy_orders_arms_by_name(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_sync(settings)
    cli_env(monkeypatch, settings, tmp_path / "missing.json")
    assert main(["report", "--by", "strategy", "--json"]) == 0
    captured = capsys.readouterr()
    assert [r["control"] for r in json.loads(captured.out)["rows"]] == ["only", "alt", "alt", "alt"]
    assert "policy not loaded" in captured.err


@pytest.mark.parametrize("fmt", [[], ["--csv"]])
def test_cli_table_and_csv(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fmt: list[str],
) -> None:
    seed_sync(settings)
    cli_env(monkeypatch, settings, write_policy(tmp_path, settings))
    assert main(["report", "--by", "strategy", *fmt]) == 0
    out = capsys.readouterr().out
    if fmt:
        header, *lines = out.splitlines()
        assert header.startswith("experiment,arm,control,source,jobs,") and "ci95_lo,ci95_hi" in header
        assert len(lines) == 4 and lines[2].startswith("tone,alt,ctrl,human,4,")
    else:
        assert "ctrl (control)" in out and "+0.500 [-0.193, +1.193]" in out and "0.1573" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--by", "strategy,tenant"], "--by: strategy is a report of its own and cannot be combined"),
        (["--by", "tenant,strategy"], "--by: strategy is a report of its own and cannot be combined"),
        (["--by", "tenant", "--source", "human"], "--source: only with --by strategy"),
        (["--by", "strategy", "--tenant", "acme"], "--tenant: experiment arms are not kept per tenant"),
        (
            ["--by", "strategies"],
            "--by: unknown dimension(s) strategies; use tenant, provider, model, day, lane or strategy",
        ),
    ],
)
def test_cli_refuses_bad_combinations(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["report", *argv])
    assert str(exc_info.value.code).startswith(message)
