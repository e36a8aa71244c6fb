"""The benchmark harness in one command: the tables of issue 8 (pipeline_throughput, ceiling,
cache_hit, io_concurrency, cost, litellm_peer, and http_client: the provider calls' HTTP client), fairness
(single interactive jobs during another tenant's backfill, issue 19), and
ab_replay (the rules-vs-learned A/B test replayed on held-out RouteLLM outcomes, and the CPU of experiments)
from at least three runs each (median with min and max), one script after another so they never
compete for the cores. The long fault runs (provider_faults.py, chaos.py) and route_speed.py stay
separate.

    .venv/bin/python bench/run_all.py            # the full set, 20-30 minutes on 2 cores (+ the LiteLLM install)
    .venv/bin/python bench/run_all.py --smoke    # every script once on tiny inputs (~1 minute), tables to a temp dir
    .venv/bin/python bench/run_all.py --only ceiling litellm_peer
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# script -> (full arguments, smoke arguments); the smoke skips the LiteLLM peer (it installs ~700 MB on first use)
SUITE: dict[str, tuple[list[str], list[str] | None]] = {
    "pipeline_throughput": (["--jobs", "5000", "--runs", "3"], ["--jobs", "200", "--runs", "1", "--singles", "10"]),
    "ceiling": (
        ["--jobs", "3000", "--runs", "3"],
        ["--jobs", "200", "--runs", "1", "--singles", "10", "--in-flight", "64"],
    ),
    "cache_hit": (["--runs", "3"], ["--runs", "1", "--singles", "10", "--bulk", "200"]),
    "io_concurrency": (
        ["--jobs", "5000", "--runs", "3"],
        ["--jobs", "200", "--runs", "1", "--latency-ms", "200", "--provider-concurrency", "64"],
    ),
    "cost": (["--jobs", "10000", "--runs", "3"], ["--jobs", "200", "--runs", "1"]),
    "litellm_peer": (["--jobs", "3000", "--runs", "3"], None),
    "http_client": (["--calls", "1000", "--runs", "7"], ["--calls", "200", "--runs", "1", "--in-flight", "32"]),
    "fairness": (["--jobs", "3000", "--runs", "3", "--shared"], ["--smoke"]),
    "ab_replay": (
        ["--jobs", "2000", "--replays", "3", "--runs", "3"],
        [
            "--jobs",
            "200",
            "--replays",
            "1",
            "--runs",
            "1",
            "--cpu-jobs",
            "64",
            "--checkpoint",
            "50",
            "--no-pipeline-cpu",
            "--folds",
            "2",
        ],
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny inputs, one run each, tables to a temp dir")
    ap.add_argument("--only", nargs="+", choices=sorted(SUITE), help="run these scripts only")
    ap.add_argument("--results", help="write the tables here (default bench/results; a temp dir with --smoke)")
    a = ap.parse_args()
    env = dict(os.environ)
    if a.results or a.smoke:
        env["FAREBOX_BENCH_RESULTS"] = a.results or tempfile.mkdtemp(prefix="farebox-bench-smoke-")
    failed = []
    for name in a.only or SUITE:
        full, smoke = SUITE[name]
        args = smoke if a.smoke else full
        if args is None:
            print(f"== {name}: skipped in --smoke", flush=True)
            continue
        print(f"== {name} {' '.join(args)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], env=env).returncode
        print(f"== {name}: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    print(
        f"tables in {env.get('FAREBOX_BENCH_RESULTS', HERE / 'results')}"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
