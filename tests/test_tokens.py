"""Token counting (farebox/tokens.py): tiktoken's counts, and long runs of blanks, on which tiktoken panics."""

from __future__ import annotations

import pytest

from farebox.tokens import BLANK_PIECE, _encoded_count, count_messages, count_text

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("hello world", 2), ("Prove that sqrt(2) is irrational.", 10), ("  \n\n", 1)],
)
def test_count_text_is_tiktokens_count(text: str, tokens: int) -> None:
    assert count_text(text) == tokens == _encoded_count(text)


@pytest.mark.parametrize(
    "text",
    [
        "hello" + " " * 200_000 + "world",  # longer than a piece, short enough for tiktoken itself
        "x" * 70_000 + " " * (BLANK_PIECE + 1) + "y" * 10 + "\t" * 100_000,
        " " * (3 * BLANK_PIECE),
    ],
    ids=["one-run", "two-runs", "only-blanks"],
)
def test_runs_counted_in_pieces_count_what_tiktoken_counts(text: str) -> None:
    assert count_text(text) == _encoded_count(text)


@pytest.mark.parametrize("blank", [" ", "\t", "\u00a0", "\u3000"], ids=["space", "tab", "nbsp", "ideographic"])
def test_a_million_blanks_are_counted_not_a_panic(blank: str) -> None:
    """tiktoken 0.14 raises a PanicException (a BaseException, which no stage catches) on a run of about a million
    blanks other than newlines (openai/tiktoken#15): a job whose prompt has one would be held unsettled."""
    text = "q" + blank * 1_100_000 + "q"
    assert 1_100_000 / 200 < count_text(text) <= 1_100_002
    assert count_messages([("user", text)]) == count_text(text) + 3 + 1 + 3
