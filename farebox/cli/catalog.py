"""``farebox catalog check|show|import`` and ``farebox estimate``, registered by farebox/cli/__init__.py.

Each command's ``func(args, settings)`` returns the process exit code: 0 ok, 1 the input is wrong (message
on stderr, naming the file and field), never a traceback for bad data.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from farebox.routing.catalog import TIERS, Catalog, CatalogError, parse_catalog
from farebox.routing.estimate import Bucket, EstimateReport, estimate_lines
from farebox.routing.learned import LearnedRouter
from farebox.routing.litellm_prices import import_litellm, normalize_providers
from farebox.routing.policy import Policy, checked_policy, load_policy, tier_of
from farebox.routing.store import load_routing
from farebox.routing.tier_rules import UNTIERED, apply_tier_rules, load_tier_rules
from farebox.settings import CATALOG_DIR, Settings

DEFAULT_TIER_RULES = CATALOG_DIR / "tier_rules.json"


def _err(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _load(catalog_path: Path, policy_path: Path) -> tuple[Catalog, Policy, LearnedRouter | None, list[str]]:
    """The catalog, the policy as the pipeline routes with it (fallbacks applied), the learned router it
    names (None: rules) and the check's warnings: what the pipeline's workers load (farebox/routing/store.py),
    the experiments' arm router files included."""
    routing, warnings = load_routing(catalog_path, policy_path)
    return routing.catalog, routing.policy, routing.router, warnings


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    catalog_path = Path(args.path) if args.path else settings.catalog
    policy_path = Path(args.policy) if args.policy else settings.policy
    try:
        catalog, _, router, warnings = _load(catalog_path, policy_path)
    except CatalogError as exc:
        return _err(str(exc))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    routed_by = f"learned router {router.describe()}" if router is not None else "rules router"
    print(
        f"ok: {catalog_path}: {len(catalog)} models from {', '.join(catalog.providers())}; policy {policy_path} ok; "
        f"{routed_by} ok"
    )
    return 0


def _per_1m(price: float | None) -> str:
    return "-" if price is None else f"${price * 1000:,.4g}"


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    try:
        catalog, policy, _, _ = _load(settings.catalog, settings.policy)
    except CatalogError as exc:
        return _err(str(exc))
    models = sorted(catalog.models.values(), key=lambda m: (m.provider, m.input_cost_per_1k, m.model))
    if args.provider:
        models = [m for m in models if m.provider == args.provider]
        if not models:
            return _err(f"no models for provider '{args.provider}'; providers: {', '.join(catalog.providers())}")
    table = Table(title=f"{catalog.source} (USD per 1M tokens)")
    for col in ("model", "tier", "input", "output", "cached in", "context", "max out", "flags"):
        table.add_column(
            col, justify="right" if col in ("input", "output", "cached in", "context", "max out") else "left"
        )
    for m in models:
        flags = [*m.compliance, *m.capabilities, *(["deprecated"] if m.deprecated else [])]
        table.add_row(
            m.target,
            tier_of(m, policy) or "-",
            _per_1m(m.input_cost_per_1k),
            _per_1m(m.output_cost_per_1k),
            _per_1m(m.cached_input_cost_per_1k),
            f"{m.context_window:,}" if m.context_window else "-",
            f"{m.max_output_tokens:,}" if m.max_output_tokens else "-",
            ",".join(flags),
        )
    Console(width=140).print(table)
    return 0


