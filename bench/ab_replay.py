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
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from ab_setup import (
    ARMS,
    BATCH,
    EXPERIMENT,
    FEEDBACK_IN_FLIGHT,
    Predicted,
    Replay,
    checkpoints,
    cpu_runs,
    emulator_stats,
    grade,
    make_replay,
    outcomes_emulator,
    power_jobs,
    predict,
    premium_targets,
    replay_job,
    send_feedback,
    stays_significant,
    task_rule_share,
    write_outcomes,
    write_policies,
)
from common import CpuGroups, cores, process_pipeline, publish_table, spread, wait_for_emulator
from redis.asyncio import Redis

from farebox.client import FareboxClient
from farebox.settings import Settings
from farebox.strategy_report import load_strategy_rows


@dataclass
class Graded:
    """The feedback phase: every grade sent, then the strategy report's rows (source "grader")."""

    rows: list[dict[str, Any]]
    seconds: float
    refused: int  # feedback receipts with status "error"
    account_ms: float  # account process (it runs the feedback stage) CPU per feedback message


@dataclass
class Run:
    job_ids: list[str]
    arms: list[str]  # per job in submission order, from result.route.strategy ("-": none)
    targets: list[str]  # provider/model that answered
    scores: np.ndarray  # the grader's: 1 for the label, else 0
    errors: int
    jobs_s: float
    stage_ms: dict[str, float]  # route and account process CPU per job while the jobs ran
    emulator: dict[str, Any]
    graded: Graded | None  # None: a run without an experiment (CPU baseline only)


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


def ci(value: float | None, interval: Sequence[float] | None, sign: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{sign}.3f}" + (f" [{interval[0]:{sign}.3f}, {interval[1]:{sign}.3f}]" if interval else "")


@dataclass
class Bench:
    """Everything the table shows."""

    args: argparse.Namespace
    replay: Replay
    premium: list[str]
    runs: list[Run]  # with the experiment, one per replay
    bases: list[dict[str, Run]]  # per replay: the same jobs under each arm's router alone (no experiment)
    predicted: list[Predicted]  # per replay, in-process
    everyone: dict[str, Predicted]  # every replayed prompt under each arm's strategy, in-process
    cpu: dict[str, list[float]]


def graded(run: Run) -> Graded:
    assert run.graded is not None
    return run.graded


def report_rows(run: Run) -> list[str]:
    lines = [
        "| arm | jobs | cost/job USD | feedback | mean score [95% CI] | diff vs control [95% CI] | p | significant |",
        "|---|---:|---:|---:|---|---|---:|---|",
    ]
    for r in graded(run).rows:
        arm = f"{r['arm']} (control)" if r["arm"] == r["control"] else r["arm"]
        p = "-" if r["p_value"] is None else f"{r['p_value']:.2g}"
        sig = {True: "yes", False: "no", None: "-"}[r["significant"]]
        lines.append(
            f"| {arm} | {r['jobs']} | {r['cost_per_job_usd']:.7f} | {r['feedback']} | {ci(r['mean_score'], r['ci95'])}"
            f" | {ci(r['diff_vs_control'], r['diff_ci95'], '+')} | {p} | {sig} |"
        )
    return lines


def summary_rows(runs: list[Run], step: int) -> list[str]:
    """Per replay (another arm draw each): the report's figures and the jobs needed, median (min, max)."""
    stable = [stays_significant(checkpoints(r.arms, r.scores, step)) for r in runs]
    power = [power_jobs(r.arms, r.scores) for r in runs]
    rows = [{row["arm"]: row for row in graded(r).rows} for r in runs]
    figures: list[tuple[str, list[float], str]] = [
        (f"{arm}: {col}", [by_arm[arm][key] for by_arm in rows], spec)
        for arm in ARMS
        for col, key, spec in (("jobs", "jobs", ".0f"), ("cost/job USD", "cost_per_job_usd", ".7f"))
    ]
    figures += [
        *((f"{arm}: mean score", [by_arm[arm]["mean_score"] for by_arm in rows], ".3f") for arm in ARMS),
        ("learned - rules: diff", [by_arm[ARMS[1]]["diff_vs_control"] for by_arm in rows], "+.3f"),
        ("learned - rules: p", [by_arm[ARMS[1]]["p_value"] for by_arm in rows], ".2g"),
    ]
    if None not in stable:
        figures.append((f"jobs until significant for good (checkpoints every {step})", [s or 0 for s in stable], ".0f"))
    if None not in power:
        figures.append(("jobs a fixed-size test needs (80% power at the diff seen)", [p or 0.0 for p in power], ",.0f"))
    lines = ["| figure | median (min, max) over the replays |", "|---|---|"]
    lines += [f"| {name} | {spread(values, spec)} |" for name, values, spec in figures]
    per_replay = ", ".join("never" if s is None else str(s) for s in stable)
    return [*lines, f"| jobs until significant for good, per replay | {per_replay} |"]


