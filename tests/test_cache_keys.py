"""Cache keys and cacheability as plain functions, in tables."""

from __future__ import annotations

from typing import Any

import pytest

from farebox.schemas import Job
from farebox.stages.cache_keys import CacheRules, cache_key, is_cacheable, prompt_hash

BASE: dict[str, Any] = {"tenant": "acme", "prompt": "Summarize: the queue is full.", "max_tokens": 100}
DEFAULT = CacheRules()
SHARED = CacheRules(share_groups=(frozenset({"acme", "acme-eu"}),))


def key(rules: CacheRules = DEFAULT, **changes: Any) -> str:
    return cache_key(Job(**{**BASE, **changes}), rules)


@pytest.mark.parametrize(
    "changes",
    [
        {"tenant": "globex"},
        {"prompt": "Summarize: the queue is empty."},
        {"max_tokens": 101},
        {"quality": "high"},
        {"model": "openai/gpt-4o-mini"},
        {"task": "summarize"},
        {"user_tier": "pro"},
        {"temperature": 0.5},
        {
            "prompt": None,
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Summarize: the queue is full."},
            ],
        },
    ],
)
def test_anything_that_changes_the_answer_changes_the_key(changes: dict[str, Any]) -> None:
    assert key(**changes) != key()


@pytest.mark.parametrize(
    "changes",
    [
        {"prompt": "  Summarize: the queue is full.\r\n"},  # edge whitespace, line endings
        {"job_id": "another-id"},
        {"metadata": {"batch": 7}},
        {"deadline_s": 30},
        {"cache": {"mode": "refresh", "ttl_s": 5}},
        {"prompt": None, "messages": [{"role": "user", "content": "Summarize: the queue is full."}]},  # = prompt
    ],
)
def test_what_cannot_change_the_answer_keeps_the_key(changes: dict[str, Any]) -> None:
    assert key(**changes) == key()


@pytest.mark.parametrize(
    "tenant_a, tenant_b, same",
    [
        ("acme", "acme-eu", True),  # one sharing group
        ("acme", "globex", False),
        ("globex", "initech", False),  # neither in a group: each alone
    ],
)
def test_tenants_share_only_inside_a_policy_group(tenant_a: str, tenant_b: str, same: bool) -> None:
    assert (key(SHARED, tenant=tenant_a) == key(SHARED, tenant=tenant_b)) is same


@pytest.mark.parametrize(
    "changes, rules, cacheable",
    [
        ({}, CacheRules(), True),
        ({"temperature": 0.7}, CacheRules(), False),
        ({"temperature": 0.7}, CacheRules(max_temperature=1.0), True),
        ({"cache": {"mode": "bypass"}}, CacheRules(), False),
        ({"cache": {"mode": "refresh"}}, CacheRules(), True),
        ({}, CacheRules(max_temperature=-1.0), False),  # caching disabled by policy
    ],
)
def test_cacheable(changes: dict[str, Any], rules: CacheRules, cacheable: bool) -> None:
    assert is_cacheable(Job(**{**BASE, **changes}), rules) is cacheable


def test_prompt_hash_names_a_prompt_without_showing_it() -> None:
    h = prompt_hash(Job(**BASE))
    assert len(h) == 12 and "queue" not in h and h == prompt_hash(Job(**BASE))
