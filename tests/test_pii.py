"""PII and secret scanner: every pattern, and the near-misses that must stay unflagged."""

from __future__ import annotations

import time

import pytest

from farebox.routing.pii import apply_redactions, iban_ok, luhn_ok, scan


def _found(text: str) -> list[tuple[str, str]]:
    return [(f.kind, text[f.start : f.end]) for f in scan(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # email
        ("write to jane.doe7@example.com today", [("email", "jane.doe7@example.com")]),
        ("a+b@mail.co.uk", [("email", "a+b@mail.co.uk")]),
        # phone: E.164, international with spaces, US formats
        ("call +14155550100", [("phone", "+14155550100")]),
        ("or +1 415 555 0107.", [("phone", "+1 415 555 0107")]),
        ("London +44 20 7946 0958", [("phone", "+44 20 7946 0958")]),
        ("Paris +33 1 23 45 67 89", [("phone", "+33 1 23 45 67 89")]),
        ("Berlin +49 (30) 901820", [("phone", "+49 (30) 901820")]),
        ("+1-415-555-0100, ext. 12", [("phone", "+1-415-555-0100")]),
        ("office (415) 555-0100", [("phone", "(415) 555-0100")]),
        ("cell 415-555-0100", [("phone", "415-555-0100")]),
        ("cell 415.555.0100", [("phone", "415.555.0100")]),
        # card: Luhn-valid, printed the usual ways
        ("Card on file: 4111 1111 1111 1111, exp 12/29", [("card", "4111 1111 1111 1111")]),
        ("card 4111-1111-1111-1111", [("card", "4111-1111-1111-1111")]),
        ("card 5555555555554444", [("card", "5555555555554444")]),
        ("amex 3782 822463 10005", [("card", "3782 822463 10005")]),
        # SSN
        ("My SSN is 078-05-1120, please", [("ssn", "078-05-1120")]),
        ("ssn 123 45 6789", [("ssn", "123 45 6789")]),
        ("SSN: 123456789", [("ssn", "123456789")]),
        ("ssn   is \t 123456789", [("ssn", "123456789")]),
        ("social security number#123456789", [("ssn", "123456789")]),
        ("SSNis123456789", [("ssn", "123456789")]),
        # IBAN (mod-97), grouped and compact, followed by an upper-case word
        ("IBAN DE89 3704 0044 0532 0130 00 belongs to", [("iban", "DE89 3704 0044 0532 0130 00")]),
        ("GB82WEST12345698765432", [("iban", "GB82WEST12345698765432")]),
        ("pay GB82 WEST 1234 5698 7654 32 NOW", [("iban", "GB82 WEST 1234 5698 7654 32")]),
        # secrets
        ("key sk-proj-abcdefghijklmnopqrstuvwx12", [("secret", "sk-proj-abcdefghijklmnopqrstuvwx12")]),
        ("sk-ant-api03-abcdefghijklmnopqrstuv", [("secret", "sk-ant-api03-abcdefghijklmnopqrstuv")]),
        ("aws AKIAIOSFODNN7EXAMPLE", [("secret", "AKIAIOSFODNN7EXAMPLE")]),
        (
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            [("secret", "ghp_abcdefghijklmnopqrstuvwxyz0123456789")],
        ),
        (
            "AIzaSyA-abcdefghijklmnopqrstuvwxyz0123456",
            [("secret", "AIzaSyA-abcdefghijklmnopqrstuvwxyz0123456")],
        ),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc", [("secret", "eyJhbGciOiJIUzI1NiJ9.abc")]),
        ("api_key=Zx9Kq2Lm8Np4Rt6Vw1Yb3", [("secret", "Zx9Kq2Lm8Np4Rt6Vw1Yb3")]),
        ('"token": "a8F3kL0pQ7zX2mN9vB4c"', [("secret", "a8F3kL0pQ7zX2mN9vB4c")]),
        # several kinds in one text, in order
        (
            "jane@x.io, 415-555-0100, 078-05-1120",
            [("email", "jane@x.io"), ("phone", "415-555-0100"), ("ssn", "078-05-1120")],
        ),
    ],
)
def test_scan_finds(text: str, expected: list[tuple[str, str]]) -> None:
    assert _found(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Card 4111 1111 1111 1112 declined",  # 16 digits failing Luhn: not a card
        "ref 1234567890123456",  # 16 digits, not Luhn-valid
        "account 3704 0044 0532 0130 01",  # Luhn-valid by chance but not a card grouping
        "SSN 000-12-3456",  # area 000 is never issued
        "SSN 666-12-3456",  # nor 666
        "SSN 912-12-3456",  # nor 9xx
        "SSN 123-00-4567",  # group 00
        "SSN 123-45-0000",  # serial 0000
        "In 2024 the team grew",  # a year
        "shipped on 2024-01-15 at 10:30",  # a date
        "order #12345678 is late",  # an order number
        "invoice 9876543210",  # ten bare digits: no separators, not a phone
        "call 015-555-0100",  # US area codes never start with 0
        "ISBN 978-3-16-148410-0",
        "version 1.2.3 costs $1,234,567.89",
        "x = 3.14159265358979",
        "IBAN DE89 3704 0044 0532 0130 01 fails mod-97",
        "a task-based approach with sk-short",  # "sk-" inside a word / too short
        "password=correcthorsebattery",  # no digits, low entropy: a word, not a key
        "the email field is required",  # no @
        "4 + 4 = 8 and 12 + 30 = 42",  # short numbers after '+'
        "",
    ],
)
def test_scan_near_misses(text: str) -> None:
    assert scan(text) == []


