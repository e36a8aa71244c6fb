"""The tables of bench/engines.py: jobs/s by engine, CPU per job by process, jobs/s a core of each stage carries."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field

from common import cores, spread

from tests.support.pipeline import ALL_STAGES

BEFORE_COMMIT = "db30b53"
IDLE_MS = 0.02  # a stage under this many CPU ms per job is all but idle (a few clock ticks over a run)


@dataclass
class Results:
    rates: dict[str, list[float | None]] = field(default_factory=dict)  # per round, None: the run failed
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # variant -> group -> per run
    errors: list[str] = field(default_factory=list)


def ratio_cell(res: Results, name: str, base: str) -> str:
    pairs = [
        a / b
        for a, b in zip(res.rates[name], res.rates[base], strict=True)
        if a is not None and b is not None and b > 0
    ]
    return spread(pairs, ".2f") if pairs else "-"


def rate_cell(res: Results, name: str) -> str:
    ok = [r for r in res.rates[name] if r is not None]
    failed = len(res.rates[name]) - len(ok)
    cell = spread(ok, ".0f") if ok else "-"
    return cell + (f" ({failed} failed)" if failed else "")


DESCRIBE = {
    "single": "machine's RabbitMQ 127.0.0.1:5672 + Redis 127.0.0.1:6379",
    "before": f"same engines, stages of {BEFORE_COMMIT}",
    "redis-cluster": "Redis Cluster, 3 masters (no replicas)",
    "sentinel-wait": "Redis master + replica + Sentinel, WAIT_REPLICAS=1",
    "sentinel": "Redis master + replica + Sentinel, WAIT_REPLICAS=0",
    "rabbit-cluster": "RabbitMQ 3-node cluster (quorum queues), stages spread",
    "both-clusters": "RabbitMQ 3-node cluster + Redis Cluster",
}


def cpu_groups_order(res: Results) -> list[str]:
    seen: list[str] = []
    for by_group in res.cpu.values():
        for g in by_group:
            if g not in seen:
                seen.append(g)
    return seen


def render(a: argparse.Namespace, res: Results, names: list[str], before_file: str) -> str:
    lines = [
        f"# Pipeline jobs/s by engine ({cores()} cores, {a.runs} rounds, each variant once a round, order rotating; "
        f"emulator at 0 ms)",
        "",
        f"{a.jobs} jobs from make_workload --dup-rate 0 per run, stages as OS processes (bench/common.py "
        "process_pipeline). Every engine started here runs on this machine beside the stages and stays up (idle) "
        "through the other variants' runs. Ratios are per round (the two runs of a pair are minutes apart at most).",
        "",
        *rates_table(res, names),
        f"`before` stages import farebox from {before_file} (checked in a child with their environment).",
        "",
    ]
    if "single" in res.cpu and "before" in res.cpu:
        lines += single_against_before(res)
    if "single" in res.cpu:
        lines += jobs_per_core(res)
    lines += every_variant_cpu(res, names)
    if res.errors:
        lines += ["## Failed runs", "", *[f"- {e}" for e in res.errors], ""]
    return "\n".join(lines)


def rates_table(res: Results, names: list[str]) -> list[str]:
    lines = [
        "| variant | engines | jobs/s | / single, per round | after / before, per round |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        after_before = ratio_cell(res, "single", "before") if name == "before" else ""
        lines.append(
            f"| {name} | {DESCRIBE[name]} | {rate_cell(res, name)} | "
            f"{ratio_cell(res, name, 'single') if name != 'single' else '1'} | {after_before} |"
        )
    pairs = [("single", "before"), ("sentinel-wait", "sentinel"), ("both-clusters", "rabbit-cluster")]
    pairs = [(x, y) for x, y in pairs if x in res.rates and y in res.rates]
    if pairs:
        lines += ["", "| pair, per round | ratio |", "|---|---|"]
        lines += [f"| {x} / {y} | {ratio_cell(res, x, y)} |" for x, y in pairs]
    return [*lines, ""]


def single_against_before(res: Results) -> list[str]:
    lines = [
        "## CPU ms per job by process, single (today's stages) vs before (" + BEFORE_COMMIT + ")",
        "",
        "| process | single | before | single / before, per round |",
        "|---|---|---|---|",
    ]
    for g in cpu_groups_order(res):
        s, b = res.cpu["single"].get(g), res.cpu["before"].get(g)
        if not s or not b:
            continue
        pairs = [x / y for x, y in zip(s, b, strict=False) if y > 0]
        lines.append(f"| {g} | {spread(s, '.2f')} | {spread(b, '.2f')} | {spread(pairs, '.2f') if pairs else '-'} |")
    stages = list(ALL_STAGES)
    stage_total = [
        sum(res.cpu[v][st][i] for st in stages) for v in ("single", "before") for i in range(len(res.cpu[v]["dedup"]))
    ]
    k = len(res.cpu["single"]["dedup"])
    lines.append(f"| all stages | {spread(stage_total[:k], '.2f')} | {spread(stage_total[k:], '.2f')} | |")
    return [*lines, ""]


def jobs_per_core(res: Results) -> list[str]:
    lines = [
        "## single: jobs/s one core of each stage would carry (1000 / its CPU ms per job)",
        "",
        "| stage | jobs/s per core |",
        "|---|---|",
    ]
    for st in ALL_STAGES:
        ms_runs = res.cpu["single"][st]
        if statistics.median(ms_runs) < IDLE_MS:
            lines.append(f"| {st} | - (under {IDLE_MS} CPU ms/job: the workload sends it next to no jobs) |")
            continue
        lines.append(f"| {st} | {spread([1000 / ms for ms in ms_runs], '.0f')} |")
    return [*lines, ""]


def every_variant_cpu(res: Results, names: list[str]) -> list[str]:
    shown = [n for n in names if n in res.cpu]
    lines = [
        "## CPU ms per job by process group, every variant",
        "",
        "rabbitmq and redis are the engines the variant uses (a cluster's nodes summed; Sentinel: master + replica + "
        "Sentinel summed); client is this script's process.",
        "",
        "| process | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for g in cpu_groups_order(res):
        cells = [spread(res.cpu[n][g], ".2f") if res.cpu[n].get(g) else "-" for n in shown]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return [*lines, ""]
