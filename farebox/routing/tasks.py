"""What a job is (its task, when it does not say) and what it will cost: the estimates routing and
``farebox estimate`` share. Pure functions over the job, the catalog and the policy."""

from __future__ import annotations

import math
import re

from farebox.routing.catalog import Catalog, CatalogError, cost_usd
from farebox.routing.policy import Policy
from farebox.schemas import Job, Usage

# Keyword heuristics for jobs without a ``task``: first match wins, so the specific tasks come first.
# Only the start of the last user message is read: the instruction is almost always there, and it keeps
# routing O(1) in prompt length.
_TASK_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("summarize", re.compile(r"\b(summari[sz]e|summary|tl;?dr|condense|key points)\b")),
    (
        "classify",
        re.compile(
            r"\b(classify|categori[sz]e|which category|sentiment|label (this|the)|answer with the letter|"
            r"true or false|yes or no)\b"
        ),
    ),
    ("extract", re.compile(r"\b(extract|as json|into json|parse the|pull out|fill in the fields)\b")),
    (
        "code",
        re.compile(
            r"```|\b(def |function|python|javascript|typescript|sql|regex|refactor|stack trace|compile|"
            r"unit test|write (a|the) (program|script|class))\b"
        ),
    ),
    ("reason", re.compile(r"\b(prove|step by step|calculate|solve|how many|how much|derive|puzzle|logic)\b")),
    ("explain", re.compile(r"\b(explain|why does|why is|what is|what are|describe how)\b")),
    (
        "generate",
        re.compile(r"\b(write|draft|compose|story|poem|essay|slogan|email to|blog post|generate)\b"),
    ),
)
_INFER_CHARS = 2000

# Expected output length per task, as a share of max_tokens (or a small cap for label-like answers). Used only
# for estimates and context fit; the job's max_tokens stays the hard limit sent to the provider.
_OUTPUT_SHARE = {
    "summarize": 0.6,
    "extract": 0.5,
    "reason": 0.8,
    "code": 0.8,
    "generate": 0.9,
    "explain": 0.7,
    "chat": 0.5,
}
_CLASSIFY_CAP = 10


def infer_task(job: Job) -> str:
    if job.task is not None:
        return job.task
    text = ""
    for msg in reversed(job.chat):
        if msg.role == "user":
            text = msg.content
            break
    text = text[:_INFER_CHARS].lower()
    for task, pattern in _TASK_PATTERNS:
        if pattern.search(text):
            return task
    return "chat"


def estimate_output_tokens(job: Job, task: str) -> int:
    if task == "classify":
        return min(job.max_tokens, _CLASSIFY_CAP)
    return max(1, math.ceil(job.max_tokens * _OUTPUT_SHARE.get(task, 0.5)))


def baseline_cost_usd(policy: Policy, catalog: Catalog, usage: Usage) -> float:
    model = catalog.get(policy.baseline_model)
    if model is None:
        raise CatalogError(f"policy baseline_model '{policy.baseline_model}' is not in the catalog {catalog.source}")
    return cost_usd(model, usage)
