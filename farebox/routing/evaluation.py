"""How well a router's scores spend the premium tier: the quality/cost curve and the figures read off it.

Pure numpy, as ``docs/router-evaluation.md`` in the shared data defines them, so farebox's figures compare with
RouteLLM's and anyone else's:

- the curve sends the top fraction x of prompts (by score) to the strong model and the rest to the weak one; ties
  are broken at random *in expectation*, so a tie group contributes linearly and the curve is deterministic (a
  constant score gives the straight line from all-weak to all-strong);
- PGR(x) = (q(x) - q_weak) / (q_strong - q_weak); APGR is its exact area over x in [0, 1] (the curve is piecewise
  linear, so the trapezoids over its corners are exact): a random router scores 0.500, the oracle more than 1;
- CPT(p) is the smallest share sent to strong at which the curve reaches q_weak + p * gap;
- the saving at a quality level is 1 - cost(x*) / cost(all strong), x* the first share whose quality reaches that
  share of q_strong, cost(x) = x * c_strong + (1 - x) * c_weak with mean per-prompt costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float64]


@dataclass(frozen=True)
class Curve:
    """Corners of the piecewise-linear quality curve: ``share[i]`` sent to strong gives mean quality
    ``quality[i]``; ``share`` runs from 0 to 1 and is strictly increasing."""

    share: Floats
    quality: Floats
    q_weak: float
    q_strong: float

    @property
    def gap(self) -> float:
        return self.q_strong - self.q_weak

    def quality_at(self, x: float | Floats) -> Floats:
        out: Floats = np.asarray(np.interp(x, self.share, self.quality), dtype=np.float64)
        return out

    def first_share_reaching(self, target: float) -> float | None:
        """The smallest share whose quality reaches ``target`` (linear inside a segment), or None."""
        reached = np.flatnonzero(self.quality >= target - 1e-12)
        if reached.size == 0:
            return None
        i = int(reached[0])
        if i == 0:
            return 0.0
        q0, q1 = self.quality[i - 1], self.quality[i]
        x0, x1 = self.share[i - 1], self.share[i]
        return float(x0 + (x1 - x0) * (target - q0) / (q1 - q0))


def quality_curve(scores: Floats, strong: Floats, weak: Floats) -> Curve:
    """The curve of ``scores`` (higher: more likely to need strong) over per-prompt qualities in [0, 1]."""
    scores, strong, weak = (np.asarray(a, dtype=np.float64) for a in (scores, strong, weak))
    n = scores.size
    if n == 0 or strong.size != n or weak.size != n:
        raise ValueError("scores, strong and weak need the same, non-zero length")
    order = np.argsort(-scores, kind="stable")
    gain = (strong - weak)[order]
    ranked = scores[order]
    # The corners sit at the ends of tie groups: inside one, the expected gain grows linearly.
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True]) + 1
    cumulative = np.r_[0.0, np.cumsum(gain)[ends - 1]]
    share = np.r_[0.0, ends / n]
    q_weak = float(weak.mean())
    return Curve(share=share, quality=q_weak + cumulative / n, q_weak=q_weak, q_strong=float(strong.mean()))


def apgr(curve: Curve) -> float:
    """The area under PGR over [0, 1]; NaN when both models have the same mean quality (no gap to recover)."""
    if abs(curve.gap) < 1e-12:
        return float("nan")
    pgr = (curve.quality - curve.q_weak) / curve.gap
    return float(np.sum((pgr[1:] + pgr[:-1]) * np.diff(curve.share)) / 2)


def cpt(curve: Curve, p: float) -> float | None:
    """The smallest share sent to strong at which the curve recovers ``p`` of the gap (None: never)."""
    return curve.first_share_reaching(curve.q_weak + p * curve.gap)


def saving_at(curve: Curve, level: float, cost_strong: float, cost_weak: float) -> float | None:
    """1 - cost(x*) / cost(all strong) at the first share whose quality reaches ``level`` * q_strong."""
    x = curve.first_share_reaching(level * curve.q_strong)
    if x is None or cost_strong <= 0:
        return None
    return 1.0 - (x * cost_strong + (1.0 - x) * cost_weak) / cost_strong


@dataclass(frozen=True)
class Figures:
    apgr: float
    cpt50: float | None
    cpt80: float | None
    saving95: float | None
    saving100: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "apgr": self.apgr,
            "cpt50": self.cpt50,
            "cpt80": self.cpt80,
            "saving95": self.saving95,
            "saving100": self.saving100,
        }


def figures(scores: Floats, strong: Floats, weak: Floats, cost_strong: Floats, cost_weak: Floats) -> Figures:
    """APGR, CPT(50%), CPT(80%) and the savings at 95% and 100% of premium quality, for per-prompt costs."""
    curve = quality_curve(scores, strong, weak)
    c_strong, c_weak = float(np.mean(cost_strong)), float(np.mean(cost_weak))
    return Figures(
        apgr=apgr(curve),
        cpt50=cpt(curve, 0.5),
        cpt80=cpt(curve, 0.8),
        saving95=saving_at(curve, 0.95, c_strong, c_weak),
        saving100=saving_at(curve, 1.0, c_strong, c_weak),
    )


@dataclass(frozen=True)
class Interval:
    value: float | None
    low: float | None
    high: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "low": self.low, "high": self.high}


def bootstrap(
    scores: Floats,
    strong: Floats,
    weak: Floats,
    cost_strong: Floats,
    cost_weak: Floats,
    *,
    rounds: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Interval]:
    """Each figure with a percentile interval over ``rounds`` resamples of the prompts (with replacement)."""
    arrays = [np.asarray(a, dtype=np.float64) for a in (scores, strong, weak, cost_strong, cost_weak)]
    point = figures(*arrays).as_dict()
    rng = np.random.default_rng(seed)
    n = arrays[0].size
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(rounds):
        pick = rng.integers(0, n, n)
        for name, value in figures(*(a[pick] for a in arrays)).as_dict().items():
            if value is not None and not np.isnan(value):
                draws[name].append(value)
    tail = (1.0 - level) / 2 * 100
    out = {}
    for name, value in point.items():
        got = draws[name]
        low, high = (float(np.percentile(got, tail)), float(np.percentile(got, 100 - tail))) if got else (None, None)
        out[name] = Interval(value, low, high)
    return out
