"""Recorded outcomes: answer labelled prompts right or wrong per model (``--outcomes FILE``).

The file is JSON lines, one labelled prompt a line::

    {"prompt": "What is 2+2?", "label": "4", "correct": {"openai/gpt-4o-mini": false, "*": true}}
    {"messages": [{"role": "system", "content": "be brief"}, ...], "label": "B"}

A request matches a line when its messages' contents (every role, in order, joined with newlines,
stripped) equal the line's; a ``prompt`` line is one message. ``correct`` maps fnmatch patterns over
``provider/model`` to whether that model gets the label; the first pattern that matches, in file
order, decides, and a model no pattern matches is right. A wrong model gets a deterministic answer
that differs from the label even after case, whitespace and punctuation are ignored.

This replays real prompts with their real per-model outcomes through the pipeline, and makes one
model deliberately worse for an end-to-end A/B test.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from farebox.errors import InvalidRequest

Outcome = Literal["right", "wrong", "unmatched"]


@dataclass(frozen=True)
class Labelled:
    label: str
    wrong: str
    correct: tuple[tuple[str, bool], ...]  # (fnmatch pattern over "provider/model", right?), file order

    def is_right(self, target: str) -> bool:
        for pattern, right in self.correct:
            if fnmatchcase(target, pattern):
                return right
        return True

    def answer(self, provider: str, model: str) -> tuple[str, Outcome]:
        if self.is_right(f"{provider}/{model}"):
            return self.label, "right"
        return self.wrong, "wrong"


def normalise(text: str) -> str:
    """What a lenient grader compares: case folded, everything but letters and digits dropped."""
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def wrong_answer(label: str) -> str:
    """A deterministic answer that is never the label, however leniently compared."""
    digest = hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    wrong = f"(wrong) answer {digest}"
    if normalise(wrong) == normalise(label):  # only a label written as its own wrong answer
        wrong += " again"  # longer once normalised, so now it differs
    return wrong


def prompt_key(contents: Sequence[str]) -> bytes:
    text = "\n".join(contents).strip()
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def request_key(pairs: Sequence[tuple[str, str]]) -> bytes:
    return prompt_key([content for _, content in pairs])


class OutcomeBook:
    """The labelled prompts of one file, keyed by the hash of their text."""

    def __init__(self, path: str, entries: dict[bytes, Labelled]) -> None:
        self.path = path
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, pairs: Sequence[tuple[str, str]]) -> Labelled | None:
        return self.entries.get(request_key(pairs))

    def answer(self, provider: str, model: str, pairs: Sequence[tuple[str, str]]) -> tuple[str | None, Outcome]:
        """The text to answer (None: answer as usual) and how the answer counts."""
        entry = self.lookup(pairs)
        if entry is None:
            return None, "unmatched"
        return entry.answer(provider, model)


def load_outcomes(path: str) -> OutcomeBook:
    """Read and check an outcomes file; any fault is an InvalidRequest naming the file and line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"outcomes file {path}: cannot read it: {exc.strerror or exc}") from None
    entries: dict[bytes, Labelled] = {}
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            key, entry = _parse_line(line)
        except ValueError as exc:
            raise InvalidRequest(f"outcomes file {path} line {number}: {exc}") from None
        entries.setdefault(key, entry)  # a prompt listed twice: the first line wins
    if not entries:
        raise InvalidRequest(f"outcomes file {path}: no labelled prompts in it")
    return OutcomeBook(path, entries)


def _parse_line(line: bytes) -> tuple[bytes, Labelled]:
    try:
        row: Any = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError):
        raise ValueError("not valid JSON") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    label = row.get("label")
    if not isinstance(label, str) or not label.strip() or not _encodes(label):
        raise ValueError("'label' is required and must be a non-empty string")
    return prompt_key(_contents(row)), Labelled(label, wrong_answer(label), _correct(row.get("correct")))


def _contents(row: dict[str, Any]) -> list[str]:
    prompt, messages = row.get("prompt"), row.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of 'prompt' (a string) or 'messages' (a list)")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
        return [prompt]
    if not isinstance(messages, list) or not messages:
        raise ValueError('\'messages\' must be a non-empty list of {"role", "content"} objects')
    contents = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'content'")
        contents.append(message["content"])
    return contents


def _correct(value: Any) -> tuple[tuple[str, bool], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(isinstance(v, bool) for v in value.values()):
        raise ValueError("'correct' must be an object of \"provider/model pattern\": true or false")
    return tuple(value.items())


def _encodes(text: str) -> bool:
    # A lone surrogate (a "\ud800" escape in the JSON) could not be sent back in a reply.
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
