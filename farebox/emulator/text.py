"""Deterministic fake answers: the same prompt, model and limit always give the same text.

Determinism is what lets the cache and dedup tests compare answers byte for byte, and a bounded,
tiktoken-measured length keeps the emulated token usage honest against ``max_tokens``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

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
    return _fake_answer(model, tuple((str(r), str(c)) for r, c in pairs), max_tokens)


@lru_cache(maxsize=2048)  # load tests repeat prompts; the answer is a pure function of them
def _fake_answer(model: str, pairs: tuple[tuple[str, str], ...], max_tokens: int) -> Answer:
    key = json.dumps([model, pairs, max_tokens], ensure_ascii=False).encode()
    want = MIN_WANT + hashlib.sha256(key).digest()[0] % WANT_SPREAD
    budget = min(want, max_tokens)
    # One hash byte per word: deterministic and much cheaper than a seeded random.Random.
    picks = hashlib.shake_256(key).digest(budget)

    words = [*f"Emulated answer from {model}:".split()]
    words += [WORDS[b % len(WORDS)] for b in picks]
    # Count word by word (cached) instead of re-encoding the growing text: this runs on every
    # request, and a load test sends thousands at once.
    pieces: list[str] = []
    total = 0
    for word in words:
        piece = f" {word}" if pieces else word
        n = _piece_tokens(piece)
        if total + n > budget:
            break
        pieces.append(piece)
        total += n
    text = "".join(pieces)
    tokens = count_text(text)
    # BPE can merge across pieces differently than piece by piece; trim until the real count fits.
    while tokens > budget and pieces:
        pieces.pop()
        text = "".join(pieces)
        tokens = count_text(text)
    if not text:
        # Even max_tokens=1 gets a non-empty reply; "ok" is a single token.
        text, tokens = "ok", count_text("ok")
    return Answer(text=text, tokens=tokens, hit_limit=want > max_tokens)


@lru_cache(maxsize=4096)
def _piece_tokens(piece: str) -> int:
    return count_text(piece)
