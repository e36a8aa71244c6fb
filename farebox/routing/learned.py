"""A learned router: a file that turns a prompt into P(the job needs the premium tier), and the thresholds that
keep a stated share of premium quality.

The file is JSON (``farebox-router``), small and safe to load (no pickle): the lexical features it reads
(farebox/routing/features.py), their standardisation, a linear model over them, a logistic calibration of its
output to the probability that the premium model succeeds where the cheaper one fails, and the operating
points: for each quality level (a share of premium quality), the share of jobs to send to premium and the
score threshold that does it. ``farebox router train`` writes it (farebox/routing/training.py).

Version 2 adds, optionally, a choice model: boosted trees (farebox/routing/trees.py) that score prompts with
an option list (multiple-choice questions), whose options say much about how hard they are; the linear model
then reads the question alone (``"reads": "question"``) and scores every other prompt. Version 1 files (one
linear model over the whole text) still load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from farebox.routing.catalog import CatalogError
from farebox.routing.features import FEATURES, has_options, lexical_features, question_text
from farebox.routing.trees import Trees, TreesError, trees_from_document

FORMAT = "farebox-router"
VERSION = 2
READABLE_VERSIONS = (1, 2)
READS = ("whole", "question")  # what text the linear model's features are computed on
BUILTIN = "builtin"  # the router trained on the shared RouteLLM data, shipped in the package
BUILTIN_FILE = "router.json"  # in farebox/catalog


class RouterFileError(CatalogError):
    """A router file that cannot be used: missing, not JSON, another format, or inconsistent."""


@dataclass(frozen=True)
class LearnedRouter:
    source: str
    features: tuple[str, ...]
    mean: NDArray[np.float64]
    scale: NDArray[np.float64]
    coef: NDArray[np.float64]
    intercept: float
    calibration: tuple[float, float]  # P = sigmoid(a * raw + b)
    levels: tuple[float, ...]  # increasing shares of premium quality
    thresholds: tuple[float, ...]  # the score at or above which a job goes to premium, per level
    meta: dict[str, Any]
    reads: str = "whole"
    knots: NDArray[np.float64] | None = None  # quantiles of the training rows' raw output (version 2)
    choice_features: tuple[str, ...] = ()
    choice: Trees | None = None  # scores prompts with options, when present

    def _linear(self, texts: Sequence[str]) -> NDArray[np.float64]:
        if self.reads == "question":
            texts = [question_text(t) for t in texts]
        x = (lexical_features(texts, self.features) - self.mean) / self.scale
        out: NDArray[np.float64] = x @ self.coef + self.intercept
        return out

    def raw(self, texts: Sequence[str]) -> NDArray[np.float64]:
        """The model's estimate of the gain of premium (premium minus cheaper quality) per text."""
        if self.choice is None:
            return self._linear(texts)
        choices = np.array([has_options(t) for t in texts], dtype=bool)
        out = np.zeros(len(texts))
        if not choices.all():
            out[~choices] = self._linear([t for t, c in zip(texts, choices, strict=True) if not c])
        if choices.any():
            picked = [t for t, c in zip(texts, choices, strict=True) if c]
            out[choices] = self.choice.predict(lexical_features(picked, self.choice_features))
        return out

    def score(self, texts: Sequence[str]) -> NDArray[np.float64]:
        """P(the job needs premium) per text, in [0, 1]."""
        a, b = self.calibration
        raw = self.raw(texts)
        if self.knots is not None:  # the scale the calibration was fitted on
            raw = positions(self.knots, raw)
        z = np.clip(a * raw + b, -500.0, 500.0)
        out: NDArray[np.float64] = 1.0 / (1.0 + np.exp(-z))
        return out

    def threshold(self, level: float) -> float:
        """The score threshold that keeps ``level`` of premium quality: the calibrated point at or above it."""
        for known, threshold in zip(self.levels, self.thresholds, strict=True):
            if known >= level - 1e-9:
                return threshold
        return self.thresholds[-1]

    def describe(self) -> str:
        trained = self.meta.get("training", {})
        digest = str(trained.get("data_sha256", "?"))[:12]
        return f"{self.source} (trained on {trained.get('rows', '?')} rows, data sha256 {digest})"


def positions(knots: NDArray[np.float64], raw: NDArray[np.float64]) -> NDArray[np.float64]:
    """The share of training rows predicted below ``raw``, read off their quantiles ``knots``."""
    out: NDArray[np.float64] = np.interp(raw, knots, _shares(len(knots)))
    return out


@lru_cache(maxsize=4)
def _shares(n: int) -> NDArray[np.float64]:
    return np.linspace(0.0, 1.0, n)  # once per knot count: the route stage scores one prompt at a time


