"""Train a learned router from outcome data, and say honestly how good it is.

Honest means grouped: rows of one group (an MMLU subject, a source file) never sit on both sides of a split,
because a router is judged on subjects it never saw, and random-row splits overstate it. The procedure, all
numpy:

1. the target is the gain of sending a prompt to premium, strong - weak quality in [-1, 1];
2. the open model, for prompts without options: features of the question text (a multiple-choice row counts
   by its question alone) are chosen by forward selection, each step keeping the feature that most raises the
   grouped cross-validated APGR of a ridge regression on the gain, stopping when none adds ``MIN_GAIN``;
3. the choice model, when the data has ``MIN_CHOICE_ROWS`` multiple-choice rows in two groups or more:
   boosted trees (farebox/routing/trees.py) on every feature of the whole prompt, fitted on those rows with
   fixed settings, monotone rising in the length features; it scores prompts with options;
4. the figures printed come from *nested* grouped cross-validation: the selection and both fits run again
   inside each outer training fold, so the held-out groups choose nothing;
5. a logistic (Platt) fit maps the out-of-fold output to P(premium succeeds where the cheaper model fails);
6. the operating points: for each quality level, the share of jobs the out-of-fold curve sends to premium to
   reach that level of premium quality, turned into a threshold on the final model's scores.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from farebox.routing.evaluation import Floats, apgr, quality_curve
from farebox.routing.features import FEATURES, has_options, lexical_features, question_text
from farebox.routing.learned import FORMAT, VERSION, LearnedRouter, positions, router_from_document
from farebox.routing.outcomes import OutcomeDataError, OutcomeSet
from farebox.routing.trees import DEPTH, LEARNING_RATE, TREES, Trees, fit_boosted, leaf_size

RIDGE_ALPHA = 100.0
MAX_FEATURES = 4
MIN_GAIN = 0.002  # APGR a feature must add to be kept
LEVELS = tuple(round(0.80 + 0.01 * i, 2) for i in range(21))  # 80% .. 100% of premium quality
NEVER = 1.01  # a threshold no score reaches: the level is met without premium
# A group where a model's mean quality is below this was graded wrongly, not answered badly: GPT-4 "scores"
# 3% on RouteLLM's MMLU high-school mathematics, far below the 25% of guessing, because its answers were
# not parsed. Training on it teaches that mathematics needs no premium model.
MIN_GROUP_QUALITY = 0.1
MIN_CHOICE_ROWS = 500  # multiple-choice rows a choice model needs; with fewer the open model scores them too
RISING = frozenset({"log_chars", "log_question_chars", "log_words"})  # the choice model's monotone features
KNOTS = 201  # quantiles of the training rows' predictions a router file keeps (see ``Branches``)


def group_folds(groups: Sequence[str], folds: int, seed: int | None = None) -> list[NDArray[np.int64]]:
    """Test indices of ``folds`` folds, whole groups each, largest groups first into the emptiest fold (as
    scikit-learn's GroupKFold balances them); with a ``seed``, groups in a random order instead, so repeated
    cross-validation shows how much the figures owe to which groups happen to share a fold."""
    names, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    k = min(folds, len(names))
    if k < 2:
        raise OutcomeDataError(
            f"grouped cross-validation needs at least 2 groups; the data has {len(names)} "
            "(give rows a 'group', such as their subject or source)"
        )
    load = np.zeros(k)
    fold_of = np.empty(len(names), dtype=np.int64)
    order = np.argsort(-sizes, kind="stable") if seed is None else np.random.default_rng(seed).permutation(len(names))
    for g in order:
        fold_of[g] = int(np.argmin(load))
        load[fold_of[g]] += sizes[g]
    return [np.flatnonzero(fold_of[inverse] == f) for f in range(k)]


@dataclass(frozen=True)
class Ridge:
    mean: Floats
    scale: Floats
    coef: Floats
    intercept: float

    def predict(self, x: Floats) -> Floats:
        out: Floats = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return out


def fit_ridge(x: Floats, y: Floats, alpha: float = RIDGE_ALPHA) -> Ridge:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    coef = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return Ridge(mean, scale, coef, float(y.mean()))


def _oof(x: Floats, gain: Floats, folds: list[NDArray[np.int64]]) -> Floats:
    out = np.zeros(len(gain))
    everything = np.arange(len(gain))
    for test in folds:
        train = np.setdiff1d(everything, test)
        out[test] = fit_ridge(x[train], gain[train]).predict(x[test])
    return out


def select_features(x: Floats, data: OutcomeSet, groups: Sequence[str], folds: int) -> list[int]:
    """Forward selection of feature columns by grouped cross-validated APGR."""
    gain = data.strong - data.weak
    splits = group_folds(groups, folds)
    chosen: list[int] = []
    best = -np.inf
    while len(chosen) < MAX_FEATURES:
        trials = {}
        for j in range(x.shape[1]):
            if j not in chosen:
                scores = _oof(x[:, [*chosen, j]], gain, splits)
                trials[j] = apgr(quality_curve(scores, data.strong, data.weak))
        if not trials:
            break
        j, value = max(trials.items(), key=lambda kv: kv[1])
        if value < best + MIN_GAIN:
            break
        chosen.append(j)
        best = value
    return chosen or [0]


def fit_platt(raw: Floats, label: Floats, iterations: int = 50) -> tuple[float, float]:
    """(a, b) of P = sigmoid(a * raw + b), by Newton's method on the log loss (with a small ridge)."""
    z = (raw - raw.mean()) / (raw.std() or 1.0)
    a, b = 0.0, 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a * z + b)))
        w = p * (1 - p) + 1e-9
        grad = np.array([np.sum((p - label) * z) + 1e-3 * a, np.sum(p - label)])
        hess = np.array([[np.sum(w * z * z) + 1e-3, np.sum(w * z)], [np.sum(w * z), np.sum(w)]])
        step = np.linalg.solve(hess, grad)
        a, b = a - step[0], b - step[1]
        if np.max(np.abs(step)) < 1e-9:
            break
    sd = raw.std() or 1.0
    return float(a / sd), float(b - a * raw.mean() / sd)


