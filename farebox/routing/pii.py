"""Find personal data and secrets in prompt text; redact them.

Precision matters as much as recall: a router that blocks or redacts every order number is useless. So each
pattern is anchored on structure and, where the format has one, a checksum: cards must pass Luhn, IBANs the
ISO 13616 mod-97 check, SSNs must have a possible area/group/serial. Phones need separators or a leading "+",
so years, dates and plain order numbers are not phones. Generic ``key=value`` secrets must look random.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from farebox.schemas import ChatMessage


@dataclass(frozen=True)
class PiiFinding:
    kind: str  # "email" | "phone" | "card" | "ssn" | "iban" | "secret"
    start: int
    end: int


# Every card, SSN and US phone has three digits followed (maybe after one separator) by two more.
_DIGIT_RUN = re.compile(r"\d{3}[ .-]?\d\d")
_IBAN_START = re.compile(r"[A-Z]{2}\d\d")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")

# Speed note: Python's re scans fast for a pattern that *starts* with a character class, and slowly for one
# that starts with a look-behind. So the digit patterns start with the digit and ``_clear_before`` checks the
# preceding character in Python instead.

# 13-19 digits, contiguous or grouped by spaces/dashes; the grouping, digit count and Luhn are checked after.
_CARD = re.compile(r"[2-6]\d{3}(?:[ -]?\d){9,15}(?!\d)")
# How card numbers are printed: 4-4-4-4 (most), 4-4-4-4-3 (19 digits), 4-6-5 (Amex), 4-6-4 (Diners).
# Any other grouping of a Luhn-valid run of digits is more likely an account or reference number.
_CARD_GROUPS = frozenset({(4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4)})

# Area 000, 666 and 9xx, group 00 and serial 0000 are never issued; separators must match (078-05-1120).
_SSN = re.compile(r"\d{3}([- ])\d{2}\1\d{4}(?![\d-])")
# Possessive blanks: with two plain ``\s*`` around an optional word, a run of blanks after "ssn" is split every
# possible way before the match fails, which costs its square (16,000 blanks took 7.5 s).
_SSN_LABELLED = re.compile(r"(?i)\b(?:ssn|social security(?: number)?)\s*+(?:(?:is|:|#)\s*+)?(?!000|666|9)(\d{9})\b")

_IBAN = re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")

# E.164 and international: "+" country code then groups; US: (415) 555-0100, 415-555-0100, 415.555.0100.
# The groups are atomic: a long run of digits can be cut into them some 10,000 ways, each tried again before
# ``(?!\d)`` fails (100,000 characters of " +" and 29 digits, again and again, took 2.9 s; now 33 ms).
_PHONE_INTL = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?>[ .-]?\(?\d{1,5}\)?){1,5}(?!\d)")
_PHONE_US = re.compile(r"\d{3}([ .-])\d{3}\1\d{4}(?![\d-])")  # one separator throughout: 415-555-0100
_PHONE_US_PAREN = re.compile(r"\(\d{3}\) ?\d{3}[ .-]\d{4}(?![\d-])")  # (415) 555-0100

# (literal the key must contain, pattern starting with that literal). The literal is tested with ``in``
# first, which is far cheaper than running the regex over prose that cannot match.
_SECRETS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("sk-", re.compile(r"sk-(?:ant-|proj-|svcacct-)?[A-Za-z0-9_-]{20,}")),  # Anthropic, OpenAI
    ("AKIA", re.compile(r"AKIA[0-9A-Z]{16}\b")),  # AWS access key id
    ("ASIA", re.compile(r"ASIA[0-9A-Z]{16}\b")),  # AWS temporary key id
    ("gh", re.compile(r"gh[pousr]_[A-Za-z0-9]{36,}\b")),  # GitHub tokens
    ("github_pat_", re.compile(r"github_pat_[A-Za-z0-9_]{40,}")),
    ("AIza", re.compile(r"AIza[0-9A-Za-z_-]{35,}")),  # Google API key
    ("xox", re.compile(r"xox[abprs]-[A-Za-z0-9-]{10,}")),  # Slack
    (
        "PRIVATE KEY",
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)"),
    ),
)
_BEARER = re.compile(r"(?i)\bBearer\s+([A-Za-z0-9._~+/=-]{16,})")
# key = value where the key says "secret"; only the value is reported, so redaction keeps the key readable.
_ASSIGNED = re.compile(
    r"(?i)\b(?:api[_-]?key|apikey|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|token|password|passwd)"
    r"[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9_./+=-]{16,})"
)

# When findings overlap, the more specific kind wins (a card number is not also a phone number).
_PRIORITY = {"secret": 0, "card": 1, "iban": 2, "ssn": 3, "email": 4, "phone": 5}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(compact: str) -> bool:
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _clear_before(text: str, pos: int, also: str) -> bool:
    """True when the match at ``pos`` does not continue a word, a number or one of ``also``."""
    return pos == 0 or not (text[pos - 1].isalnum() or text[pos - 1] in also)


def _cards(text: str) -> Iterable[PiiFinding]:
    for m in _CARD.finditer(text):
        if not _clear_before(text, m.start(), "-"):
            continue
        groups = re.split(r"[ -]", m.group())
        digits = "".join(groups)
        if len(groups) > 1 and tuple(len(g) for g in groups) not in _CARD_GROUPS:
            continue
        if 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1:
            yield PiiFinding("card", m.start(), m.end())


def _ibans(text: str) -> Iterable[PiiFinding]:
    for m in _IBAN.finditer(text):
        if not _clear_before(text, m.start(), ""):
            continue
        # The pattern is greedy and may swallow a following upper-case word or number; retry shorter,
        # at space boundaries, until the checksum holds.
        s = m.group()
        while True:
            if iban_ok(s.replace(" ", "")):
                yield PiiFinding("iban", m.start(), m.start() + len(s))
                break
            cut = s.rfind(" ")
            if cut < 15:
                break
            s = s[:cut]


def _phones_intl(text: str) -> Iterable[PiiFinding]:
    for m in _PHONE_INTL.finditer(text):
        n = sum(c.isdigit() for c in m.group())
        if 8 <= n <= 15:
            yield PiiFinding("phone", m.start(), m.end())


def _phones_us(text: str) -> Iterable[PiiFinding]:
    for m in _PHONE_US.finditer(text):
        # US area codes never start with 0 or 1.
        if m.group()[0] not in "01" and _clear_before(text, m.start(), "+-_"):
            yield PiiFinding("phone", m.start(), m.end())
    if "(" in text:
        for m in _PHONE_US_PAREN.finditer(text):
            if m.group()[1] not in "01":
                yield PiiFinding("phone", m.start(), m.end())


def _ssns(text: str, lower: str) -> Iterable[PiiFinding]:
    for m in _SSN.finditer(text):
        area, group, serial = re.split(r"[- ]", m.group())
        # Area 000, 666 and 9xx, group 00 and serial 0000 are never issued.
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        if _clear_before(text, m.start(), "-"):
            yield PiiFinding("ssn", m.start(), m.end())
    if "ssn" in lower or "social security" in lower:
        for m in _SSN_LABELLED.finditer(text):
            yield PiiFinding("ssn", m.start(1), m.end(1))


# Words _ASSIGNED needs (lower-cased), tested with ``in`` before the regex runs.
_ASSIGNED_HINTS = ("key", "secret", "token", "passw")


def _secrets(text: str, lower: str) -> Iterable[PiiFinding]:
    for hint, pattern in _SECRETS:
        if hint in text:
            for m in pattern.finditer(text):
                if _clear_before(text, m.start(), "_-"):
                    yield PiiFinding("secret", m.start(), m.end())
    if "bearer" in lower:
        for m in _BEARER.finditer(text):
            yield PiiFinding("secret", m.start(1), m.end(1))
    if not any(h in lower for h in _ASSIGNED_HINTS):
        return
    for m in _ASSIGNED.finditer(text):
        value = m.group(1)
        # Real keys look random; "password=correcthorsebattery" style words are left to people.
        if _entropy(value) >= 3.0 and any(c.isdigit() for c in value):
            yield PiiFinding("secret", m.start(1), m.end(1))


def scan(text: str) -> list[PiiFinding]:
    """Every finding in ``text``, sorted by position, without overlaps."""
    found: list[PiiFinding] = []
    lower = text.lower()
    if "@" in text:
        found.extend(PiiFinding("email", m.start(), m.end()) for m in _EMAIL.finditer(text))
    # Cheap gates first: most prompts have no run of 5+ digits, no "+" and no "XX00" IBAN start.
    if _DIGIT_RUN.search(text):
        found.extend(_cards(text))
        found.extend(_ssns(text, lower))
        found.extend(_phones_us(text))
    if "+" in text:
        found.extend(_phones_intl(text))
    if _IBAN_START.search(text):
        found.extend(_ibans(text))
    found.extend(_secrets(text, lower))
    if len(found) <= 1:
        return found
    kept: list[PiiFinding] = []
    for f in sorted(found, key=lambda f: (_PRIORITY[f.kind], f.start, -f.end)):
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def apply_redactions(text: str, findings: Iterable[PiiFinding]) -> str:
    """Replace each finding (non-overlapping, as ``scan`` returns them) with ``[REDACTED:<kind>]``."""
    out: list[str] = []
    pos = 0
    for f in sorted(findings, key=lambda f: f.start):
        out.append(text[pos : f.start])
        out.append(f"[REDACTED:{f.kind}]")
        pos = f.end
    out.append(text[pos:])
    return "".join(out)


def scan_chat(
    messages: tuple[ChatMessage, ...], kinds: Collection[str], *, redact: bool
) -> tuple[tuple[ChatMessage, ...], tuple[str, ...]]:
    """(the messages, with every finding of ``kinds`` redacted when ``redact``; the sorted kinds found)."""
    per_message = [[f for f in scan(m.content) if f.kind in kinds] for m in messages]
    found = tuple(sorted({f.kind for fs in per_message for f in fs}))
    if not found or not redact:
        return messages, found
    redacted = tuple(
        ChatMessage(role=m.role, content=apply_redactions(m.content, fs)) if fs else m
        for m, fs in zip(messages, per_message, strict=True)
    )
    return redacted, found
