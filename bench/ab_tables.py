"""The A/B replay's records (a replay's run, its grades, the whole bench) and the markdown table made of them."""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ab_setup import (
    ARMS,
    BATCH,
    FEEDBACK_IN_FLIGHT,
    Predicted,
    Replay,
    checkpoints,
    power_jobs,
    stays_significant,
    task_rule_share,
)
from common import cores, spread


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
