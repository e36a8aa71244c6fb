"""An A/B test of two routing strategies, end to end, on recorded outcomes: RouteLLM prompts replayed through the
pipeline (every stage its own process) with the emulator answering each model right or wrong as the data says;
experiment "router-ab" puts each job in arm "rules" (control) or "learned" at 1:1, a grader scores each answer
(the label or not) and sends it as feedback (source "grader"), and `farebox report --by strategy`'s rows
(farebox/strategy_report.py) give each arm's jobs, cost and mean score with its difference from the control.
Also: after how many jobs the difference is significant, what offline evaluation of the same decisions
predicts, and the CPU per job that experiments and feedback add. Writes bench/results/ab_replay.md.

The replay runs --replays times, each a fresh pipeline and another arm draw (the job ids are salted). CPU: the
route core's handle in-process with and without the experiment (same router per job), the arm pin, and the
feedback stage's decode + handle; and per replay the route and account processes' CPU per job against two
pipelines that route the same jobs with each arm's router alone (--no-pipeline-cpu skips those).

    .venv/bin/python bench/ab_replay.py --jobs 2000 --runs 3

Held out (router-evaluation.md: never evaluated on its training data): the MMLU subjects are shuffled with
--seed and split in two halves; the learned arm's router is trained (farebox/routing/training.py, as `router
train` does) on one half only; the --jobs replayed prompts are drawn (seeded) from the other half and GSM8K,
dropping any prompt whose text is also in the training half. MMLU high-school mathematics is in neither (its
GPT-4 outcomes are grading failures: `broken_groups`).

Answers: every high-tier model of the catalog answers as GPT-4-1106 did, every other model as Mixtral-8x7B
did (emulator outcomes file; the execute stage sends the prompt as the only message, no system message). The
bench policy is catalog/policy.json with the task rules removed (they raise reason/code jobs to high in both
arms, hiding the routers' difference on those prompts: their count is printed) and pii "allow" (a redacted
prompt no longer matches its recorded outcome). Jobs are quality "medium", cache bypassed, all prompts distinct.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop
from ab_setup import (
    ARMS,
    EXPERIMENT,
    Replay,
    cpu_runs,
    emulator_stats,
    grade,
    make_replay,
    outcomes_emulator,
    predict,
    premium_targets,
    replay_job,
    send_feedback,
    write_outcomes,
    write_policies,
)
from ab_tables import Bench, Graded, Run, graded, table
from common import CpuGroups, process_pipeline, publish_table, wait_for_emulator
from redis.asyncio import Redis

from farebox.client import FareboxClient
from farebox.settings import Settings
from farebox.strategy_report import load_strategy_rows


async def grade_phase(
    client: FareboxClient, settings: Settings, account_pid: int, run: Run, labels: list[str]
) -> Graded:
    account = CpuGroups({"account": [account_pid]})
    t0 = time.monotonic()
    refused = await send_feedback(client, run.job_ids, run.scores, labels)
    seconds = time.monotonic() - t0
    account_ms = account.per_job_ms(len(run.job_ids))["account"]
    redis = Redis.from_url(settings.redis_url)
    try:
        rows = await load_strategy_rows(redis, settings.keys, arm_order={EXPERIMENT: list(ARMS)}, source="grader")
    finally:
        await redis.aclose()
    return Graded(rows, seconds, refused, account_ms)


async def replay_run(emulator: str, policy: Path, replay: Replay, salt: str, *, grade_it: bool = True) -> Run:
    """The replay through a fresh process pipeline, then (``grade_it``) the grades as feedback. Arms are drawn
    from the job ids, ``salt`` + the prompt's index: another salt, another draw."""
    emulator_stats(emulator, reset=True)
    async with (
        process_pipeline(emulator, policy=policy) as (settings, procs),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=60, coalesce_writes=True) as client,
    ):
        job_ids = [f"{salt}-{i}" for i in range(len(replay.prompts))]
        jobs = [replay_job(p, j) for p, j in zip(replay.prompts, job_ids, strict=True)]
        stages = CpuGroups({s: [procs.procs[s].pid] for s in ("route", "account")})
        t0 = time.monotonic()
        results = {r.job_id: r async for r in client.stream(jobs, max_in_flight=256)}
        jobs_s = time.monotonic() - t0
        stage_ms = stages.per_job_ms(len(job_ids))
        ordered = [results[j] for j in job_ids]
        run = Run(
            job_ids=job_ids,
            arms=[r.route.strategy.arm if r.route and r.route.strategy else "-" for r in ordered],
            targets=[f"{r.provider}/{r.model}" for r in ordered],
            scores=np.array([grade(r, lab) for r, lab in zip(ordered, replay.labels, strict=True)]),
            errors=sum(r.status != "ok" for r in ordered),
            jobs_s=jobs_s,
            stage_ms=stage_ms,
            emulator=emulator_stats(emulator),
            graded=None,
        )
        if grade_it:
            run.graded = await grade_phase(client, settings, procs.procs["account"].pid, run, replay.labels)
    return run


