"""`farebox catalog check|show|import` and `farebox estimate`, via the argparse wiring of farebox/cli/__init__.py."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from farebox.cli.catalog import add_commands
from farebox.settings import CATALOG_DIR, Settings

SHARED_MAP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "litellm_model_prices.json"


def run(argv: list[str], settings: Settings | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farebox")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args, settings or Settings())
    return code


def test_check_bundled(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["catalog", "check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "models from anthropic, google, openai" in out


def test_check_broken_file_names_file_model_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"openai": {"gpt-x": {"input_cost_per_1k_tokens": 1}}}))
    assert run(["catalog", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: model 'openai/gpt-x': field 'output_cost_per_1k_tokens': missing")


def test_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["catalog", "show", "--provider", "anthropic"]) == 0
    out = capsys.readouterr().out
    assert "anthropic/claude-3-haiku" in out and "$0.25" in out and "openai/" not in out
    assert run(["catalog", "show", "--provider", "nope"]) == 1


def test_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not SHARED_MAP.exists():
        if os.environ.get("CI"):
            pytest.fail(f"LiteLLM price map missing at {SHARED_MAP} (required in CI)")
        pytest.skip(f"LiteLLM price map not found at {SHARED_MAP}")
    out = tmp_path / "imported.json"
    assert run(["catalog", "import", str(SHARED_MAP), "-o", str(out), "--providers", "openai,gemini"]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"_about", "openai", "google"}
    assert "imported" in capsys.readouterr().err
    # The bundled policy works with an imported catalog; its untiered models are reported as pin-only.
    assert run(["catalog", "check", str(out), "--policy", str(CATALOG_DIR / "policy.json")]) == 0
    assert "used only when pinned" in capsys.readouterr().err
    assert run(["catalog", "import", str(SHARED_MAP), "--providers", "mistral"]) == 1


def test_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "Summarize this text please", "task": "summarize"}) + "\n" + "garbage\n")
    assert run(["estimate", str(jobs), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["routed"] == 1 and report["invalid"] == 1 and report["invalid_examples"][0]["line"] == 2
    assert report["cost_usd"] < report["baseline_cost_usd"]
    assert run(["estimate", str(jobs)]) == 0
    assert "cost under policy" in capsys.readouterr().out
    assert run(["estimate", str(tmp_path / "missing.jsonl")]) == 1
