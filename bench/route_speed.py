"""Routing speed and the route stage's CPU per job, with the policy's router kind ``rules`` and ``learned``
side by side in one run, over a JSONL workload.

    python /work/shared/workloads/make_workload.py --jobs 10000 --dup-rate 0 > /tmp/w.jsonl
    python bench/route_speed.py /tmp/w.jsonl [--repeat 3] [--md bench/results/route_speed.md]
    python bench/route_speed.py /tmp/w.jsonl --against OLD_ROUTER.json   # two router files side by side

``--against FILE`` puts a learned policy with that router file in the place of the rules one: for example
the router of an earlier commit (``git show REV:catalog/router.json``) against today's, in one run.

The two policies are the bundled one (``learned``: the router file it names, loaded as the pipeline loads
it) and the same policy with ``"router": {"kind": "rules"}``. Measured on one core, after parsing (parsing is
the intake's cost, not the router's):
  * CPU per job: thread CPU time of what the route stage does per job besides I/O (count the prompt's
    tokens, then choose_route, which scores the prompt when the router is learned), each job timed under
    both routers back to back, in alternating order. Per run: the median, p95 and max over the jobs; the
    table gives the median of the runs with their min and max;
  * route only: choose_route with a precomputed token count; count + route; and the whole `farebox estimate`
    path (count, route, baseline, breakdowns), as decisions per second, best of --repeat runs so a noisy
    neighbour does not understate the figure.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farebox.routing.catalog import Catalog
from farebox.routing.choose import choose_route
from farebox.routing.estimate import EstimateReport
from farebox.routing.learned import LearnedRouter, load_router, prompt_text
from farebox.routing.policy import Policy, RouterRule
from farebox.routing.store import load_pair
from farebox.schemas import Job
from farebox.settings import CATALOG_DIR
from farebox.tokens import count_messages

P95_TARGET_MS = 5.0  # issue 17: route-stage CPU per job, p95


class Mode:
    def __init__(self, name: str, catalog: Catalog, policy: Policy, router: LearnedRouter | None) -> None:
        self.name, self.catalog, self.policy, self.router = name, catalog, policy, router

    def stage_work(self, job: Job) -> None:
        """The route stage's synchronous work for one job (workers/route.py, without Redis and the broker)."""
        tokens = count_messages((m.role, m.content) for m in job.chat)
        choose_route(job, self.catalog, self.policy, input_tokens=tokens, router=self.router)


def modes(against: str | None = None) -> tuple[Mode, Mode]:
    catalog, policy, router, _ = load_pair(CATALOG_DIR / "model_costs.json", CATALOG_DIR / "policy.json")
    if router is None:
        raise SystemExit(f"{CATALOG_DIR / 'policy.json'} routes by rules: nothing learned to compare")
    if against is not None:
        return Mode("against", catalog, policy, load_router(against)), Mode("learned", catalog, policy, router)
    rules = policy.model_copy(update={"router": RouterRule()})
    return Mode("rules", catalog, rules, None), Mode("learned", catalog, policy, router)


def percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def cpu_per_job(jobs: list[Job], pair: tuple[Mode, Mode]) -> tuple[list[int], list[int]]:
    """Thread CPU ns per job under each mode, each job timed under both back to back (order alternating)."""
    clock = time.thread_time_ns
    out: tuple[list[int], list[int]] = ([], [])
    for i, job in enumerate(jobs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for k in order:
            t0 = clock()
            pair[k].stage_work(job)
            out[k].append(clock() - t0)
    return out


def best(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def spread(values: list[float], scale: float = 1e-3) -> str:
    """median (min-max) of per-run figures, in µs from ns."""
    v = [x * scale for x in values]
    return f"{statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f})"


def throughput(jobs: list[Job], tokens: list[int], mode: Mode, repeat: int) -> tuple[float, float, float]:
    n = len(jobs)

    def route_only() -> None:
        for job, t in zip(jobs, tokens, strict=True):
            choose_route(job, mode.catalog, mode.policy, input_tokens=t, router=mode.router)

    def count_and_route() -> None:
        for job in jobs:
            mode.stage_work(job)

    def estimate() -> None:
        report = EstimateReport()
        for job in jobs:
            report.add_job(job, mode.catalog, mode.policy, router=mode.router)

    return n / best(route_only, repeat), n / best(count_and_route, repeat), n / best(estimate, repeat)


def tier_mix(jobs: list[Job], mode: Mode) -> str:
    report = EstimateReport()
    for job in jobs:
        report.add_job(job, mode.catalog, mode.policy, router=mode.router)
    d = report.as_dict()
    tiers = ", ".join(f"{k} {v['jobs']}" for k, v in d["by_tier"].items())
    cost, baseline = d["cost_usd"], d["baseline_cost_usd"]
    return f"{tiers}; cost ${cost:.4f} vs baseline ${baseline:.4f} ({d['savings_pct']:.1f}% less)"


Runs = dict[str, dict[str, list[float]]]  # mode -> statistic -> one figure per run, ns


def cpu_runs(jobs: list[Job], pair: tuple[Mode, Mode], repeat: int) -> tuple[Runs, dict[str, int]]:
    """Per mode, the median, p95, max and mean CPU per job of each run; and the slowest job of all runs."""
    runs: Runs = {m.name: {"p50": [], "p95": [], "max": [], "mean": []} for m in pair}
    worst = dict.fromkeys(runs, 0)
    for _ in range(repeat):
        for mode, samples in zip(pair, cpu_per_job(jobs, pair), strict=True):
            s = sorted(samples)
            stats = runs[mode.name]
            stats["p50"].append(percentile(s, 0.50))
            stats["p95"].append(percentile(s, 0.95))
            stats["max"].append(s[-1])
            stats["mean"].append(sum(s) / len(s))
            worst[mode.name] = max(worst[mode.name], s[-1])
    return runs, worst


def score_alone_s(jobs: list[Job], router: LearnedRouter, repeat: int) -> float:
    """Seconds to score every job's prompt one at a time, as the route stage does (best of ``repeat``)."""
    texts = [prompt_text([m.content for m in j.chat]) for j in jobs]

    def score_each() -> None:
        for text in texts:
            router.score([text])

    return best(score_each, repeat)


def cpu_table(runs: Runs, pair: tuple[Mode, Mode]) -> list[str]:
    return [
        "CPU per job (count tokens + choose_route, thread CPU time), µs: median of the runs (min-max)",
        "",
        "| router | median job | p95 job | max job | mean |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {m.name} | {spread(runs[m.name]['p50'])} | {spread(runs[m.name]['p95'])} | "
            f"{spread(runs[m.name]['max'])} | {spread(runs[m.name]['mean'])} |"
            for m in pair
        ),
    ]


def speed_table(speed: dict[str, tuple[float, float, float]], pair: tuple[Mode, Mode]) -> list[str]:
    paths = ("route only (token count given)", "count tokens + route", "full estimate (count, route, breakdown)")
    a, b = (m.name for m in pair)
    return [
        f"| path | {a} decisions/s | {b} decisions/s | {a} µs | {b} µs |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {speed[a][i]:,.0f} | {speed[b][i]:,.0f} | {1e6 / speed[a][i]:.1f} | {1e6 / speed[b][i]:.1f} |"
            for i, name in enumerate(paths)
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--md", help="also write a markdown result file here")
    ap.add_argument("--against", help="a router file to compare with, in the place of the rules")
    a = ap.parse_args()

    pair = modes(a.against)
    learned = pair[1]
    assert learned.router is not None
    with open(a.workload) as f:
        jobs = [Job.model_validate_json(line) for line in f if line.strip()]
    n = len(jobs)
    tokens = [count_messages((m.role, m.content) for m in j.chat) for j in jobs]
    for job in jobs[:200]:  # warm up both paths (regex compilation, numpy dispatch)
        for mode in pair:
            mode.stage_work(job)

    runs, worst = cpu_runs(jobs, pair, a.repeat)
    score_s = score_alone_s(jobs, learned.router, a.repeat)
    speed = {m.name: throughput(jobs, tokens, m, a.repeat) for m in pair}
    p95_ms = statistics.median(runs["learned"]["p95"]) / 1e6
    verdict = "meets" if p95_ms <= P95_TARGET_MS else "MISSES"
    lines = [
        f"# Route stage CPU per job and routing speed: {pair[0].name} vs learned",
        "",
        f"Workload: `{a.workload}`, {n} jobs (mean input {sum(tokens) / n:.0f} tokens, "
        f"{sum(1 for j in jobs if j.model is None)} automatic routes). Python {platform.python_version()} on "
        f"{platform.machine()}, one core, {a.repeat} runs, each job timed under both routers back to back.",
        f"Catalog: bundled, {len(learned.catalog)} models; policy: bundled (pii action `{learned.policy.pii.action}`);"
        f" learned router: {learned.router.describe()}.",
        "",
        *cpu_table(runs, pair),
        "",
        f"Learned p95 {p95_ms:.3f} ms: {verdict} the target of {P95_TARGET_MS:g} ms per job. "
        f"Scoring alone (router.score on one prompt): {1e6 * score_s / n:.1f} µs per job. "
        f"Slowest single job: {pair[0].name} {worst[pair[0].name] / 1e3:,.0f} µs, "
        f"learned {worst['learned'] / 1e3:,.0f} µs."
        + (f" Against: {pair[0].router.describe()}." if pair[0].router else ""),
        "",
        *speed_table(speed, pair),
        "",
        "Estimate of the same workload, by tier:",
        "",
        *(f"- {m.name}: {tier_mix(jobs, m)}" for m in pair),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.md:
        Path(a.md).write_text(text)


if __name__ == "__main__":
    main()
