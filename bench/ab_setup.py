"""What bench/ab_replay.py sets up and measures outside the pipeline: the held-out replay set and the router
trained without it, the emulator's outcomes file, the bench policies, the offline prediction of each arm, the
grader, the significance checkpoints, and the CPU per job of the route stage (with and without an experiment)
and of the feedback stage, in-process."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import statistics
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from common import ROOT, emulator_process
from redis.asyncio import Redis

from farebox.client import FareboxClient
from farebox.constants import job_record
from farebox.routing.choose import choose_route
from farebox.routing.experiments import assign
from farebox.routing.outcomes import OutcomeSet, load_outcomes
from farebox.routing.policy import tier_of
from farebox.routing.store import CatalogStore, load_routing
from farebox.routing.tasks import infer_task
from farebox.routing.training import Trained, broken_groups, train_router
from farebox.schemas import Envelope, Job, JobResult
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.feedback import FeedbackStage
from farebox.stages.main import make_redis
from farebox.stages.route import RouteStage
from farebox.stages.stage import Delivery
from farebox.strategy_report import Comparison, ScoreStats, compare, score_stats
from farebox.tokens import count_messages
from tests.support.pipeline import drop_redis_prefix

DATA = ROOT.parent / "shared" / "data" / "routellm"
EXPERIMENT = "router-ab"
ARMS = ("rules", "learned")  # the first is the control


@dataclass(frozen=True)
class Replay:
    """The replayed prompts (none of their subjects in the router's training data) and the router."""

    prompts: list[str]
    groups: list[str]
    strong: np.ndarray  # GPT-4-1106's recorded outcome, 0/1
    weak: np.ndarray  # Mixtral-8x7B's
    labels: list[str]
    trained: Trained
    train_groups: list[str]
    replay_groups: list[str]
    excluded: list[str]  # groups in neither: their recorded outcomes are grading failures


def _stripped(prompts: Sequence[str]) -> set[str]:
    return {p.strip() for p in prompts}


def _pool(replay_side: OutcomeSet, training_text: set[str]) -> list[int]:
    """Rows of ``replay_side`` whose text is unique there and absent from the training rows."""
    seen: dict[str, int] = {}
    for i, p in enumerate(replay_side.prompts):
        seen[p.strip()] = -1 if p.strip() in seen else i
    return sorted(i for text, i in seen.items() if i >= 0 and text not in training_text)


def make_replay(jobs: int, seed: int, folds: int = 7, data: Path = DATA) -> Replay:
    """Train on a seeded random half of the MMLU subjects; replay ``jobs`` prompts drawn (seeded) from the
    other half and GSM8K. Groups ``broken_groups`` names (GPT-4 graded near 0) are in neither."""
    both = load_outcomes([data / "mmlu", data / "gsm8k_responses.csv"])
    rng = np.random.default_rng(seed)
    broken = broken_groups(both)
    subjects = sorted({g for g, b in zip(both.groups, both.benchmarks, strict=True) if b == "mmlu"} - set(broken))
    rng.shuffle(subjects)
    train_groups = sorted(subjects[: len(subjects) // 2])
    replay_groups = sorted(subjects[len(subjects) // 2 :]) + sorted(set(both.groups) - set(subjects) - set(broken))
    groups = np.asarray(both.groups)
    train = both.subset(np.isin(groups, train_groups))
    side = both.subset(np.isin(groups, replay_groups))
    pool = _pool(side, _stripped(train.prompts))
    if jobs > len(pool):
        raise SystemExit(f"--jobs {jobs}: only {len(pool)} distinct held-out prompts to replay")
    picked = sorted(rng.choice(pool, size=jobs, replace=False).tolist())
    trained = train_router(train, folds=folds, source="bench/ab_replay (held-out half)")
    prompts = [side.prompts[i] for i in picked]
    labels = [f"answer-{hashlib.sha256(p.encode()).hexdigest()[:8]}" for p in prompts]
    if len(set(labels)) != len(labels):
        raise SystemExit("two replayed prompts share a label; pick another --seed")
    return Replay(
        prompts=prompts,
        groups=[side.groups[i] for i in picked],
        strong=side.strong[picked],
        weak=side.weak[picked],
        labels=labels,
        trained=trained,
        train_groups=train_groups,
        replay_groups=replay_groups,
        excluded=broken,
    )


def premium_targets() -> list[str]:
    """Every provider/model of the bundled catalog whose tier (catalog's, else the policy's) is high."""
    routing, _ = load_routing(CATALOG_DIR / "model_costs.json", CATALOG_DIR / "policy.json")
    return sorted(m.target for m in routing.catalog.models.values() if tier_of(m, routing.policy) == "high")


def write_outcomes(path: Path, replay: Replay, premium: Sequence[str]) -> None:
    """Premium models answer as GPT-4-1106 did, every other model as Mixtral-8x7B did."""
    with path.open("w", encoding="utf-8") as out:
        for prompt, label, strong, weak in zip(replay.prompts, replay.labels, replay.strong, replay.weak, strict=True):
            correct = {target: bool(strong) for target in premium} | {"*": bool(weak)}
            out.write(json.dumps({"prompt": prompt, "label": label, "correct": correct}) + "\n")


def write_policies(folder: Path, router_path: Path) -> dict[str, Path]:
    """The bundled policy with no task rules and pii "allow" (see ab_replay.py), as three files: the A/B
    experiment (arms rules and learned at 1:1), and each arm's strategy as the policy's router alone."""
    base = json.loads((CATALOG_DIR / "policy.json").read_text())
    base["tasks"] = {}
    base["pii"]["action"] = "allow"
    learned = dict(base["router"], path=str(router_path))
    strategies = {"rules": {"kind": "rules"}, "learned": learned}
    out = {}
    for name, router in (("experiment", base["router"]), *strategies.items()):
        policy = copy.deepcopy(base) | {"router": router}
        if name == "experiment":
            arms = [{"name": arm, "weight": 1, "strategy": strategies[arm]} for arm in ARMS]
            policy["experiments"] = [{"name": EXPERIMENT, "arms": arms}]
        out[name] = folder / f"policy-{name}.json"
        out[name].write_text(json.dumps(policy, indent=1))
    return out


def replay_job(prompt: str, job_id: str) -> Job:
    return Job(job_id=job_id, prompt=prompt, quality="medium", cache={"mode": "bypass"})


@dataclass(frozen=True)
class Predicted:
    arms: list[str]
    targets: list[str]  # provider/model choose_route picks in-process
    premium: np.ndarray  # 0/1: a premium-tier target
    scores: np.ndarray  # the recorded outcome of the model class picked


def predict(
    replay: Replay, policy_path: Path, job_ids: Sequence[str], premium: Sequence[str], arm: str | None = None
) -> Predicted:
    """Each job's arm (``arm`` for every job, when given) and route decided in-process as the route stage
    would, scored from the outcome data."""
    routing, _ = load_routing(CATALOG_DIR / "model_costs.json", policy_path)
    arms, targets = [], []
    for prompt, job_id in zip(replay.prompts, job_ids, strict=True):
        job = replay_job(prompt, job_id)
        drawn = assign(routing.policy.experiments, job_id, job, infer_task(job))
        assert drawn is not None, "the experiment covers every replayed job"
        plan = routing.arms[EXPERIMENT, arm or drawn.arm]
        tokens = count_messages((m.role, m.content) for m in job.chat)
        routed = choose_route(job, routing.catalog, plan.policy, input_tokens=tokens, router=plan.router)
        arms.append(arm or drawn.arm)
        targets.append(f"{routed.decision.provider}/{routed.decision.model}")
    is_premium = np.array([t in premium for t in targets], dtype=np.float64)
    return Predicted(arms, targets, is_premium, np.where(is_premium == 1, replay.strong, replay.weak))


def task_rule_share(prompts: Sequence[str]) -> dict[str, int]:
    """How many of the prompts the bundled task rules would have raised, per inferred task."""
    rules = json.loads((CATALOG_DIR / "policy.json").read_text())["tasks"]
    tasks = [infer_task(Job(prompt=p)) for p in prompts]
    return {t: tasks.count(t) for t in sorted(set(tasks)) if rules.get(t, {}).get("min_tier")}


# --- the pipeline run's helpers -----------------------------------------------------------------------------

EMULATOR_PORT = 8097
FEEDBACK_IN_FLIGHT = 128


def grade(result: JobResult, label: str) -> float:
    return 1.0 if result.status == "ok" and result.content == label else 0.0


async def send_feedback(client: FareboxClient, job_ids: Sequence[str], scores: np.ndarray, labels: list[str]) -> int:
    """Every grade as feedback (receipts awaited, ``FEEDBACK_IN_FLIGHT`` at once); how many were refused."""
    slots = asyncio.Semaphore(FEEDBACK_IN_FLIGHT)

    async def one(job_id: str, score: float, label: str) -> bool:
        async with slots:
            receipt = await client.feedback(job_id, score, source="grader", label=label, wait=True)
            return receipt is not None and receipt.status == "ok"

    sent = await asyncio.gather(*(one(j, float(s), lab) for j, s, lab in zip(job_ids, scores, labels, strict=True)))
    return sent.count(False)


def emulator_stats(url: str, reset: bool = False) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/_emulator/{'reset' if reset else 'stats'}", method="POST" if reset else "GET"
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        stats: dict[str, Any] = json.load(reply)
        return stats


@contextlib.contextmanager
def outcomes_emulator(outcomes: Path) -> Iterator[str]:
    """The bench emulator, answering from ``outcomes`` (its environment only)."""
    with contextlib.ExitStack() as stack:
        with mock.patch.dict(os.environ, {"FAREBOX_EMULATOR_OUTCOMES": str(outcomes)}):
            url = stack.enter_context(emulator_process(EMULATOR_PORT))
        yield url


# --- jobs needed ----------------------------------------------------------------------------------------------

Z80 = 0.8416  # one-sided z of 80% power


def arm_stats(arms: np.ndarray, scores: np.ndarray, arm: str) -> ScoreStats:
    s = scores[arms == arm]
    return score_stats(len(s), float(s.sum()), float((s * s).sum()))


def checkpoints(arms: Sequence[str], scores: np.ndarray, step: int) -> list[tuple[int, Comparison]]:
    """The strategy report's comparison (learned minus rules) over the first k jobs in submission order."""
    by_job, n = np.asarray(arms), len(arms)
    ks = [*range(step, n + 1, step)] + ([n] if n % step else [])
    out = []
    for k in ks:
        a, s = by_job[:k], scores[:k]
        out.append((k, compare(arm_stats(a, s, ARMS[1]), arm_stats(a, s, ARMS[0]))))
    return out


def stays_significant(points: list[tuple[int, Comparison]]) -> int | None:
    """The first checkpoint from which every later one is significant too (None: the last is not)."""
    first = None
    for k, c in points:
        first = (first or k) if c.significant else None
    return first


def power_jobs(arms: Sequence[str], scores: np.ndarray) -> float | None:
    """Total jobs (both arms, 1:1) a fixed-size test needs for 80% power at alpha 0.05, at the final
    difference and variances: 2 * (z_0.975 + z_0.8)^2 * (var_a + var_b) / diff^2."""
    rules, learned = (arm_stats(np.asarray(arms), scores, a) for a in ARMS)
    if rules.var is None or learned.var is None or rules.mean is None or learned.mean is None:
        return None
    diff = learned.mean - rules.mean
    return 2 * (1.96 + Z80) ** 2 * (rules.var + learned.var) / diff**2 if diff else None


# --- CPU, in-process against the real Redis --------------------------------------------------------------------


def delivery(queue: str, body: bytes) -> Delivery:
    return Delivery(queue, body, delivery_count=1)


def bench_settings() -> Settings:
    run = uuid.uuid4().hex[:8]
    return Settings(namespace=f"fbbench-{run}", redis_prefix=f"fbbench:{run}:", metrics_port=0)


BATCH = 64  # jobs in flight in the concurrent figures: the stages' default prefetch


async def _cpu_ns(*calls: Awaitable[Any]) -> int:
    """Thread CPU ns of running ``calls`` concurrently (one: alone), Redis client work included."""
    t0 = time.thread_time_ns()
    await asyncio.gather(*calls)
    return time.thread_time_ns() - t0


class RouteCpu:
    """The route core's handle under the experiment policy ("with") and, for the same job, under the policy
    whose router is the job's arm alone ("without"), so that the difference is the experiment's own work."""

    def __init__(self, stages: dict[str, RouteStage]) -> None:
        self.stages = stages
        self.exp = stages["experiment"]
        self.experiments = self.exp.store.current_routing().policy.experiments

    def pair(self, prompt: str, job_id: str) -> tuple[list[Awaitable[Any]], list[Awaitable[Any]]]:
        env = Envelope(job_id=job_id, job=replay_job(prompt, job_id), received_at=time.time())
        drawn = assign(self.experiments, job_id, env.job, infer_task(env.job))
        assert drawn is not None
        no_body = delivery(self.exp.topo.route, b"")
        return [self.exp.handle(env, no_body)], [self.stages[drawn.arm].handle(env, no_body)]

    async def one_by_one(self, prompts: Sequence[str], run: int) -> dict[str, float]:
        """Median µs over the jobs, each alone, the two policies back to back in alternating order."""
        cpu: dict[str, list[int]] = {"with": [], "without": []}
        for i, prompt in enumerate(prompts):
            with_exp, without = self.pair(prompt, f"cpu-{run}-{i}")
            for key, calls in [("with", with_exp), ("without", without)][:: 1 if i % 2 == 0 else -1]:
                cpu[key].append(await _cpu_ns(*calls))
        return {k: statistics.median(v) / 1e3 for k, v in cpu.items()}

    async def in_flight(self, prompts: Sequence[str], run: int) -> dict[str, float]:
        """Mean µs per job with ``BATCH`` jobs handled at once, as a stage with its prefetch handles them."""
        total = {"with": 0, "without": 0}
        for start in range(0, len(prompts), BATCH):
            pairs = [self.pair(p, f"cpub-{run}-{start + i}") for i, p in enumerate(prompts[start : start + BATCH])]
            for key, side in [("with", 0), ("without", 1)][:: 1 if start % (2 * BATCH) == 0 else -1]:
                total[key] += await _cpu_ns(*(c for pair in pairs for c in pair[side]))
        return {k: v / len(prompts) / 1e3 for k, v in total.items()}

    async def pins(self, prompts: Sequence[str], run: int) -> dict[str, float]:
        """The pin alone (SET NX GET): median wall µs of its round trip and thread CPU µs of the client."""
        wall, cpu = [], []
        for i, prompt in enumerate(prompts):
            job = replay_job(prompt, f"pin-{run}-{i}")
            drawn = assign(self.experiments, f"pin-{run}-{i}", job, infer_task(job))
            assert drawn is not None
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            await self.exp.pins.pin(f"pin-{run}-{i}", drawn, self.experiments)
            cpu.append(time.thread_time_ns() - c0)
            wall.append(time.perf_counter_ns() - t0)
        return {"pin_wall": statistics.median(wall) / 1e3, "pin_cpu": statistics.median(cpu) / 1e3}

    async def run(self, prompts: Sequence[str], run: int) -> dict[str, float]:
        alone = await self.one_by_one(prompts, run)
        batched = await self.in_flight(prompts, run)
        return {
            **{f"alone_{k}": v for k, v in alone.items()},
            "alone_added": alone["with"] - alone["without"],
            **{f"batch_{k}": v for k, v in batched.items()},
            "batch_added": batched["with"] - batched["without"],
            **await self.pins(prompts, run),
        }


async def feedback_cpu_run(stage: FeedbackStage, redis: Redis, n: int, run: int) -> dict[str, float]:
    """``n`` feedback messages (decode + handle) on ledger entries of experiment jobs, written first as the
    account stage leaves them: median thread CPU µs of one alone, and the mean with ``BATCH`` at once."""
    ids = [f"fb-{run}-{i}" for i in range(2 * n)]
    for i, job_id in enumerate(ids):
        entry = {"tenant": "default", "experiment": EXPERIMENT, "arm": ARMS[i % 2], "day": "2000-01-01"}
        await redis.set(stage.keys.ledger_entry(job_record("default", job_id)), json.dumps(entry))
    queue = stage.input_queues()[0]

    def call(job_id: str, score: int) -> Awaitable[Any]:
        body = json.dumps({"job_id": job_id, "score": score, "source": "grader", "label": "x"}).encode()
        return stage.handle(stage.decode(delivery(queue, body)), delivery(queue, body))

    alone = [await _cpu_ns(call(job_id, i % 2)) for i, job_id in enumerate(ids[:n])]
    batched = 0
    for start in range(n, 2 * n, BATCH):
        batched += await _cpu_ns(*(call(j, 1) for j in ids[start : min(start + BATCH, 2 * n)]))
    return {"fb_alone": statistics.median(alone) / 1e3, "fb_batch": batched / n / 1e3}


async def cpu_runs(policies: dict[str, Path], prompts: Sequence[str], runs: int) -> dict[str, list[float]]:
    """--runs passes of both measurements (after a warm-up); per figure, one value per run."""
    settings = bench_settings()
    redis = make_redis(settings)
    catalog = CATALOG_DIR / "model_costs.json"
    stages = {name: RouteStage(settings, CatalogStore(catalog, path), redis) for name, path in policies.items()}
    route = RouteCpu(stages)
    feedback = FeedbackStage(settings, route.exp.store, redis)
    out: dict[str, list[float]] = {}
    try:
        await route.run(prompts[:BATCH], -1)
        await feedback_cpu_run(feedback, redis, BATCH, -1)
        for run in range(runs):
            figures = await route.run(prompts, run) | await feedback_cpu_run(feedback, redis, len(prompts), run)
            for key, value in figures.items():
                out.setdefault(key, []).append(value)
    finally:
        await drop_redis_prefix(settings)
        await redis.aclose()
    return out