def operating_points(oof: Floats, data: OutcomeSet, final_scores: Floats) -> list[tuple[float, float, float]]:
    """(level, share sent to premium, threshold) per level, from the out-of-fold curve."""
    curve = quality_curve(oof, data.strong, data.weak)
    ranked = np.sort(final_scores)[::-1]
    out = []
    for level in LEVELS:
        share = curve.first_share_reaching(level * curve.q_strong)
        share = 1.0 if share is None else share
        k = int(np.ceil(share * len(ranked) - 1e-9))
        threshold = NEVER if k == 0 else float(ranked[min(k, len(ranked)) - 1])
        out.append((level, share, threshold))
    return out


@dataclass
class Trained:
    router: LearnedRouter
    document: dict[str, Any]
    oof: Floats  # nested grouped cross-validated scores (positions), one per row of ``trained_on``
    selected_per_fold: list[list[str]] = field(default_factory=list)
    dropped_groups: list[str] = field(default_factory=list)
    trained_on: OutcomeSet | None = None  # every row given; ``dropped_groups`` were scored, not trained on


@dataclass(frozen=True)
class Matrices:
    """Every feature of each row: of its question text (the open model's) and of its whole text (the choice
    model's), and which rows offer options."""

    question: Floats
    whole: Floats
    choices: NDArray[np.bool_]

    @classmethod
    def of(cls, prompts: Sequence[str]) -> Matrices:
        names = list(FEATURES)
        return cls(
            question=lexical_features([question_text(p) for p in prompts], names),
            whole=lexical_features(prompts, names),
            choices=np.array([has_options(p) for p in prompts], dtype=bool),
        )


@dataclass(frozen=True)
class Branches:
    """The open model (ridge on the question's ``cols``), the choice model when there is one, and where the
    training rows' predictions fall (``knots``): a score is the share of training rows predicted below it, so
    models fitted on different folds speak on one scale (pooled out-of-fold scores would otherwise mix each
    fold model's own offset and spread) and the calibration fitted on them fits the final model too."""

    cols: list[int]
    ridge: Ridge
    choice: Trees | None
    knots: Floats

    def predict(self, m: Matrices, rows: NDArray[np.int64]) -> Floats:
        out: Floats = self.ridge.predict(m.question[rows][:, self.cols])
        chosen = m.choices[rows]
        if self.choice is not None and chosen.any():
            out[chosen] = self.choice.predict(m.whole[rows[chosen]])
        return out

    def position(self, raw: Floats) -> Floats:
        return positions(self.knots, raw)


def quantile_knots(pred: Floats) -> Floats:
    knots = np.quantile(pred, np.linspace(0.0, 1.0, KNOTS))
    # np.interp needs increasing points: ties (a constant model) are spread by a negligible step
    out: Floats = np.maximum.accumulate(knots) + np.arange(KNOTS) * 1e-12
    return out


def fit_branches(
    m: Matrices, data: OutcomeSet, train_mask: NDArray[np.bool_], with_choice: bool, folds: int
) -> Branches:
    gain = data.strong - data.weak
    train = np.flatnonzero(train_mask)
    inner = data.subset(train_mask)
    cols = select_features(m.question[train], inner, inner.groups, folds)
    ridge = fit_ridge(m.question[train][:, cols], gain[train])
    choice_rows = train_mask & m.choices
    choice = None
    if with_choice and has_choice_data(data, m, train_mask):  # in each fold by the rule the final router meets
        rising = [1 if n in RISING else 0 for n in FEATURES]
        choice = fit_boosted(m.whole[choice_rows], gain[choice_rows], rising)
    fitted = Branches(cols, ridge, choice, np.zeros(KNOTS))
    return Branches(cols, ridge, choice, quantile_knots(fitted.predict(m, train)))


