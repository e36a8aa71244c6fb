"""Routing decisions per second of farebox.routing.choose.choose_route over a JSONL workload.

    python /work/shared/workloads/make_workload.py --jobs 10000 --dup-rate 0 > /tmp/w.jsonl
    python bench/route_speed.py /tmp/w.jsonl [--repeat 3] [--md bench/results/route_speed.md]

Measures, on one core, after parsing (parsing is the intake's cost, not the router's):
  * route only: choose_route with a precomputed token count (what the route stage does per job besides I/O);
  * count + route: farebox.tokens.count_messages then choose_route;
  * estimate: the whole `farebox estimate` path (count, route, baseline, breakdowns).
Best of --repeat runs, so a noisy neighbour does not understate the figure.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farebox.routing.catalog import load_catalog
from farebox.routing.choose import choose_route
from farebox.routing.estimate import EstimateReport
from farebox.routing.policy import load_policy
from farebox.schemas import Job
from farebox.settings import CATALOG_DIR
from farebox.tokens import count_messages


def best(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--md", help="also write a markdown result file here")
    a = ap.parse_args()

    catalog = load_catalog(CATALOG_DIR / "model_costs.json")
    policy = load_policy(CATALOG_DIR / "policy.json")
    with open(a.workload) as f:
        jobs = [Job.model_validate_json(line) for line in f if line.strip()]
    n = len(jobs)
    tokens = [count_messages((m.role, m.content) for m in j.chat) for j in jobs]

    def route_only() -> None:
        for job, t in zip(jobs, tokens, strict=True):
            choose_route(job, catalog, policy, input_tokens=t)

    def count_and_route() -> None:
        for job in jobs:
            choose_route(job, catalog, policy, input_tokens=count_messages((m.role, m.content) for m in job.chat))

    report = EstimateReport()

    def estimate() -> None:
        nonlocal report
        report = EstimateReport()
        for job in jobs:
            report.add_job(job, catalog, policy)

    r_only = n / best(route_only, a.repeat)
    r_count = n / best(count_and_route, a.repeat)
    r_est = n / best(estimate, a.repeat)
    d = report.as_dict()
    by_model = ", ".join(f"{k} {v['jobs']}" for k, v in sorted(d["by_model"].items(), key=lambda kv: -kv[1]["jobs"]))
    lines = [
        "# Routing speed (farebox.routing.choose.choose_route)",
        "",
        f"Workload: `{a.workload}`, {n} jobs (make_workload.py; mean input {sum(tokens) / n:.0f} tokens). "
        f"Python {platform.python_version()} on {platform.machine()}, one core, best of {a.repeat} runs.",
        f"Catalog: bundled, {len(catalog)} models; policy: bundled (pii action `{policy.pii.action}`).",
        "",
        "| path | decisions/s | µs/decision |",
        "|---|---:|---:|",
        f"| route only (token count given) | {r_only:,.0f} | {1e6 / r_only:.1f} |",
        f"| count tokens + route | {r_count:,.0f} | {1e6 / r_count:.1f} |",
        f"| full estimate (count, route, baseline, breakdown) | {r_est:,.0f} | {1e6 / r_est:.1f} |",
        "",
        "Estimate of the same workload under the bundled policy:",
        "",
        f"- routed {d['routed']}, blocked {d['blocked']}, invalid {d['invalid']}, redacted {d['redacted']}",
        f"- cost under policy ${d['cost_usd']:.4f} vs all on baseline ({policy.baseline_model}) "
        f"${d['baseline_cost_usd']:.4f}: savings ${d['savings_usd']:.4f} ({d['savings_pct']:.1f}%)",
        f"- by model: {by_model}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.md:
        Path(a.md).write_text(text)


if __name__ == "__main__":
    main()
