"""Outcome data made in a test: prompts with each model's 0/1 outcome, fixed token counts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from farebox.routing.outcomes import OutcomeSet


def outcome_set(
    prompts: Sequence[str], groups: Sequence[str], strong: Sequence[float], weak: Sequence[float], digest: str
) -> OutcomeSet:
    n = len(prompts)
    return OutcomeSet(
        prompts=tuple(prompts),
        groups=tuple(groups),
        strong_model="big",
        weak_model="small",
        strong=np.array(strong, dtype=np.float64),
        weak=np.array(weak, dtype=np.float64),
        input_tokens=np.full(n, 50.0),
        strong_output_tokens=np.full(n, 10.0),
        weak_output_tokens=np.full(n, 10.0),
        digest=digest,
    )