def test_overlap_prefers_specific_kind() -> None:
    # A card number is also a long digit run; it is reported once, as a card.
    assert [f.kind for f in scan("4111 1111 1111 1111")] == ["card"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail jane@x.io now", "mail [REDACTED:email] now"),
        ("SSN 078-05-1120, card 4111111111111111", "SSN [REDACTED:ssn], card [REDACTED:card]"),
        ("api_key=Zx9Kq2Lm8Np4Rt6Vw1Yb3;", "api_key=[REDACTED:secret];"),
        ("nothing here in 2024", "nothing here in 2024"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert apply_redactions(text, scan(text)) == expected


@pytest.mark.parametrize(
    ("digits", "ok"),
    [("4111111111111111", True), ("4111111111111112", False), ("79927398713", True), ("79927398710", False)],
)
def test_luhn(digits: str, ok: bool) -> None:
    assert luhn_ok(digits) is ok


@pytest.mark.parametrize(
    ("iban", "ok"),
    [("DE89370400440532013000", True), ("DE89370400440532013001", False), ("GB82WEST12345698765432", True)],
)
def test_iban_checksum(iban: str, ok: bool) -> None:
    assert iban_ok(iban) is ok


@pytest.mark.parametrize(
    ("text", "old_seconds"),
    [
        # Blanks after "ssn" with no number: the old pattern split the run between its two ``\s*`` every way
        # (quadratic: 16,000 blanks took 7.5 s, 30,000 about 26 s).
        ("12345 ssn" + " " * 30_000 + "x", 26),
        ("12345 social security" + "\t" * 30_000, 26),
        # "+" and long digit runs: the old phone groups re-cut each run ~10,000 ways (2.7 s per 100,000 chars).
        ((" +" + "1" * 29) * 10_000, 8),
    ],
    ids=["ssn-blanks", "social-security-tabs", "plus-digit-runs"],
)
def test_scan_of_hostile_text_ends_quickly(text: str, old_seconds: float) -> None:
    """A prompt is scanned on the route stage's event loop: a pattern that backtracks without bound stalls
    the stage (and every job behind it). The bound is far above what the patterns take (a few ms) and far
    below what the old ones did, so the test fails on a regression, not on a slow machine."""
    started = time.process_time()
    scan(text)
    assert time.process_time() - started < min(2.0, old_seconds / 4)
