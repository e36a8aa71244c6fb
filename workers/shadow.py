"""Shadow grading: judging an experiment arm without a human, under a spend cap.

When the account stage has recorded a job that a non-reference model answered for an experiment with a
``shadow`` section (farebox/routing/experiments.py), a sampled share of such jobs (a hash of the job id, so a
redelivery samples the same) is sent once more, to the reference model: an internal evaluation job that goes
straight to the reference's execute queue with the answer to grade on its envelope. Its estimated cost is
reserved first against the experiment's cap for the period, atomically, so shadow spending stops at the cap;
the account stage records it in the ledger like any job (marked as evaluation spend, not charged to the
tenant's budget), settles the reservation with the actual cost, and grades: ``exact`` compares the two answers
as words (case, spacing and punctuation set aside); ``judge`` sends a third call, to the judge model, asking
whether they agree. The score is published as feedback with source "shadow" on the graded job.
A crash between the ledger write and the shadow hand-off loses that one sample (it is a sample): never a job.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from farebox import metrics
from farebox.constants import NANO
from farebox.errors import FareboxError
from farebox.routing.catalog import cost_usd
from farebox.routing.choose import choose_route
from farebox.routing.experiments import Experiment, unit_draw
from farebox.routing.store import Unit
from farebox.routing.tasks import infer_task
from farebox.schemas import ChatMessage, Envelope, Evaluation, Feedback, Job, JobResult, RouteDecision, Usage
from farebox.schemas.job import CacheOptions
from farebox.settings import Settings
from farebox.stages.ledger_entry import day_expiry
from farebox.stages.lua import Layout, NamedScript, Scalar
from farebox.stages.stage import Publish, envelope_publish
from farebox.tokens import count_messages, count_text

log = logging.getLogger("farebox.shadow")

SPEND_TTL_S = 40 * 86_400  # a month's key outlives its month
JUDGE_MAX_CHARS = 6000  # of each text shown to the judge
_WORD = re.compile(r"\w+")  # Unicode words: Chinese or Cyrillic answers are compared too

_RESERVE_LAYOUT = Layout(keys=("spend_key",), args=("estimate_nusd", "cap_nusd", "ttl_s"))
_RESERVE = """
local spent = tonumber(redis.call('GET', spend_key) or '0')
if spent + tonumber(estimate_nusd) > tonumber(cap_nusd) then return 0 end
redis.call('INCRBY', spend_key, estimate_nusd)
redis.call('EXPIRE', spend_key, ttl_s)
return 1
"""

JUDGE_PROMPT = (
    "Two answers to the same request follow. Reply with one word: yes if answer B says the same as answer A "
    "(the reference) in substance, no if it does not.\n\nRequest:\n{request}\n\nAnswer A (reference):\n"
    "{reference}\n\nAnswer B:\n{answer}"
)


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def agreement(answer: str, reference: str) -> float:
    """The exact grader: 1.0 when the two answers are the same words, else 0.0."""
    return 1.0 if words(answer) == words(reference) else 0.0


def judge_verdict(text: str) -> float | None:
    """The judge's first word as a score (yes 1.0, no 0.0); None when it said neither."""
    first = words(text)[:1]
    return {"yes": 1.0, "no": 0.0}.get(first[0]) if first else None


def period_of(period: str, now: float) -> str:
    return time.strftime("day:%Y-%m-%d" if period == "day" else "month:%Y-%m", time.gmtime(now))


@dataclass(frozen=True)
class EvalCall:
    """What an evaluation job asks of which model, and the usage its cost is estimated for."""

    target: str
    chat: tuple[ChatMessage, ...]
    usage: Usage
    max_tokens: int | None = None


