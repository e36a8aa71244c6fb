"""`farebox catalog check|show|import` and `farebox estimate`, via the argparse wiring of farebox/cli/__init__.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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


def shared_map() -> Path:
    if not SHARED_MAP.exists():
        pytest.fail(f"LiteLLM price map missing at {SHARED_MAP} (the shared data beside the checkout)")
    return SHARED_MAP


def test_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "imported.json"
    assert run(["catalog", "import", str(shared_map()), "-o", str(out), "--providers", "openai,gemini"]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"_about", "openai", "google"}
    err = capsys.readouterr().err
    assert "imported" in err and f"tiers by {CATALOG_DIR / 'tier_rules.json'}" in err and "will refuse" not in err
    assert doc["openai"]["gpt-4o"]["tier"] == "high" and "tier_rules.json rule" in doc["openai"]["gpt-4o"]["note"]
    # The bundled policy works with it; the models the rules leave untiered are reported as pin-only.
    assert run(["catalog", "check", str(out), "--policy", str(CATALOG_DIR / "policy.json")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ok: ") and "used only when pinned" in captured.err
    assert run(["catalog", "import", str(SHARED_MAP), "--providers", "mistral"]) == 1


def test_import_with_rules_that_leave_tiers_empty_is_refused_by_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules, out = tmp_path / "rules.json", tmp_path / "imported.json"
    rules.write_text(json.dumps({"rules": [{"match": ["*-mini*", "*-nano*"], "tier": "low"}]}))
    argv = ["catalog", "import", str(shared_map()), "-o", str(out), "--tier-rules", str(rules)]
    assert run(argv) == 0
    err = capsys.readouterr().err
    assert f"tiers by {rules}" in err and "untiered" in err
    assert "warning: `farebox catalog check` will refuse it" in err and "no model of tier medium or high" in err
    assert run(["catalog", "check", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no model of tier medium or high" in err


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read tier rules"),
        ('{"rules": [{"tier": "best"}]}', "field 'rules.0.tier'"),
    ],
)
def test_import_with_a_bad_rule_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, problem: str
) -> None:
    rules, out = tmp_path / "rules.json", tmp_path / "imported.json"
    if content is not None:
        rules.write_text(content)
    assert run(["catalog", "import", str(shared_map()), "-o", str(out), "--tier-rules", str(rules)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {rules}: ") and problem in err and not out.exists()


def test_check_refuses_an_untiered_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What an import without tiers gave: every job, quality high included, went to the default model.
    untiered = {
        "openai": {
            n: {"input_cost_per_1k_tokens": 0.001, "output_cost_per_1k_tokens": 0.002}
            for n in ("house-model-a", "house-model-b")
        }
    }
    path = tmp_path / "untiered.json"
    path.write_text(json.dumps(untiered))
    assert run(["catalog", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no model of tier low or medium or high" in err


def report_model(report: dict[str, Any]) -> str:
    (model,) = report["by_model"]
    return str(model)


def test_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "Summarize this text please", "task": "summarize"}) + "\n" + "garbage\n")
    assert run(["estimate", str(jobs), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["routed"] == 1 and report["invalid"] == 1 and report["invalid_examples"][0]["line"] == 2
    assert report["cost_usd"] < report["baseline_cost_usd"]
    assert run(["estimate", str(jobs)]) == 0
    out = capsys.readouterr().out
    assert "cost under policy" in out
    for title, row in (("by task", "summarize"), ("by tier", "low"), ("by model", report_model(report))):
        section = out[out.index(f"estimate {title}") :]
        assert row in section.splitlines()[4], (title, section)  # title, top rule, header, rule, first row
    assert run(["estimate", str(tmp_path / "missing.jsonl")]) == 1
