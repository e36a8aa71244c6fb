"""What the learned router is worth on prompts and subjects it never saw: the issue's target figures from
nested grouped cross-validation on the visible RouteLLM data (GPT-4-1106 vs Mixtral-8x7B), with bootstrap
95% intervals, beside the rules the route stage used before, a random router and prompt length alone;
plus training time (several runs), artifact size and the CPU of scoring one prompt.

    .venv/bin/python bench/router_quality.py --runs 5

- MMLU: grouped 7-fold cross-validation by subject (``router train``'s own figures): each subject is scored
  by a router trained, features chosen included, on the other folds' subjects;
- "MMLU without the largest": the same scores with the largest subject (professional law) left out;
- GSM8K: a router trained on MMLU alone scores every GSM8K problem.

Run 1 uses the balanced folds ``router train`` uses (the table's figures); each further run shuffles which
subjects share a fold (``group_folds(seed=run)``), and the closing lines give the median, min and max of the
held-out APGR over the runs: how much the estimate owes to the fold assignment.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, publish_table, spread

from farebox.routing.baselines import rules_scores
from farebox.routing.evaluation import Floats, apgr, bootstrap, quality_curve
from farebox.routing.features import lexical_features
from farebox.routing.learned import LearnedRouter
from farebox.routing.outcomes import KNOWN_PRICES, OutcomeSet, load_outcomes
from farebox.routing.store import load_pair
from farebox.routing.training import train_router
from farebox.settings import Settings

TARGETS = "targets: MMLU APGR >= 0.63, CPT(50%) <= 30%, saving@95% >= 40%; without largest >= 0.58; GSM8K >= 0.60"


def cell(interval: dict[str, float | None], percent: bool = False) -> str:
    value, low, high = interval["value"], interval["low"], interval["high"]
    if value is None or low is None or high is None:
        return "n/a"
    k = 100.0 if percent else 1.0
    spec = ".0f" if percent else ".3f"
    return f"{value * k:{spec}} [{low * k:{spec}}, {high * k:{spec}}]"


def row(data: OutcomeSet, scores: Floats, rounds: int) -> dict[str, dict[str, float | None]]:
    cost_strong, cost_weak = data.costs(KNOWN_PRICES)
    got = bootstrap(scores, data.strong, data.weak, cost_strong, cost_weak, rounds=rounds)
    return {k: v.as_dict() for k, v in got.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "routellm")
    parser.add_argument(
        "--runs", type=int, default=5, help="trainings, timed: run 1 on the balanced folds (the table), then shuffled"
    )
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--folds", type=int, default=7)
    a = parser.parse_args()
    mmlu = load_outcomes([a.data / "mmlu"])
    gsm8k = load_outcomes([a.data / "gsm8k_responses.csv"])
    groups = np.asarray(mmlu.groups)
    largest = max(set(mmlu.groups), key=mmlu.groups.count)
    rest = groups != largest
    times, repeated, first = [], [], None
    for run in range(a.runs):
        t0 = time.process_time()
        got = train_router(mmlu, folds=a.folds, source="bench", seed=None if run == 0 else run)
        times.append(time.process_time() - t0)
        first = first or got
        repeated.append((held_out_apgr(got.oof, mmlu), held_out_apgr(got.oof[rest], mmlu.subset(rest))))
    trained = first
    assert trained is not None and trained.trained_on is not None
    sets = {
        "MMLU (held-out subjects)": (mmlu, trained.oof),
        f"MMLU without {largest}": (mmlu.subset(rest), trained.oof[rest]),
        "GSM8K (router trained on MMLU only)": (gsm8k, trained.router.raw(gsm8k.prompts)),
    }
    settings = Settings()
    catalog, policy, _, _ = load_pair(settings.catalog, settings.policy)
    results: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
    for label, (data, learned) in sets.items():
        results[label] = {
            "learned (farebox)": row(data, learned, a.bootstrap),
            "rules (before)": row(data, rules_scores(data.prompts, catalog, policy).scores, a.bootstrap),
            "prompt length": row(data, lexical_features(data.prompts, ["log_words"])[:, 0], a.bootstrap),
            "random": row(data, np.zeros(len(data)), a.bootstrap),
        }
    lines = [
        "| data | router | APGR | CPT(50%) % | CPT(80%) % | saving @95% % | saving @100% % |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, routers in results.items():
        for name, figs in routers.items():
            lines.append(
                f"| {label} | {name} | {cell(figs['apgr'])} | {cell(figs['cpt50'], True)} | "
                f"{cell(figs['cpt80'], True)} | {cell(figs['saving95'], True)} | {cell(figs['saving100'], True)} |"
            )
    size = len(json.dumps(trained.document, indent=1))
    per_prompt = score_cpu_us(trained.router, list(gsm8k.prompts) + list(mmlu.prompts[:2000]))
    lines += [
        "",
        f"values [95% bootstrap interval, {a.bootstrap} resamples of the prompts]; {TARGETS}",
        f"training on {len(mmlu)} MMLU rows, nested grouped {a.folds}-fold CV included, CPU s: {spread(times, '.1f')}"
        f" over {a.runs} runs; artifact {size} bytes; features {', '.join(trained.document['features'])};"
        f" left out of training: {', '.join(trained.dropped_groups) or 'none'}",
        f"scoring one prompt (features + model), CPU us: {spread(per_prompt, '.0f')} over 5 passes of"
        f" {len(gsm8k) + 2000} prompts",
        f"learned, held-out MMLU APGR over {a.runs} fold assignments (run 1 balanced, then shuffled):"
        f" {spread([r[0] for r in repeated], '.3f')}; without {largest}: {spread([r[1] for r in repeated], '.3f')}",
    ]
    publish_table("router_quality", "\n".join(lines) + "\n")
    (RESULTS / "router_quality.json").write_text(json.dumps(results, indent=1))


def held_out_apgr(scores: Floats, data: OutcomeSet) -> float:
    return apgr(quality_curve(scores, data.strong, data.weak))


def score_cpu_us(router: LearnedRouter, prompts: list[str]) -> list[float]:
    """CPU microseconds per prompt scored one at a time, as the route stage scores, per pass."""
    out = []
    for _ in range(5):
        t0 = time.process_time()
        for p in prompts:
            router.score([p])
        out.append((time.process_time() - t0) / len(prompts) * 1e6)
    return out


if __name__ == "__main__":
    main()