class Shadowing:
    def __init__(self, settings: Settings, redis: Redis, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = settings.keys
        self.clock = clock
        self._reserve = NamedScript(redis, _RESERVE_LAYOUT, _RESERVE, "shadow reserve")

    async def launch(self, env: Envelope, result: JobResult, unit: Unit) -> list[Publish]:
        """The shadow job for ``env``'s freshly recorded result, if its experiment samples it, the policy lets
        the job's tenant and data go to the reference model, and the cap allows."""
        policy = unit[1]
        strategy = env.route.strategy if env.route else None
        if strategy is None or result.status != "ok" or result.cache != "miss" or result.content is None:
            return []
        experiment = policy.experiment(strategy.experiment)
        shadow = experiment.shadow if experiment is not None else None
        answered = f"{result.provider}/{result.model}"
        if experiment is None or shadow is None or answered == shadow.reference:
            return []
        if unit_draw("shadow", experiment.name, env.job_id) >= shadow.share:
            return []
        evaluation = Evaluation(
            kind="shadow",
            experiment=experiment.name,
            arm=strategy.arm,
            of_job_id=env.job_id,
            answer=result.content,
            answered_by=answered,
            reference=shadow.reference,
            grader=shadow.grader_for(infer_task(env.job)),
            judge_model=shadow.judge_model,
        )
        # Reserved for the most the reference may answer (max_tokens), settled down to the actual cost.
        usage = Usage(input_tokens=result.usage.input_tokens, output_tokens=env.job.max_tokens)
        job = await self._evaluation_job(
            env, evaluation, experiment, unit, EvalCall(shadow.reference, env.job.chat, usage)
        )
        return [job] if job is not None else []

    async def _evaluation_job(
        self,
        env: Envelope,
        evaluation: Evaluation,
        experiment: Experiment,
        unit: Unit,
        call: EvalCall,
    ) -> Publish | None:
        """An evaluation job for ``call``, its estimate reserved under the cap; None when the policy refuses
        the target for this job (tenant or user-tier rules, personal data) or the cap is reached."""
        catalog = unit[0]
        target = call.target
        model = catalog.get(target)
        assert experiment.shadow is not None
        if model is None:
            log.warning("shadow: experiment %s names %s, which the catalog lacks", experiment.name, target)
            return None
        job = env.job.model_copy(
            update={
                "job_id": evaluation_job_id(evaluation.kind, evaluation.of_job_id),
                "messages": call.chat,
                "prompt": None,
                "model": target,
                "cache": CacheOptions(mode="bypass"),
                "metadata": {},
                "deadline_s": None,
                "max_tokens": call.max_tokens or env.job.max_tokens,
            }
        )
        refused = refusal(job, unit)
        if refused is not None:
            metrics.SHADOW_SKIPPED.labels(experiment.name, "policy").inc()
            log.info("shadow: %s call of experiment %s not made: %s", evaluation.kind, experiment.name, refused)
            return None
        estimate = round(cost_usd(model, call.usage) * NANO)
        now = self.clock()
        spend_key = self.keys.shadow_spend(experiment.name, period_of(experiment.shadow.period, now))
        args: dict[str, Scalar] = {
            "estimate_nusd": estimate,
            "cap_nusd": round(experiment.shadow.cap_usd * NANO),
            "ttl_s": SPEND_TTL_S,
        }
        if not await self._reserve(keys={"spend_key": spend_key}, args=args):
            metrics.SHADOW_SKIPPED.labels(experiment.name, "cap").inc()
            log.info("shadow: experiment %s is at its cap for this %s", experiment.name, experiment.shadow.period)
            return None
        assert job.job_id is not None
        job_id = job.job_id
        route = RouteDecision(
            provider=model.provider,
            model=model.model,
            reason=f"{evaluation.kind} grading of job {evaluation.of_job_id} for experiment {experiment.name}",
            candidates=(target,),
            estimated_cost_usd=estimate / NANO,
        )
        marked = evaluation.model_copy(update={"estimated_nusd": estimate, "cap_key": spend_key})
        shadow_env = Envelope(job_id=job_id, job=job, received_at=now, route=route, evaluation=marked)
        return envelope_publish(shadow_env, self.settings.topology.execute(model.provider))

    async def graded(self, env: Envelope, result: JobResult, unit: Unit) -> list[Publish]:
        """An evaluation job is recorded: settle its reservation, then grade (feedback) or ask the judge."""
        evaluation = env.evaluation
        assert evaluation is not None
        actual = round(result.cost_usd * NANO)
        day = time.strftime("%Y-%m-%d", time.gmtime(env.received_at))
        pipe = self.redis.pipeline(transaction=False)
        if evaluation.cap_key:
            pipe.incrby(evaluation.cap_key, actual - evaluation.estimated_nusd)
        pipe.hincrby(self.keys.ledger_arms(day), f"{evaluation.experiment}|{evaluation.arm}|shadow_nusd", actual)
        pipe.expireat(self.keys.ledger_arms(day), day_expiry(env.received_at, self.settings.ledger_days_kept))
        await pipe.execute()
        if result.status != "ok" or result.content is None:
            log.info("shadow: %s job for %s failed; no grade", evaluation.kind, evaluation.of_job_id)
            return []
        if evaluation.kind == "judge":
            score = judge_verdict(result.content)
            if score is None:
                log.info("shadow: the judge's answer for job %s is neither yes nor no; no grade", evaluation.of_job_id)
                return []
            return [self._feedback(env, evaluation, score)]
        if evaluation.grader == "exact" or evaluation.judge_model is None:
            return [self._feedback(env, evaluation, agreement(evaluation.answer, result.content))]
        return await self._ask_judge(env, evaluation, result.content, unit)

    async def _ask_judge(self, env: Envelope, evaluation: Evaluation, reference: str, unit: Unit) -> list[Publish]:
        experiment = unit[1].experiment(evaluation.experiment)
        if experiment is None or experiment.shadow is None or evaluation.judge_model is None:
            return []  # the experiment has left the policy since: no more of its spending
        request = "\n".join(m.content for m in env.job.chat if m.role == "user")[-JUDGE_MAX_CHARS:]
        prompt = JUDGE_PROMPT.format(
            request=request, reference=reference[:JUDGE_MAX_CHARS], answer=evaluation.answer[:JUDGE_MAX_CHARS]
        )
        chat = (ChatMessage(role="user", content=prompt),)
        call = EvalCall(evaluation.judge_model, chat, Usage(input_tokens=count_text(prompt), output_tokens=4), 8)
        judge = evaluation.model_copy(update={"kind": "judge", "reference_answer": reference})
        job = await self._evaluation_job(env, judge, experiment, unit, call)
        return [job] if job is not None else []

    def _feedback(self, env: Envelope, evaluation: Evaluation, score: float) -> Publish:
        feedback = Feedback(
            job_id=evaluation.of_job_id,
            tenant=env.job.tenant,
            score=score,
            source="shadow",
            reference=evaluation.reference,
        )
        body = feedback.model_dump_json(exclude_none=True).encode()
        # Sent as the pipeline's own user, so the feedback stage trusts its tenant in auth mode user_id.
        return Publish(self.settings.topology.feedback, body, user_id=self.settings.amqp_user_id)


def evaluation_job_id(kind: str, of_job_id: str) -> str:
    """A bounded id (job ids may be 200 characters) that names the graded job's hash, not the job."""
    return f"{kind}:{hashlib.sha256(of_job_id.encode()).hexdigest()[:40]}"


def refusal(job: Job, unit: Unit) -> str | None:
    """Why the policy would refuse ``job`` (pinned to the evaluation target) for its tenant, user tier and
    data, as it refuses a pinned job of a producer; None when it may go."""
    catalog, policy, router = unit
    try:
        choose_route(
            job, catalog, policy, input_tokens=count_messages((m.role, m.content) for m in job.chat), router=router
        )
    except FareboxError as err:
        return str(err)
    return None
