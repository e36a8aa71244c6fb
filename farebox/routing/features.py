"""Features of a prompt that say how hard it is, for the learned router: cheap, domain-general and pure.

Only signals that carry across subjects earn a place: a router is judged on subjects it never saw, and what
is specific to one subject (its words) does not transfer. Each feature is a plain function of the text, so
training (farebox/routing/training.py) and serving (farebox/routing/learned.py) compute the same numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import combinations, islice

import numpy as np
import regex  # type: ignore[import-untyped]  # Unicode categories, which re lacks
from numpy.typing import NDArray

# Enough text to judge a prompt by; a longer one costs CPU on the route stage's hot path and says no more.
MAX_CHARS = 8000
_WORD = re.compile(r"[A-Za-z]+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# Blanks only within the line: ``\s*`` would run over every blank line after each line start, which costs the
# square of the line count on a prompt of empty lines (8,000 of them took 1.9 s to read).
_OPTION = re.compile(r"^[ \t]*\(?[A-Ja-j][.)][ \t]+(.*)$", re.MULTILINE)
_MATH = frozenset("=+*/^<>|\\$%")
# Letters, their marks and digits of any script: a Russian, Greek or Hindi question's options have words too (the
# standard library's ``\w`` leaves out the vowel signs that Devanagari words are spelt with, and splits them).
_TERM = regex.compile(r"[\p{L}\p{M}\p{N}]+")
# MMLU offers 4-7 options; a prompt of a thousand option-like lines must not cost a million comparisons.
MAX_COMPARED_OPTIONS = 10


def question_text(text: str) -> str:
    """The text before a multiple-choice option list (all of it when there is none)."""
    match = _OPTION.search(text)
    return text[: match.start()] if match else text


def _options(text: str) -> list[str]:
    return _OPTION.findall(text)


def _option_overlap_max(text: str) -> float:
    """How alike the two most alike of the first ``MAX_COMPARED_OPTIONS`` option lines are: the Jaccard index of
    their words, 0 for a pair where either has none (``---`` says nothing of how alike two answers are), 0 without
    two options. Distractors that differ from the answer by a word or two make a question hard whatever its
    subject, so this carries to subjects the router never saw (README, "What it is worth")."""
    options = islice(_OPTION.finditer(text), MAX_COMPARED_OPTIONS)
    terms = [frozenset(_TERM.findall(option.group(1).lower())) for option in options]
    return max((len(a & b) / len(a | b) if a and b else 0.0 for a, b in combinations(terms, 2)), default=0.0)


def has_options(text: str) -> bool:
    """Whether the prompt offers choices (at least two lines such as ``A. ...``, ``b) ...``): a multiple-choice
    question, which the router's choice model scores; any other prompt is an open question."""
    return len(_OPTION.findall(text[:MAX_CHARS])) >= 2


def _share(text: str, test: Callable[[str], bool]) -> float:
    return sum(map(test, text)) / (len(text) + 1)  # map over a builtin: no Python frame per character


def _log_chars(text: str) -> float:
    return math.log1p(len(text))


def _log_question_chars(text: str) -> float:
    return math.log1p(len(question_text(text)))


def _log_option_chars(text: str) -> float:
    options = _options(text)
    return math.log1p(sum(len(o) for o in options) / len(options)) if options else 0.0


@lru_cache(maxsize=8)
def _word_lengths(text: str) -> tuple[int, ...]:
    """Three features read the words: found once per text (the route stage scores one text at a time)."""
    return tuple(map(len, _WORD.findall(text)))


def _log_words(text: str) -> float:
    return math.log1p(len(_word_lengths(text)))


def _mean_word_length(text: str) -> float:
    lengths = _word_lengths(text)
    return sum(lengths) / len(lengths) if lengths else 0.0


def _long_word_share(text: str) -> float:
    lengths = _word_lengths(text)
    return sum(1 for n in lengths if n >= 9) / len(lengths) if lengths else 0.0


def _digit_share(text: str) -> float:
    return _share(text, str.isdigit)


def _math_share(text: str) -> float:
    return sum(map(text.count, _MATH)) / (len(text) + 1)  # the same count as per character, in C


def _upper_share(text: str) -> float:
    return _share(text, str.isupper)


def _log_numbers(text: str) -> float:
    return math.log1p(len(_NUMBER.findall(text)))


def _log_lines(text: str) -> float:
    return math.log1p(text.count("\n"))


def _log_sentences(text: str) -> float:
    return math.log1p(len(re.findall(r"[.!?](?:\s|$)", text)))


FEATURES: dict[str, Callable[[str], float]] = {
    "log_chars": _log_chars,
    "log_question_chars": _log_question_chars,
    "log_option_chars": _log_option_chars,
    "log_words": _log_words,
    "mean_word_length": _mean_word_length,
    "long_word_share": _long_word_share,
    "digit_share": _digit_share,
    "math_share": _math_share,
    "upper_share": _upper_share,
    "log_numbers": _log_numbers,
    "log_lines": _log_lines,
    "log_sentences": _log_sentences,
    "option_overlap_max": _option_overlap_max,
}


def lexical_features(texts: Sequence[str], names: Sequence[str]) -> NDArray[np.float64]:
    """One row per text, one column per named feature (names from ``FEATURES``)."""
    funcs = [FEATURES[name] for name in names]
    out = np.empty((len(texts), len(funcs)), dtype=np.float64)
    for i, text in enumerate(texts):
        clipped = text[:MAX_CHARS]
        for j, func in enumerate(funcs):
            out[i, j] = func(clipped)
    return out
