"""docs/CONTRACT.md is the repository's copy of the contract; ../shared/CONTRACT.md stays the
reference. Where the reference is beside the checkout (development machines and CI), they match."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "CONTRACT.md"


def body(text: str) -> str:
    """The text without the copy's leading HTML comment."""
    if text.startswith("<!--"):
        text = text.split("-->", 1)[1]
    return text.strip()


def test_the_copy_says_what_the_reference_says() -> None:
    if not REFERENCE.is_file():
        pytest.skip(f"no reference contract at {REFERENCE}")
    assert body((ROOT / "docs" / "CONTRACT.md").read_text()) == body(REFERENCE.read_text())


def test_the_readme_links_the_contract() -> None:
    assert "(docs/CONTRACT.md)" in (ROOT / "README.md").read_text()