def jobs_needed_lines(run: Run, step: int) -> list[str]:
    points = checkpoints(run.arms, run.scores, step)
    stable = stays_significant(points)
    first = next((k for k, c in points if c.significant), None)
    flips = sum(1 for (_, a), (_, b) in itertools.pairwise(points) if a.significant != b.significant)
    trail = ", ".join(f"{k}: {c.p_value:.2g}" for k, c in points if c.p_value is not None)
    when = f"from {stable} jobs on" if stable else "not at the last checkpoint"
    return [
        f"Jobs needed, replay 1 (checkpoints every {step} jobs in submission order, the report's normal test on"
        f" the jobs so far): significant and staying so {when}; first significant at {first or 'none'}; {flips}"
        " flips. Looking at every checkpoint and stopping at the first significant one inflates the false-positive"
        " rate well above 5%: a descriptive figure, not a stopping rule; the fixed-size figure is the one to plan"
        f" with. p by checkpoint: {trail}.",
    ]


def offline_rows(run: Run, predicted: Predicted, replay: Replay, premium: Sequence[str]) -> list[str]:
    arms, pred_arms = np.asarray(run.arms), np.asarray(predicted.arms)
    is_premium = np.array([t in premium for t in run.targets])
    from_data = np.where(is_premium, replay.strong, replay.weak)
    same = np.asarray(run.targets) == np.asarray(predicted.targets)
    lines = [
        "| arm | premium share: pipeline / in-process | same arm and model as in-process | mean score: graded /"
        " recorded outcomes of the pipeline's models / in-process prediction | all-premium / all-economy on the"
        " arm's prompts |",
        "|---|---|---:|---|---|",
    ]
    for arm in ARMS:
        m, pm = arms == arm, pred_arms == arm
        agree = (m & pm & same).sum() / max(1, m.sum())
        lines.append(
            f"| {arm} | {is_premium[m].mean():.3f} / {predicted.premium[pm].mean():.3f} | {100 * agree:.1f}% | "
            f"{run.scores[m].mean():.4f} / {from_data[m].mean():.4f} / {predicted.scores[pm].mean():.4f} | "
            f"{replay.strong[m].mean():.3f} / {replay.weak[m].mean():.3f} |"
        )
    return lines


def everyone_line(b: Bench) -> str:
    """The effect the A/B test estimates: every replayed prompt under each strategy, in-process."""
    rules, learned = (b.everyone[arm] for arm in ARMS)
    diffs = [graded(r).rows[-1]["diff_vs_control"] for r in b.runs]
    return (
        f"Both strategies on all {len(b.replay.prompts)} prompts (in-process, no arm draw): rules"
        f" {rules.scores.mean():.4f} (premium {rules.premium.mean():.3f}), learned {learned.scores.mean():.4f}"
        f" (premium {learned.premium.mean():.3f}): the true difference on these prompts is"
        f" {learned.scores.mean() - rules.scores.mean():+.4f}; the A/B estimates of it: "
        + ", ".join(f"{d:+.4f}" for d in diffs)
        + " (the arms' prompts differ by draw: compare the all-premium / all-economy column)."
    )


def calibration_line(run: Run, replay: Replay, premium: Sequence[str], level: float) -> str:
    """What the learned router's own calibration (from its training half) promised, against what it did."""
    cal = replay.trained.document["calibration"]
    share = dict(zip(cal["levels"], cal["shares"], strict=True)).get(level)
    m = np.asarray(run.arms) == ARMS[1]
    kept = run.scores[m].mean() / replay.strong[m].mean()
    sent = np.mean([t in premium for t, a in zip(run.targets, run.arms, strict=True) if a == ARMS[1]])
    promised = "?" if share is None else f"{100 * share:.1f}%"
    return (
        f"Learned arm against its router's calibration (out-of-fold, training half): quality medium is level "
        f"{level:g}, promising {100 * level:g}% of premium quality with {promised} of jobs sent to premium; on the "
        f"held-out replay (replay 1) it kept {100 * kept:.1f}% of premium quality, sending {100 * sent:.1f}%."
    )


def pipeline_cpu_rows(b: Bench) -> list[str]:
    """Process CPU per job while the jobs ran: the experiment run against the mean of the two no-experiment
    runs (each arm's router alone: together the same mix of routers), per replay."""
    rows = []
    for stage in ("route", "account") if b.bases else ():
        with_exp = [1e3 * r.stage_ms[stage] for r in b.runs]
        without = [1e3 * sum(base[a].stage_ms[stage] for a in ARMS) / len(ARMS) for base in b.bases]
        added = [w - o for w, o in zip(with_exp, without, strict=True)]
        for label, values in (("no experiment", without), ("with the experiment", with_exp), ("added", added)):
            rows.append(f"| {stage} process per job in the pipeline, {label} | {spread(values, ',.0f')} |")
    fb = [1e3 * graded(r).account_ms for r in b.runs]
    return [
        *rows,
        f"| account process per feedback message in the pipeline ({FEEDBACK_IN_FLIGHT} in flight) | "
        f"{spread(fb, ',.0f')} |",
    ]