def nested_oof(
    m: Matrices, data: OutcomeSet, folds: int, usable: NDArray[np.bool_], with_choice: bool, seed: int | None = None
) -> tuple[Floats, list[list[str]]]:
    """Nested grouped cross-validated scores (positions, see ``Branches``) for every row: each outer fold's
    models are trained (features selected and fitted) on the other folds' ``usable`` rows only."""
    names = list(FEATURES)
    oof = np.zeros(len(data))
    picked = []
    for test in group_folds(data.groups, folds, seed):
        train_mask = usable.copy()
        train_mask[test] = False
        fitted = fit_branches(m, data, train_mask, with_choice, max(folds - 1, 2))
        picked.append([names[c] for c in fitted.cols])
        oof[test] = fitted.position(fitted.predict(m, test))
    return oof, picked


def has_choice_data(data: OutcomeSet, m: Matrices, usable: NDArray[np.bool_]) -> bool:
    rows = usable & m.choices
    return int(rows.sum()) >= MIN_CHOICE_ROWS and len(set(np.asarray(data.groups)[rows])) >= 2


def broken_groups(data: OutcomeSet, min_quality: float = MIN_GROUP_QUALITY) -> list[str]:
    """Groups where either model's mean quality is below ``min_quality`` (see ``MIN_GROUP_QUALITY``)."""
    groups = np.asarray(data.groups)
    out = []
    for name in sorted(set(data.groups)):
        rows = groups == name
        if min(data.strong[rows].mean(), data.weak[rows].mean()) < min_quality:
            out.append(name)
    return out


def train_router(
    data: OutcomeSet,
    *,
    folds: int = 7,
    source: str = "trained",
    min_group_quality: float = MIN_GROUP_QUALITY,
    seed: int | None = None,
) -> Trained:
    """The router for ``data`` and its document (see farebox/routing/learned.py for the format). Groups
    ``broken_groups`` finds are left out of training and recorded in the document. ``seed`` shuffles the
    outer folds (``group_folds``): the models and knots do not depend on it; the out-of-fold figures, and the
    calibration and thresholds fitted on them, do."""
    if folds < 2:
        raise OutcomeDataError("--folds must be at least 2")
    dropped = broken_groups(data, min_group_quality)
    usable = np.isin(np.asarray(data.groups), dropped, invert=True)
    if not dropped and len(set(data.groups)) < 2:
        group_folds(data.groups, folds)  # raises: says how many groups there are and how to give them
    if len(set(np.asarray(data.groups)[usable])) < 2:
        raise OutcomeDataError(
            f"after leaving out groups where a model scores below {min_group_quality} ({', '.join(dropped)}), "
            "fewer than 2 groups are left to cross-validate"
        )
    names = list(FEATURES)
    m = Matrices.of(data.prompts)
    gain = data.strong - data.weak
    with_choice = has_choice_data(data, m, usable)
    oof, picked = nested_oof(m, data, folds, usable, with_choice, seed)
    clean = data.subset(usable)
    fitted = fit_branches(m, data, usable, with_choice, folds)
    cols, model, choice = fitted.cols, fitted.ridge, fitted.choice
    a, b = fit_platt(oof[usable], (gain[usable] > 0).astype(np.float64))
    final = 1.0 / (1.0 + np.exp(-(a * fitted.position(fitted.predict(m, np.flatnonzero(usable))) + b)))
    points = operating_points(oof[usable], clean, final)
    document: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "features": [names[c] for c in cols],
        "model": {
            "kind": "ridge-on-gain",
            "reads": "question",
            "alpha": RIDGE_ALPHA,
            "mean": model.mean.tolist(),
            "scale": model.scale.tolist(),
            "coef": model.coef.tolist(),
            "intercept": [model.intercept],
        },
        "calibration": {
            "knots": fitted.knots.tolist(),
            "platt": [a, b],
            "levels": [p[0] for p in points],
            "shares": [round(p[1], 6) for p in points],
            "thresholds": [p[2] for p in points],
        },
        "training": {
            "data_sha256": data.digest,
            "rows": len(data),
            "groups": len(set(data.groups)),
            "group_names": sorted(set(data.groups)),  # so `farebox eval` can tell in-sample data from held-out
            "benchmarks": sorted(set(data.benchmarks)),
            "strong_model": data.strong_model,
            "weak_model": data.weak_model,
            "folds": folds,
            "dropped_groups": dropped,
            "min_group_quality": min_group_quality,
            "features_per_fold": picked,
            "choice_rows": int((usable & m.choices).sum()),
            "trained_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }
    if choice is not None:
        document["choice_model"] = {
            "features": names,
            **choice.as_document(),
            "trees": TREES,
            "learning_rate": LEARNING_RATE,
            "min_leaf": leaf_size(int((usable & m.choices).sum())),
            "max_depth": DEPTH,
            "rising": sorted(RISING),
        }
    return Trained(router_from_document(document, source), document, oof, picked, dropped, data)
