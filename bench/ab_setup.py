"""What bench/ab_replay.py sets up and measures outside the pipeline: the held-out replay set and the router
trained without it, the emulator's outcomes file, the bench policies, the offline prediction of each arm, and
the CPU per job of the route stage (with and without an experiment) and of the feedback stage, in-process."""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT
from redis.asyncio import Redis

from farebox.routing.choose import choose_route
from farebox.routing.experiments import assign
from farebox.routing.outcomes import OutcomeSet, load_outcomes
from farebox.routing.policy import tier_of
from farebox.routing.store import CatalogStore, load_routing
from farebox.routing.tasks import infer_task
from farebox.routing.training import Trained, broken_groups, train_router
from farebox.schemas import Envelope, Job
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.feedback import FeedbackStage
from farebox.stages.main import make_redis
from farebox.stages.route import RouteStage
from farebox.stages.stage import Delivery
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
    mmlu = load_outcomes([data / "mmlu"])
    gsm8k = load_outcomes([data / "gsm8k_responses.csv"])
    both = load_outcomes([data / "mmlu", data / "gsm8k_responses.csv"])
    rng = np.random.default_rng(seed)
    broken = broken_groups(both)
    subjects = sorted(set(mmlu.groups) - set(broken))
    rng.shuffle(subjects)
    train_groups = sorted(subjects[: len(subjects) // 2])
    replay_groups = sorted(subjects[len(subjects) // 2 :]) + sorted(set(gsm8k.groups))
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


def predict(replay: Replay, policy_path: Path, job_ids: Sequence[str], premium: Sequence[str]) -> Predicted:
    """Each job's arm and route decided in-process as the route stage would, scored from the outcome data."""
    routing, _ = load_routing(CATALOG_DIR / "model_costs.json", policy_path)
    arms, targets = [], []
    for prompt, job_id in zip(replay.prompts, job_ids, strict=True):
        job = replay_job(prompt, job_id)
        drawn = assign(routing.policy.experiments, job_id, job, infer_task(job))
        assert drawn is not None, "the experiment covers every replayed job"
        plan = routing.arms[drawn.experiment, drawn.arm]
        tokens = count_messages((m.role, m.content) for m in job.chat)
        routed = choose_route(job, routing.catalog, plan.policy, input_tokens=tokens, router=plan.router)
        arms.append(drawn.arm)
        targets.append(f"{routed.decision.provider}/{routed.decision.model}")
    is_premium = np.array([t in premium for t in targets], dtype=np.float64)
    return Predicted(arms, targets, is_premium, np.where(is_premium == 1, replay.strong, replay.weak))


def task_rule_share(prompts: Sequence[str]) -> dict[str, int]:
    """How many of the prompts the bundled task rules would have raised, per inferred task."""
    rules = json.loads((CATALOG_DIR / "policy.json").read_text())["tasks"]
    tasks = [infer_task(Job(prompt=p)) for p in prompts]
    return {t: tasks.count(t) for t in sorted(set(tasks)) if rules.get(t, {}).get("min_tier")}


# --- CPU, in-process against the real Redis --------------------------------------------------------------------


def delivery(queue: str, body: bytes) -> Delivery:
    return Delivery(queue, body, False, 1, {}, None, None, None, None)


def bench_settings() -> Settings:
    run = uuid.uuid4().hex[:8]
    return Settings(namespace=f"fbbench-{run}", redis_prefix=f"fbbench:{run}:", metrics_port=0)


async def _time_handle(stage: Any, item: Any, queue: str) -> int:
    t0 = time.thread_time_ns()
    await stage.handle(item, delivery(queue, b""))
    return time.thread_time_ns() - t0


async def route_cpu_run(stages: dict[str, RouteStage], prompts: Sequence[str], run: int) -> dict[str, float]:
    """One pass: per job, the route core's handle under the experiment policy and under the policy whose router
    is the job's arm alone (no experiment), back to back in alternating order; then the pin's round trip.
    Medians over the jobs: thread CPU µs of each, and wall µs of the pin."""
    exp = stages["experiment"]
    routing = exp.store.current_routing()
    cpu: dict[str, list[int]] = {"with": [], "without": []}
    pins = []
    for i, prompt in enumerate(prompts):
        job_id = f"cpu-{run}-{i}"
        env = Envelope(job_id=job_id, job=replay_job(prompt, job_id), received_at=time.time())
        drawn = assign(routing.policy.experiments, job_id, env.job, infer_task(env.job))
        assert drawn is not None
        order = [("with", exp), ("without", stages[drawn.arm])]
        for key, stage in order if i % 2 == 0 else order[::-1]:
            cpu[key].append(await _time_handle(stage, env, stage.topo.route))
        t0 = time.perf_counter_ns()
        await exp.pins.pin(f"pin-{run}-{i}", drawn, routing.policy.experiments)
        pins.append(time.perf_counter_ns() - t0)
    out = {k: statistics.median(v) / 1e3 for k, v in cpu.items()}
    out["added"] = out["with"] - out["without"]
    out["pin_wall"] = statistics.median(pins) / 1e3
    return out


async def feedback_cpu_run(stage: FeedbackStage, redis: Redis, n: int, run: int) -> float:
    """One pass: decode + handle of ``n`` feedback messages on ``n`` ledger entries of experiment jobs (the
    entries are written first, as the account stage leaves them); median thread CPU µs per message."""
    keys = stage.keys
    ids = [f"fb-{run}-{i}" for i in range(n)]
    for i, job_id in enumerate(ids):
        entry = {"tenant": "default", "experiment": EXPERIMENT, "arm": ARMS[i % 2], "day": "2000-01-01"}
        await redis.set(keys.ledger_entry(job_id), json.dumps(entry))
    samples = []
    queue = stage.input_queues()[0]
    for i, job_id in enumerate(ids):
        body = json.dumps({"job_id": job_id, "score": i % 2, "source": "grader", "label": "x"}).encode()
        t0 = time.thread_time_ns()
        await stage.handle(stage.decode(delivery(queue, body)), delivery(queue, body))
        samples.append(time.thread_time_ns() - t0)
    return statistics.median(samples) / 1e3


async def cpu_runs(policies: dict[str, Path], prompts: Sequence[str], runs: int) -> dict[str, list[float]]:
    """--runs passes of both measurements (after a warm-up); per figure, one value per run."""
    settings = bench_settings()
    redis = make_redis(settings)
    catalog = CATALOG_DIR / "model_costs.json"
    stages = {name: RouteStage(settings, CatalogStore(catalog, path), redis) for name, path in policies.items()}
    feedback = FeedbackStage(settings, stages["experiment"].store, redis)
    out: dict[str, list[float]] = {}
    try:
        await route_cpu_run(stages, prompts[:100], -1)
        await feedback_cpu_run(feedback, redis, 100, -1)
        for run in range(runs):
            for key, value in (await route_cpu_run(stages, prompts, run)).items():
                out.setdefault(f"route_{key}", []).append(value)
            out.setdefault("feedback", []).append(await feedback_cpu_run(feedback, redis, len(prompts), run))
    finally:
        await drop_redis_prefix(settings)
        await redis.aclose()
    return out