def cpu_lines(b: Bench) -> list[str]:
    def row(label: str, key: str) -> str:
        return f"| {label} | {spread(b.cpu[key], ',.0f')} |"

    n = min(b.args.cpu_jobs, len(b.replay.prompts))
    return [
        f"CPU per job, µs. In-process rows: against the real Redis after the pipelines stopped (uvloop, one core;"
        f" {n} replayed prompts per run, {b.args.runs} runs, median of the runs (min, max)), thread CPU of the stage"
        " core's handle, Redis client work included, Redis server time not; each job handled under the experiment"
        " policy and under the policy whose router is the job's arm alone (same router, no experiment). Pipeline"
        f" rows: process CPU (/proc) over {len(b.runs)} replays (median (min, max)), AMQP included.",
        "",
        "| figure | µs |",
        "|---|---:|",
        row("route handle, no experiment (jobs one at a time: median job)", "alone_without"),
        row("route handle, with the experiment (one at a time: median job)", "alone_with"),
        row("**added by the experiment**, one at a time", "alone_added"),
        row(f"route handle, no experiment ({BATCH} in flight: mean job)", "batch_without"),
        row(f"route handle, with the experiment ({BATCH} in flight: mean job)", "batch_with"),
        row(f"**added by the experiment**, {BATCH} in flight", "batch_added"),
        row("of which the arm pin (SET NX GET), client CPU, one at a time", "pin_cpu"),
        row("the arm pin's round trip, wall (I/O, not CPU)", "pin_wall"),
        row("**feedback stage** decode + handle per message, one at a time (median)", "fb_alone"),
        row(f"**feedback stage** decode + handle per message, {BATCH} in flight (mean)", "fb_batch"),
        *pipeline_cpu_rows(b),
    ]


def header(b: Bench) -> list[str]:
    replay, runs = b.replay, b.runs
    n_gsm = sum(g.startswith("gsm8k") for g in replay.groups)
    base = ", then through one pipeline per arm's router alone (the CPU baseline)" if b.bases else ""
    return [
        f"# A/B replay: rules vs learned router on held-out RouteLLM prompts ({cores()} cores)",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/ab_replay.py', *sys.argv[1:]])}`: {len(replay.prompts)} jobs "
        f"({len(replay.prompts) - n_gsm} MMLU from {len(replay.replay_groups) - 1} held-out subjects, {n_gsm} "
        f"GSM8K) replayed {len(runs)} times, each through a fresh process pipeline with its own arm draw (job ids "
        f"salted per replay){base}; pipeline s "
        f"{spread([r.jobs_s for r in runs], '.1f')}, feedback s {spread([graded(r).seconds for r in runs], '.1f')};"
        f" errors {sum(r.errors for r in runs)}, feedback refused {sum(graded(r).refused for r in runs)}; emulator"
        f" outcomes per replay {[r.emulator.get('outcomes') for r in runs]}.",
        "",
        f"Router trained on {len(replay.train_groups)} MMLU subjects ({replay.trained.document['training']['rows']}"
        f" rows): {', '.join(replay.train_groups)}. Replayed from: {', '.join(replay.replay_groups)}. In neither:"
        f" {', '.join(replay.excluded)}. Premium (answers as GPT-4-1106): {', '.join(b.premium)}; every other model"
        " answers as Mixtral-8x7B. Task rules off: the bundled ones would raise"
        f" {task_rule_share(replay.prompts)} of the replayed prompts to tier high in both arms.",
    ]


def table(b: Bench) -> str:
    return "\n".join(
        [
            *header(b),
            "",
            "`farebox report --by strategy` rows of replay 1 (load_strategy_rows, source grader):",
            "",
            *report_rows(b.runs[0]),
            "",
            *jobs_needed_lines(b.runs[0], b.args.checkpoint),
            "",
            *summary_rows(b.runs, b.args.checkpoint),
            "",
            "Replay 1 against offline evaluation of the same prompts (in-process: assign + choose_route as the route"
            " stage does; recorded outcomes: GPT-4-1106's where the model is premium, else Mixtral's):",
            "",
            *offline_rows(b.runs[0], b.predicted[0], b.replay, b.premium),
            "",
            everyone_line(b),
            "",
            calibration_line(b.runs[0], b.replay, b.premium, 0.95),
            "",
            *cpu_lines(b),
            "",
        ]
    )


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
    a = ap.parse_args()
    replay = make_replay(a.jobs, a.seed)
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