def _floats(doc: dict[str, Any], key: str, n: int | None, where: str) -> NDArray[np.float64]:
    value = doc.get(key)
    if not isinstance(value, list) or not all(isinstance(v, int | float) and math.isfinite(v) for v in value):
        raise RouterFileError(f"{where}: field {key!r} must be a list of finite numbers")
    if n is not None and len(value) != n:
        raise RouterFileError(f"{where}: field {key!r} has {len(value)} values, expected {n}")
    return np.asarray(value, dtype=np.float64)


def _feature_names(value: object, source: str) -> tuple[str, ...]:
    names = tuple(value) if isinstance(value, list) else ()
    unknown = [f for f in names if f not in FEATURES]
    if unknown or not names:
        raise RouterFileError(f"{source}: unknown features {unknown} (known: {', '.join(FEATURES)})")
    return names


def _choice_model(doc: dict[str, Any], source: str) -> tuple[tuple[str, ...], Trees | None]:
    section = doc.get("choice_model")
    if doc.get("version") == 1 or section is None:
        return (), None
    if not isinstance(section, dict):
        raise RouterFileError(f"{source}: field 'choice_model' must be an object")
    names = _feature_names(section.get("features"), source)
    try:
        return names, trees_from_document(section, len(names), source)
    except TreesError as err:
        raise RouterFileError(str(err)) from None


def router_from_document(doc: object, source: str) -> LearnedRouter:
    """Check a parsed router file and build the router; RouterFileError names what is wrong."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RouterFileError(f'{source}: not a farebox router file (no "format": "{FORMAT}")')
    if doc.get("version") not in READABLE_VERSIONS:
        raise RouterFileError(
            f"{source}: router format version {doc.get('version')!r}; this farebox reads "
            + " and ".join(map(str, READABLE_VERSIONS))
        )
    try:
        features = _feature_names(doc["features"], source)
        model, calib = doc["model"], doc["calibration"]
        reads = model.get("reads", "whole") if doc["version"] > 1 else "whole"
        if reads not in READS:
            raise RouterFileError(f"{source}: model 'reads' must be one of {', '.join(READS)}")
        choice_features, choice = _choice_model(doc, source)
        n = len(features)
        levels = _floats(calib, "levels", None, source)
        thresholds = _floats(calib, "thresholds", len(levels), source)
        scale = _floats(model, "scale", n, source)
        if not levels.size or np.any(np.diff(levels) <= 0) or np.any(scale <= 0):
            raise RouterFileError(f"{source}: calibration levels must increase and scales be positive")
        platt = _floats(calib, "platt", 2, source)
        # Version 2's calibration and thresholds are on the knots' scale: without them every score would be off.
        knots = _floats(calib, "knots", None, source) if doc["version"] > 1 else None
        if knots is not None and (knots.size < 2 or np.any(np.diff(knots) <= 0)):
            raise RouterFileError(f"{source}: calibration knots must be at least 2 increasing numbers")
        return LearnedRouter(
            source=source,
            features=features,
            mean=_floats(model, "mean", n, source),
            scale=scale,
            coef=_floats(model, "coef", n, source),
            intercept=float(_floats(model, "intercept", 1, source)[0]),
            calibration=(float(platt[0]), float(platt[1])),
            levels=tuple(float(v) for v in levels),
            thresholds=tuple(float(v) for v in thresholds),
            meta={k: v for k, v in doc.items() if k not in ("model", "calibration", "choice_model")},
            reads=reads,
            knots=knots,
            choice_features=choice_features,
            choice=choice,
        )
    except (KeyError, TypeError, AttributeError) as err:
        raise RouterFileError(f"{source}: incomplete router file ({type(err).__name__}: {err})") from None


def load_router(path: str | Path) -> LearnedRouter:
    """The router in ``path`` (``"builtin"``: the one shipped with farebox); RouterFileError in one line."""
    if str(path) == BUILTIN:
        text = resources.files("farebox.catalog").joinpath(BUILTIN_FILE).read_text(encoding="utf-8")
        return router_from_document(json.loads(text), f"{BUILTIN} ({BUILTIN_FILE})")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RouterFileError(f"{path}: router file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RouterFileError(f"{path}: cannot read the router file ({err})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise RouterFileError(f"{path}: not JSON (line {err.lineno}: {err.msg})") from None
    return router_from_document(doc, str(path))


def prompt_text(contents: Sequence[str]) -> str:
    """The text a router scores for a chat: its messages' contents, one per line (as outcome data joins them)."""
    return "\n".join(contents)
