"""LiteLLM's rule-based `complexity_router` as a scorer for bench/peer_routers.py: no proxy, no LLM call.

LiteLLM goes into a virtual environment of its own (bench/.litellm-venv-complexity), pinned to one
exact release and installed from wheels only; the release floor and the `.pth` checks are those of
bench/litellm_proxy.py (the 1.82.7/1.82.8 malware ran through `litellm_init.pth`). The scoring runs
this file as a script in that venv (`--worker`): JSON lines in (`{"prompt": ...}`), JSON lines out
(`{"score": ..., "tier": ...}`), from `ComplexityRouter.classify(prompt)` in
litellm/router_strategy/complexity_router/complexity_router.py with the default configuration
(`classifier_type: heuristic`): `score` is its weighted sum over the seven dimensions, `tier` the tier
that score (or its reasoning-marker override) picks.

Only the standard library at the top: the worker runs under the LiteLLM venv's Python, not farebox's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = "1.110.2"  # the newest 1.110.x on PyPI (issue 17 quotes "LiteLLM 1.110's complexity_router")
VENV = HERE / ".litellm-venv-complexity"
TIERS = ("SIMPLE", "MEDIUM", "COMPLEX", "REASONING")  # the default ladder, cheapest first


def ensure_venv() -> Path:
    """The venv's Python with litellm==VERSION installed and checked (SystemExit when refused)."""
    from litellm_proxy import ensure_litellm_venv

    python = ensure_litellm_venv(VENV, VERSION)
    (VENV / ".gitignore").write_text("*\n")  # as Python 3.13's venv writes: git never lists it
    return python


def score_prompts(prompts: Sequence[str]) -> tuple[list[float], list[str]]:
    """(weighted score, tier) per prompt, from one worker process under the LiteLLM venv."""
    python = ensure_venv()
    with tempfile.TemporaryDirectory(prefix="fbbench-complexity-") as tmp:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": tmp,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price map at import
            "LITELLM_TELEMETRY": "False",
            "HF_HUB_OFFLINE": "1",
        }
        lines = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
        proc = subprocess.run(
            [python, "-I", str(Path(__file__).resolve()), "--worker"],
            input=lines,
            capture_output=True,
            text=True,
            cwd=tmp,
            env=env,
        )
    if proc.returncode:
        raise SystemExit(f"the complexity_router worker exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if len(out) != len(prompts):
        raise SystemExit(f"the complexity_router worker answered {len(out)} of {len(prompts)} prompts")
    return [float(o["score"]) for o in out], [str(o["tier"]) for o in out]


def installed_version() -> str | None:
    from litellm_proxy import installed_version as version_in

    return version_in(VENV)


# --- the worker, run under the LiteLLM venv's Python ---------------------------------------------------------------
def _worker() -> None:
    from unittest.mock import MagicMock

    from litellm.router_strategy.complexity_router import ComplexityRouter

    # The default configuration, as LiteLLM's own eval (evals/eval_complexity_router.py) builds it: the
    # heuristic scorer never reads the routing context.
    router = ComplexityRouter(model_name="farebox-bench", ctx=MagicMock())
    for line in sys.stdin:
        if line.strip():
            tier, score, _signals = router.classify(json.loads(line)["prompt"])
            sys.stdout.write(json.dumps({"score": score, "tier": getattr(tier, "value", str(tier))}) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
