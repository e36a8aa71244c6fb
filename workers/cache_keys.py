"""Cache keys and cacheability: plain functions, tested with tables.

The key hashes everything that changes the answer: the tenant (or the sharing group the policy
puts it in: tenants never share entries unless the policy says so), the normalized conversation,
and every parameter that reaches routing or the provider.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from farebox.routing.policy import Policy
from farebox.schemas import ChatMessage, Job

KEY_VERSION = 1


@dataclass(frozen=True)
class CacheRules:
    """The policy's cache settings, reduced to what key-building needs."""

    max_temperature: float = 0.0  # only answers at or below this temperature are reused
    share_groups: tuple[frozenset[str], ...] = field(default_factory=tuple)

    def scope(self, tenant: str) -> str:
        for i, group in enumerate(self.share_groups):
            if tenant in group:
                return "group:" + ",".join(sorted(group)) + f"#{i}"
        return "tenant:" + tenant


def normalize_content(text: str) -> str:
    # Line endings and edge whitespace never change an answer; inner whitespace might (code).
    return text.replace("\r\n", "\n").strip()


def normalized_messages(messages: Iterable[ChatMessage]) -> list[list[str]]:
    return [[m.role, normalize_content(m.content)] for m in messages]


def is_cacheable(job: Job, rules: CacheRules) -> bool:
    return job.cache.mode != "bypass" and job.temperature <= rules.max_temperature


def cache_key(job: Job, rules: CacheRules) -> str:
    material = [
        KEY_VERSION,
        rules.scope(job.tenant),
        normalized_messages(job.chat),
        job.model,
        job.quality,
        job.task,
        job.user_tier,
        job.max_tokens,
        round(job.temperature, 4),
    ]
    blob = json.dumps(material, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def prompt_hash(job: Job) -> str:
    """A short stable hash to name a prompt in logs without showing it."""
    blob = json.dumps(normalized_messages(job.chat), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def rules_from_policy(policy: Policy) -> CacheRules:
    return CacheRules(
        max_temperature=policy.cache.max_temperature if policy.cache.enabled else -1.0,
        share_groups=tuple(frozenset(g) for g in policy.cache_sharing),
    )
