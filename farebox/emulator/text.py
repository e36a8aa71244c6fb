"""Deterministic fake answers: the same prompt, model and limit always give the same text.

Determinism is what lets the cache and dedup tests compare answers byte for byte, and a bounded,
tiktoken-measured length keeps the emulated token usage honest against ``max_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from farebox.tokens import count_text

# Short, common words: each is one cl100k token with its leading space, so lengths stay cheap
# to hit exactly.
WORDS = (
    "the answer is that a careful plan keeps costs low while quality stays high and every "
    "request finds the cheapest model able to do the work well so the team can ship faster "
    "with fewer surprises in the monthly bill because cached results are free and retries are "
    "rare when the system is calm yet ready for load"
).split()

MIN_WANT = 12
WANT_SPREAD = 52  # so a natural answer is 12..63 tokens long


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int
    hit_limit: bool  # the answer was cut by max_tokens rather than ending on its own


def fake_answer(model: str, pairs: Sequence[tuple[str, str]], max_tokens: int) -> Answer:
    key = json.dumps([model, [list(p) for p in pairs], max_tokens], ensure_ascii=False)
    digest = hashlib.sha256(key.encode()).digest()
    want = MIN_WANT + digest[0] % WANT_SPREAD
    budget = min(want, max_tokens)
    rng = random.Random(digest)

    words = [*f"Emulated answer from {model}:".split()]
    words += [rng.choice(WORDS) for _ in range(budget)]
    text = ""
    tokens = 0
    for word in words:
        candidate = f"{text} {word}" if text else word
        n = count_text(candidate)
        if n > budget:
            break
        text, tokens = candidate, n
    if not text:
        # Even max_tokens=1 gets a non-empty reply; "ok" is a single token.
        text, tokens = "ok", count_text("ok")
    return Answer(text=text, tokens=tokens, hit_limit=want > max_tokens)