# --- the table ------------------------------------------------------------------------------------------------


def check(b: Bench) -> None:
    """Refuse a run that did not measure what it says: errors, refusals, unmatched prompts, or routes that
    differ from the in-process decisions."""
    for run, pred in zip(b.runs, b.predicted, strict=True):
        unmatched = (run.emulator.get("outcomes") or {}).get("unmatched", 0)
        if run.errors or graded(run).refused or unmatched or run.targets != pred.targets or run.arms != pred.arms:
            raise SystemExit("a replay had errors, refused feedback, unmatched prompts or unpredicted routes")


async def replays(a: argparse.Namespace, replay: Replay, policies: dict[str, Path], emulator: str) -> Bench:
    """Per replay: the experiment run, then each arm's router alone on the same jobs (order rotating)."""
    runs, bases = [], []
    for r in range(a.replays):
        names = ["experiment", *ARMS] if a.pipeline_cpu else ["experiment"]
        got = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            got[name] = await replay_run(emulator, policies[name], replay, f"ab{a.seed}r{r}", grade_it=name == names[0])
        runs.append(got.pop("experiment"))
        bases += [got] if got else []
    premium = premium_targets()
    predicted = [predict(replay, policies["experiment"], r.job_ids, premium) for r in runs]
    everyone = {arm: predict(replay, policies["experiment"], runs[0].job_ids, premium, arm) for arm in ARMS}
    return Bench(a, replay, premium, runs, bases, predicted, everyone, {})


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000, help="prompts replayed")
    ap.add_argument("--replays", type=int, default=3, help="pipeline runs, each with another arm draw")
    ap.add_argument("--runs", type=int, default=3, help="passes of the in-process CPU measurements")
    ap.add_argument("--cpu-jobs", type=int, default=1000, help="replayed prompts per CPU pass")
    ap.add_argument("--checkpoint", type=int, default=100, help="jobs between significance checkpoints")
    ap.add_argument("--seed", type=int, default=1, help="the subject split and the prompts drawn")
    ap.add_argument(
        "--pipeline-cpu",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run each arm's router alone per replay, for the pipeline processes' CPU without an experiment",
    )
    ap.add_argument("--folds", type=int, default=7, help="grouped cross-validation folds of the router's training")
    a = ap.parse_args()
    replay = make_replay(a.jobs, a.seed, folds=a.folds)
    with tempfile.TemporaryDirectory(prefix="farebox-ab-") as tmp:
        folder = Path(tmp)
        router = folder / "router.json"
        router.write_text(json.dumps(replay.trained.document, indent=1))
        write_outcomes(folder / "outcomes.jsonl", replay, premium_targets())
        policies = write_policies(folder, router)
        with outcomes_emulator(folder / "outcomes.jsonl") as emulator:
            await wait_for_emulator()
            bench = await replays(a, replay, policies, emulator)
        bench.cpu = await cpu_runs(policies, replay.prompts[: a.cpu_jobs], a.runs)
    publish_table("ab_replay", table(bench))
    check(bench)


if __name__ == "__main__":
    uvloop.run(main())
