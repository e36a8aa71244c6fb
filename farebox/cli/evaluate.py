"""``farebox eval``: replay outcome data through routers and baselines, without calling any provider.

For each router (``--router``, a file or "builtin") and baseline (``--baseline rules|random``), per benchmark
and over all rows: APGR, CPT(50%), CPT(80%) and the savings at 95% and 100% of premium quality against sending
everything to premium, each with a bootstrap interval (farebox/routing/evaluation.py; the rules are the shared
docs/router-evaluation.md). A table, ``--json`` for machines, ``--plot`` for the curves.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from farebox.cli.router import add_data_arguments, benchmark_masks, load_data, num, prices_of
from farebox.errors import InvalidRequest
from farebox.routing.evaluation import Curve, Floats, Interval, bootstrap, quality_curve
from farebox.routing.learned import BUILTIN, LearnedRouter, load_router
from farebox.routing.outcomes import OutcomeSet
from farebox.settings import Settings

FIGURES = ("apgr", "cpt50", "cpt80", "saving95", "saving100")
HEADERS = {
    "apgr": "APGR",
    "cpt50": "CPT(50%)",
    "cpt80": "CPT(80%)",
    "saving95": "saving at 95%",
    "saving100": "saving at 100%",
}
IN_SAMPLE, MAYBE_IN_SAMPLE, HELD_OUT = "in-sample", "possibly in-sample", "held-out"


@dataclass
class Entry:
    name: str
    kind: str  # "learned" or "baseline"
    scores: Floats
    sample: str | None = None  # for learned routers: IN_SAMPLE, MAYBE_IN_SAMPLE or HELD_OUT
    note: str = ""


def sample_check(router: LearnedRouter, data: OutcomeSet) -> tuple[str, str]:
    """Whether ``data`` is (or may be) what ``router`` was trained on: (verdict, why)."""
    training = router.meta.get("training")
    training = training if isinstance(training, dict) else {}
    if training.get("data_sha256") == data.digest:
        return IN_SAMPLE, "the router was trained on exactly this data (same sha256)"
    names = training.get("group_names")
    if isinstance(names, list):
        seen = (set(map(str, names)) - set(map(str, training.get("dropped_groups") or []))) & set(data.groups)
        if not seen:
            return HELD_OUT, "none of this data's groups are among the router's training groups"
        return IN_SAMPLE, f"{len(seen)} of this data's {len(set(data.groups))} groups are among its training groups"
    benchmarks = training.get("benchmarks")
    if isinstance(benchmarks, list):
        common = sorted(set(map(str, benchmarks)) & set(data.benchmarks))
        if not common:
            return HELD_OUT, "the router was trained on other benchmarks"
        return MAYBE_IN_SAMPLE, f"the router was trained on {', '.join(common)} too, so an overlap cannot be ruled out"
    return MAYBE_IN_SAMPLE, "the router file does not say what it was trained on"


def _rules_entry(data: OutcomeSet, settings: Settings) -> Entry:
    from farebox.routing.baselines import rules_scores
    from farebox.routing.catalog import load_catalog
    from farebox.routing.policy import checked_policy, load_policy

    catalog = load_catalog(settings.catalog)
    policy, _ = checked_policy(load_policy(settings.policy), catalog, str(settings.policy))
    got = rules_scores(data.prompts, catalog, policy)
    note = (
        f"decision-only (1: routed to a high-tier model as a plain job, policy {Path(settings.policy).name} with "
        f"the rules router): {got.scores.mean():.1%} of prompts to premium"
    )
    if got.refused:
        note += f"; {got.refused} refused by the rules (scored 0)"
    return Entry("rules", "baseline", got.scores, note=note)


def _entries(args: argparse.Namespace, data: OutcomeSet, settings: Settings) -> list[Entry]:
    from farebox.routing.baselines import random_scores

    out = []
    for path in dict.fromkeys(args.router or [BUILTIN]):  # each once, in the order given
        router = load_router(path)
        verdict, why = sample_check(router, data)
        out.append(Entry(str(path), "learned", router.score(list(data.prompts)), verdict, why))
    for name in dict.fromkeys(args.baseline):  # each once, in the order given
        if name == "rules":
            out.append(_rules_entry(data, settings))
        else:
            note = "constant score (ties broken in expectation)"
            out.append(Entry("random", "baseline", random_scores(len(data)), note=note))
    return out


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _interval(iv: Interval, fmt: Callable[[float | None], str]) -> str:
    if iv.value is None or math.isnan(iv.value):
        return "-"
    if iv.low is None or iv.high is None:
        return fmt(iv.value)
    return f"{fmt(iv.value)} ({fmt(iv.low)}, {fmt(iv.high)})"


def _pct_short(value: float | None) -> str:
    return "-" if value is None else f"{round(100 * value, 1) + 0.0:.1f}"  # + 0.0: no "-0.0"


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    if args.bootstrap < 0:
        raise InvalidRequest("--bootstrap must be at least 0")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("farebox: --plot needs matplotlib: pip install matplotlib (or farebox[plot])", file=sys.stderr)
            return 2
    data = load_data(args)
    prices = prices_of(args)
    cost_strong, cost_weak = data.costs(prices)
    entries = _entries(args, data, settings)
    masks = benchmark_masks(data)
    if len(masks) == 1:  # one benchmark: "all" is the same rows
        masks.append(("all", masks[0][1]))
    groups = np.asarray(data.groups)

    results: dict[str, dict[str, dict[str, Interval]]] = {}
    curves: dict[str, dict[str, Curve]] = {}
    for entry in entries:
        results[entry.name], curves[entry.name] = {}, {}
        for bench, m in masks:
            results[entry.name][bench] = bootstrap(
                entry.scores[m], data.strong[m], data.weak[m], cost_strong[m], cost_weak[m],
                rounds=args.bootstrap, seed=args.seed,
            )  # fmt: skip
            curves[entry.name][bench] = quality_curve(entry.scores[m], data.strong[m], data.weak[m])
    reference = {
        bench: {
            "rows": int(m.sum()),
            "groups": len(set(groups[m])),
            "q_strong": float(data.strong[m].mean()),
            "q_weak": float(data.weak[m].mean()),
            "cost_strong_usd_per_prompt": float(cost_strong[m].mean()),
            "cost_weak_usd_per_prompt": float(cost_weak[m].mean()),
        }
        for bench, m in masks
    }
    warnings = [
        f"warning: {e.name}: these figures are {e.sample}: {e.note}. For honest figures see the nested grouped "
        "cross-validation that `farebox router train` prints, or evaluate on data the router was not trained on."
        for e in entries
        if e.sample in (IN_SAMPLE, MAYBE_IN_SAMPLE)
    ]
    if args.json:
        for w in warnings:
            print(w, file=sys.stderr)
        doc = {
            "data": {
                "paths": [str(p) for p in args.data],
                "rows": len(data),
                "sha256": data.digest,
                "strong_model": data.strong_model,
                "weak_model": data.weak_model,
                "prices_per_1m": {m: list(prices[m]) for m in (data.strong_model, data.weak_model)},
            },
            "bootstrap": {"rounds": args.bootstrap, "seed": args.seed, "level": 0.95},
            "benchmarks": reference,
            "routers": [
                {
                    "name": e.name,
                    "kind": e.kind,
                    "sample": e.sample,
                    "note": e.note,
                    "figures": {
                        bench: {k: {kk: _finite(vv) for kk, vv in iv.as_dict().items()} for k, iv in figs.items()}
                        for bench, figs in results[e.name].items()
                    },
                }
                for e in entries
            ],
            "warnings": warnings,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        _print_tables(args, data, entries, results, reference, warnings)
    if args.plot:
        _plot(Path(args.plot), data, entries, curves)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _print_tables(
    args: argparse.Namespace,
    data: OutcomeSet,
    entries: list[Entry],
    results: dict[str, dict[str, dict[str, Interval]]],
    reference: dict[str, dict[str, Any]],
    warnings: list[str],
) -> None:
    console = Console(width=160)
    ref = Table(title=f"{len(data):,} prompts: {data.strong_model} (strong) vs {data.weak_model} (weak)")
    for col in ("benchmark", "rows", "groups", "q strong", "q weak", "$/prompt strong", "$/prompt weak"):
        ref.add_column(col, justify="left" if col == "benchmark" else "right")
    shown = [b for b in reference if not (b == "all" and len(reference) == 2)]  # one benchmark: "all" repeats it
    for bench in shown:
        r = reference[bench]
        ref.add_row(
            bench,
            f"{r['rows']:,}",
            str(r["groups"]),
            num(r["q_strong"]),
            num(r["q_weak"]),
            f"${r['cost_strong_usd_per_prompt']:.6f}",
            f"${r['cost_weak_usd_per_prompt']:.6f}",
        )
    console.print(ref)
    interval = f" (95% bootstrap interval, {args.bootstrap} resamples)" if args.bootstrap else ""
    table = Table(title=f"routers{interval}; CPT and savings in % (saving vs all-strong)")
    table.add_column("router")
    table.add_column("benchmark")
    for key in FIGURES:
        table.add_column(HEADERS[key], justify="right")
    for e in entries:
        for bench in shown:
            figs = results[e.name][bench]
            table.add_row(
                e.name,
                bench,
                *(_interval(figs[k], num if k == "apgr" else _pct_short) for k in FIGURES),
            )
        table.add_section()
    console.print(table)
    for e in entries:
        if e.note and e.sample is None:
            console.print(f"{e.name}: {e.note}", markup=False)
        elif e.sample == HELD_OUT:
            console.print(f"{e.name}: held-out data ({e.note})", markup=False)
    for w in warnings:
        console.print(w, markup=False, style="yellow")


def _plot(path: Path, data: OutcomeSet, entries: list[Entry], curves: dict[str, dict[str, Curve]]) -> None:
    from matplotlib.figure import Figure

    benches = list(next(iter(curves.values())))
    if len(benches) == 2 and benches[1] == "all":  # one benchmark: "all" is the same curve
        benches = benches[:1]
    fig = Figure(figsize=(5.5 * len(benches), 4.5), layout="constrained")
    axes = fig.subplots(1, len(benches), squeeze=False)[0]
    for ax, bench in zip(axes, benches, strict=True):
        first = curves[entries[0].name][bench]
        for e in entries:
            c = curves[e.name][bench]
            ax.plot(c.share * 100, c.quality * 100, label=e.name, marker="o" if len(c.share) <= 4 else None)
        ax.axhline(first.q_strong * 100, color="grey", linestyle="--", linewidth=0.8, label="all strong")
        ax.axhline(first.q_weak * 100, color="grey", linestyle=":", linewidth=0.8, label="all weak")
        ax.axhline(0.95 * first.q_strong * 100, color="grey", linestyle="-.", linewidth=0.6, label="95% of strong")
        ax.set_title(f"{bench} ({bench_rows(data, bench):,} prompts)")
        ax.set_xlabel(f"% of prompts sent to {data.strong_model}")
        ax.set_ylabel("mean quality (%)")
        ax.set_xlim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise InvalidRequest(f"{path}: cannot write the plot: {exc.strerror or exc}") from None


def bench_rows(data: OutcomeSet, bench: str) -> int:
    return len(data) if bench == "all" else sum(1 for b in data.benchmarks if b == bench)


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="replay outcome data through routers and baselines: APGR, CPT, savings (no provider calls)",
        description="Score routers on outcome data as docs/router-evaluation.md defines it, per benchmark and "
        "pooled, with bootstrap intervals. Evaluating a router on data it was trained on is flagged: those "
        "figures are in-sample.",
    )
    add_data_arguments(p)
    p.add_argument(
        "--router",
        action="append",
        default=[],
        metavar="ROUTER",
        help='a router file or "builtin" (repeatable; default: builtin)',
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        choices=("rules", "random"),
        help="rules: farebox's rules router as a 0/1 decision; random: a constant score (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="FILE.png", help="write the quality vs share-to-premium curves (matplotlib)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap resamples (default 200; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=cmd_eval)
