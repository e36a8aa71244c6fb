"""``farebox feedback export``: the jobs with feedback as outcome data that ``farebox router train`` reads.

One JSON line per prompt: ``{"prompt" | "messages", "outcomes": {"provider/model": score}, "group", "output_tokens"}``
(farebox/routing/outcomes.py). A prompt answered by several models (in different arms, or by a shadow
grading's reference) has an outcome for each; a model's outcome is the mean of its jobs' scores on that prompt,
a job's score the mean of its selected sources. A shadow grade scores the graded model's agreement with the
reference, so the reference model's own outcome on that prompt is 1 (it is the yardstick) unless feedback says
otherwise. Prompts are there only for jobs an experiment kept them for (its ``keep_prompts_s``); training needs
two models' outcomes per prompt, so by default only such prompts are written (``--all`` writes every one).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from farebox.constants import JobRecord, RedisKeys, as_text
from farebox.report import parse_day

SCAN_BATCH = 500


@dataclass
class PromptOutcomes:
    messages: list[dict[str, str]]
    group: str
    scores: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    output_tokens: dict[str, int] = field(default_factory=dict)
    yardsticks: set[str] = field(default_factory=set)  # reference models of shadow grades

    def line(self) -> dict[str, Any]:
        outcomes = {model: round(sum(v) / len(v), 6) for model, v in sorted(self.scores.items())}
        for model in sorted(self.yardsticks - set(outcomes)):
            outcomes[model] = 1.0
        out: dict[str, Any] = {}
        if len(self.messages) == 1 and self.messages[0].get("role") == "user":
            out["prompt"] = self.messages[0]["content"]
        else:
            out["messages"] = self.messages
        out.update(outcomes=outcomes, group=self.group)
        if self.output_tokens:
            out["output_tokens"] = dict(sorted(self.output_tokens.items()))
        return out


@dataclass
class ExportCounts:
    jobs: int = 0  # jobs with feedback looked at
    no_prompt: int = 0  # their prompt was not kept (not in an experiment, or past keep_prompts_s)
    filtered: int = 0  # outside --tenant / --since / --source
    single_model: int = 0  # prompts left out: one model's outcome only (without --all)
    written: int = 0


@dataclass(frozen=True)
class ExportFilter:
    sources: frozenset[str] | None = None
    tenant: str | None = None
    since: str | None = None
    group_by: str = "tenant"  # tenant | experiment | none


def _job_score(feedback: dict[str, dict[str, Any]], sources: frozenset[str] | None) -> tuple[float | None, set[str]]:
    chosen = {s: f for s, f in feedback.items() if sources is None or s in sources}
    if not chosen:
        return None, set()
    refs = {str(f["reference"]) for s, f in chosen.items() if s == "shadow" and f.get("reference")}
    return sum(float(f["score"]) for f in chosen.values()) / len(chosen), refs


async def _batches(redis: Redis, keys: RedisKeys) -> Iterator[list[JobRecord]]:
    members = await redis.zrange(keys.feedback_jobs, 0, -1)
    texts = [JobRecord(as_text(v)) for v in members if isinstance(v, (bytes, str))]
    return (texts[i : i + SCAN_BATCH] for i in range(0, len(texts), SCAN_BATCH))


async def collect(redis: Redis, keys: RedisKeys, filt: ExportFilter) -> tuple[list[PromptOutcomes], ExportCounts]:
    since = parse_day(filt.since) if filt.since else None
    counts = ExportCounts()
    prompts: dict[str, PromptOutcomes] = {}
    for batch in await _batches(redis, keys):
        pipe = redis.pipeline(transaction=False)
        for record in batch:
            pipe.get(keys.ledger_entry(record))
            pipe.hgetall(keys.feedback(record))
            pipe.get(keys.prompt(record))
        replies = await pipe.execute()
        for i in range(len(batch)):
            raw_entry, raw_feedback, raw_prompt = replies[3 * i : 3 * i + 3]
            counts.jobs += 1
            if raw_entry is None or raw_prompt is None:
                counts.no_prompt += 1
                continue
            entry = json.loads(raw_entry)
            feedback = {as_text(s): json.loads(v) for s, v in raw_feedback.items()}
            score, refs = _job_score(feedback, filt.sources)
            if score is None or (filt.tenant and entry["tenant"] != filt.tenant) or (since and entry["day"] < since):
                counts.filtered += 1
                continue
            _add(prompts, entry, as_text(raw_prompt), score, refs, filt.group_by)
    return list(prompts.values()), counts


def _add(
    prompts: dict[str, PromptOutcomes], entry: dict[str, Any], prompt: str, score: float, refs: set[str], by: str
) -> None:
    group = {"tenant": entry.get("tenant"), "experiment": entry.get("experiment")}.get(by) or "all"
    key = f"{group}\x1f{prompt}"
    row = prompts.get(key)
    if row is None:
        row = prompts[key] = PromptOutcomes(messages=json.loads(prompt), group=str(group))
    model = f"{entry['provider']}/{entry['model']}"
    row.scores[model].append(score)
    row.output_tokens.setdefault(model, int(entry.get("output_tokens") or 0))
    row.yardsticks |= refs


def export_lines(rows: Iterable[PromptOutcomes], counts: ExportCounts, *, everything: bool) -> Iterator[str]:
    for row in rows:
        line = row.line()
        if not everything and len(line["outcomes"]) < 2:
            counts.single_model += 1
            continue
        counts.written += 1
        yield json.dumps(line, ensure_ascii=False)
