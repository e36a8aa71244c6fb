"""Jobs from ../shared/workloads/make_workload.py (real prompts with a known count of exact
repeats), as the tests and the benchmarks use them."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

WORKLOAD = Path(__file__).resolve().parents[3] / "shared" / "workloads" / "make_workload.py"


def make_workload(jobs: int, dup_rate: float, seed: int = 3) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The jobs, and the generator's summary (jobs, unique_keys, repeats, ...)."""
    run = subprocess.run(
        [sys.executable, str(WORKLOAD), "--jobs", str(jobs), "--dup-rate", str(dup_rate), "--seed", str(seed)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in run.stdout.splitlines()], json.loads(run.stderr.strip().splitlines()[-1])


def ticket_jobs(n: int) -> list[dict[str, Any]]:
    """``n`` distinct, cheap classify jobs with their own job ids."""
    return [
        {
            "prompt": f"Classify ticket {i}: refund please",
            "task": "classify",
            "quality": "low",
            "job_id": str(uuid.uuid4()),
        }
        for i in range(n)
    ]