def _read_map(path: str) -> dict[str, Any] | str:
    """The decoded LiteLLM price map, or what is wrong with the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror or exc}"
    except json.JSONDecodeError as exc:
        return f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})"
    if not isinstance(data, dict):
        return f"{path}: not a LiteLLM price map (top level must be an object)"
    return data


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    try:
        providers = normalize_providers([p.strip() for p in args.providers.split(",") if p.strip()])
        rules = load_tier_rules(args.tier_rules)
    except (ValueError, CatalogError) as exc:
        return _err(str(exc))
    data = _read_map(args.litellm_json)
    if isinstance(data, str):
        return _err(data)
    doc = import_litellm(data, providers, today=date.today())
    counts = {p: len(v) for p, v in doc.items() if not p.startswith("_")}
    if not counts:
        return _err(f"{args.litellm_json}: no chat models for providers {', '.join(sorted(providers))}")
    tiers = apply_tier_rules(doc, rules)
    text = json.dumps(doc, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    summary = ", ".join(f"{p} {n}" for p, n in sorted(counts.items()))
    by_tier = ", ".join(f"{t} {tiers[t]}" for t in (*TIERS, UNTIERED))
    print(
        f"imported {sum(counts.values())} models ({summary}){' to ' + args.output if args.output else ''}\n"
        f"tiers by {rules.source} (first matching rule; --tier-rules FILE to use others): {by_tier}",
        file=sys.stderr,
    )
    # The user may pair the file with another policy, so a mismatch with this one is told, not refused.
    try:
        imported = parse_catalog(doc, args.output or "<stdout>")
        checked_policy(load_policy(settings.policy), imported, str(settings.policy))
    except CatalogError as exc:
        print(f"warning: `farebox catalog check` will refuse it: {exc}", file=sys.stderr)
    return 0


def _bucket_table(title: str, key: str, rows: list[tuple[str, Bucket]]) -> Table:
    table = Table(title=title)
    for col in (key, "jobs", "input tok", "output tok", "cost", "baseline", "savings"):
        table.add_column(col, justify="left" if col == key else "right")
    for name, b in rows:
        table.add_row(
            name,
            f"{b.jobs:,}",
            f"{b.input_tokens:,}",
            f"{b.output_tokens:,}",
            f"${b.cost_usd:,.4f}",
            f"${b.baseline_cost_usd:,.4f}",
            f"${b.baseline_cost_usd - b.cost_usd:,.4f}",
        )
    return table


def _print_estimate(report: EstimateReport, console: Console) -> None:
    tier_order: dict[str, int] = {t: i for i, t in enumerate(TIERS)}
    console.print(_bucket_table("estimate by task", "task", sorted(report.by_task.items())))
    tiers = sorted(report.by_tier.items(), key=lambda kv: (tier_order.get(kv[0], len(TIERS)), kv[0]))
    console.print(_bucket_table("estimate by tier", "tier", tiers))
    models = sorted(report.by_model.items(), key=lambda kv: (-kv[1].cost_usd, kv[0]))
    console.print(_bucket_table("estimate by model", "model", models))
    console.print(_bucket_table("estimate by quality kept", "quality", sorted(report.by_quality.items())))
    pct = 100.0 * report.savings_usd / report.total.baseline_cost_usd if report.total.baseline_cost_usd else 0.0
    console.print(
        f"jobs {report.jobs:,}: routed {report.total.jobs:,}, blocked {report.blocked:,}, "
        f"invalid {report.invalid:,}, redacted {report.redacted:,}\n"
        f"cost under policy ${report.total.cost_usd:,.4f} "
        f"vs baseline ${report.total.baseline_cost_usd:,.4f}: "
        f"savings ${report.savings_usd:,.4f} ({pct:.1f}%)"
    )
    if report.quality_kept is not None:
        console.print(
            f"quality kept: {report.quality_kept * 100:.1f}% of premium quality on average over the "
            f"{report.scored:,} jobs the learned router decided (each at its quality's level, calibrated on "
            "held-back outcome data; see `farebox eval`)"
        )
    for line, message in report.invalid_examples:
        console.print(f"invalid line {line}: {message}", markup=False)


def cmd_estimate(args: argparse.Namespace, settings: Settings) -> int:
    try:
        catalog, policy, router, _ = _load(settings.catalog, settings.policy)
    except CatalogError as exc:
        return _err(str(exc))
    try:
        if args.file == "-":
            report = estimate_lines(sys.stdin, catalog, policy, router)
        else:
            with open(args.file, encoding="utf-8", errors="replace") as f:
                report = estimate_lines(f, catalog, policy, router)
    except OSError as exc:
        return _err(f"{args.file}: cannot read: {exc.strerror or exc}")
    if args.json:
        out: dict[str, Any] = report.as_dict()
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        _print_estimate(report, Console(width=120))
    return 0


def add_commands(subparsers: Any) -> None:
    cat = subparsers.add_parser("catalog", help="validate, list and import model prices")
    sub = cat.add_subparsers(dest="catalog_command", required=True)

    p = sub.add_parser("check", help="validate a catalog file and the policy against it")
    p.add_argument("path", nargs="?", help="catalog file (default: FAREBOX_CATALOG)")
    p.add_argument("--policy", help="policy file (default: FAREBOX_POLICY)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("show", help="table of models, prices per 1M tokens, tier and context")
    p.add_argument("--provider", help="only this provider")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("import", help="convert a LiteLLM price map into farebox's catalog format")
    p.add_argument("litellm_json", metavar="LITELLM_JSON")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument(
        "--providers",
        default="openai,anthropic,gemini",
        help="comma-separated providers to import (default: openai,anthropic,gemini)",
    )
    p.add_argument(
        "--tier-rules",
        default=str(DEFAULT_TIER_RULES),
        metavar="FILE",
        help="rules giving each model its tier: name patterns and output price bands, first match wins "
        f"(default: the bundled {DEFAULT_TIER_RULES.name}, which says how to write your own)",
    )
    p.set_defaults(func=cmd_import)

    p = subparsers.add_parser("estimate", help="what a JSONL file of jobs would cost, without calling providers")
    p.add_argument("file", metavar="FILE.jsonl", help="jobs, one JSON object per line ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_estimate)
