"""Outcome data: prompts with, per model, whether it answered well (or a judge's score), for training and
evaluating routers.

Two formats, recognised by the file's suffix (a folder stands for the ``*.csv`` and ``*.jsonl`` files in it):

- **CSV**, RouteLLM's layout (``../shared/data/routellm/``): a ``prompt`` column, one column per model holding
  ``True``/``False`` or a score in [0, 1], optionally ``<model>_response`` columns (their token counts are the
  output tokens) and a ``group`` (or ``subject`` or ``source``) column;
- **JSONL**, one object per line: ``prompt`` (or ``messages``, a chat list), ``outcomes`` (model -> bool or score),
  optionally ``group`` and ``output_tokens`` (model -> tokens). ``farebox feedback export`` will write this.

A row's group is what grouped cross-validation keeps on one side: its ``group`` field, else the file's name
(``mmlu_anatomy.csv`` -> ``mmlu_anatomy``). Its benchmark is the group's first word (``mmlu``, ``gsm8k``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from farebox.errors import InvalidRequest
from farebox.routing.evaluation import Floats
from farebox.tokens import count_text

GROUP_COLUMNS = ("group", "subject", "source")
RESPONSE_SUFFIX = "_response"
# Output tokens assumed where the data has no responses: RouteLLM's figure for an MMLU answer.
DEFAULT_OUTPUT_TOKENS = 10
# $ per 1M (input, output) tokens: the evaluation doc's prices for the RouteLLM pair; others come from --price.
KNOWN_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4-1106-preview": (10.0, 30.0),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": (0.6, 0.6),
}


class OutcomeDataError(InvalidRequest):
    """Outcome data that cannot be read: the message names the file, the line and the field."""


@dataclass(frozen=True)
class Row:
    prompt: str
    group: str
    outcomes: dict[str, float]
    output_tokens: dict[str, int]


@dataclass(frozen=True)
class OutcomeSet:
    """Rows of two models' outcomes: ``strong`` is the premium model, ``weak`` the cheap one."""

    prompts: tuple[str, ...]
    groups: tuple[str, ...]
    strong_model: str
    weak_model: str
    strong: Floats
    weak: Floats
    input_tokens: Floats
    strong_output_tokens: Floats
    weak_output_tokens: Floats
    digest: str  # sha256 over the files read, in order

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def benchmarks(self) -> tuple[str, ...]:
        return tuple(benchmark_of(g) for g in self.groups)

    def subset(self, mask: Sequence[bool] | np.ndarray) -> OutcomeSet:
        keep = np.asarray(mask, dtype=bool)
        idx = np.flatnonzero(keep)
        return OutcomeSet(
            prompts=tuple(self.prompts[i] for i in idx),
            groups=tuple(self.groups[i] for i in idx),
            strong_model=self.strong_model,
            weak_model=self.weak_model,
            strong=self.strong[keep],
            weak=self.weak[keep],
            input_tokens=self.input_tokens[keep],
            strong_output_tokens=self.strong_output_tokens[keep],
            weak_output_tokens=self.weak_output_tokens[keep],
            digest=self.digest,
        )

    def costs(self, prices: dict[str, tuple[float, float]]) -> tuple[Floats, Floats]:
        """Per-prompt $ of the strong and the weak model at ``prices`` ($ per 1M input, output tokens)."""
        out = []
        for model, output in (
            (self.strong_model, self.strong_output_tokens),
            (self.weak_model, self.weak_output_tokens),
        ):
            if model not in prices:
                raise OutcomeDataError(f"no price for model {model!r}: give --price '{model}=IN/OUT' ($ per 1M)")
            p_in, p_out = prices[model]
            out.append((self.input_tokens * p_in + output * p_out) / 1e6)
        return out[0], out[1]


def benchmark_of(group: str) -> str:
    return group.split("_", 1)[0].split("/", 1)[0]


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".csv", ".jsonl") and p.is_file())
            if not found:
                raise OutcomeDataError(f"{path}: no .csv or .jsonl files in this folder")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise OutcomeDataError(f"{path}: no such file or folder")
    return out


def _quality(value: object, where: str) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "false"):
            return 1.0 if text == "true" else 0.0
        try:
            value = float(text)
        except ValueError:
            raise OutcomeDataError(f"{where}: {value!r} is neither true/false nor a score in [0, 1]") from None
    if isinstance(value, int | float) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise OutcomeDataError(f"{where}: {value!r} is neither true/false nor a score in [0, 1]")


def _csv_rows(path: Path) -> Iterator[Row]:
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "prompt" not in fields:
            raise OutcomeDataError(f"{path}: no 'prompt' column (columns: {', '.join(fields) or 'none'})")
        group_col = next((c for c in GROUP_COLUMNS if c in fields), None)
        models = [c for c in fields if c != "prompt" and c not in GROUP_COLUMNS and not c.endswith(RESPONSE_SUFFIX)]
        for line, rec in enumerate(reader, start=2):
            where = f"{path}: row {line - 1}"
            outcomes = {m: _quality(rec[m], f"{where}, column {m!r}") for m in models}
            tokens = {m: count_text(rec[m + RESPONSE_SUFFIX] or "") for m in models if m + RESPONSE_SUFFIX in fields}
            group = (rec[group_col] or "").strip() if group_col else ""
            yield Row(rec["prompt"] or "", group or path.stem, outcomes, tokens)


def _jsonl_prompt(obj: dict[str, object], where: str) -> str:
    if isinstance(obj.get("prompt"), str):
        return str(obj["prompt"])
    messages = obj.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return "\n".join(str(m["content"]) for m in messages)
    raise OutcomeDataError(f"{where}: needs 'prompt' (a string) or 'messages' (a list of {{role, content}})")


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise OutcomeDataError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("outcomes"), dict) or not obj["outcomes"]:
                raise OutcomeDataError(f"{where}: needs 'outcomes', an object of model -> true/false or score")
            outcomes = {str(m): _quality(v, f"{where}, outcome {m!r}") for m, v in obj["outcomes"].items()}
            raw_tokens = obj.get("output_tokens") or {}
            if not isinstance(raw_tokens, dict) or not all(isinstance(v, int) and v >= 0 for v in raw_tokens.values()):
                raise OutcomeDataError(f"{where}: 'output_tokens' must map models to whole numbers")
            group = obj.get("group")
            yield Row(_jsonl_prompt(obj, where), str(group) if group else path.stem, outcomes, dict(raw_tokens))


def read_rows(paths: Sequence[str | Path]) -> tuple[list[Row], str]:
    """Every row of the files (folders expanded), and a sha256 over the files' bytes."""
    digest = hashlib.sha256()
    rows: list[Row] = []
    for path in expand_paths(paths):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
        reader = _csv_rows if path.suffix == ".csv" else _jsonl_rows if path.suffix == ".jsonl" else None
        if reader is None:
            raise OutcomeDataError(f"{path}: unknown format (expected .csv or .jsonl)")
        try:
            rows.extend(reader(path))
        except UnicodeDecodeError:
            raise OutcomeDataError(f"{path}: not UTF-8 text") from None
    if not rows:
        raise OutcomeDataError("the outcome data holds no rows")
    return rows, digest.hexdigest()


def _pick_pair(rows: list[Row], strong: str | None, weak: str | None) -> tuple[str, str]:
    """(strong, weak): the named ones, the other of two models for one left out, else the better on average."""
    common = set.intersection(*(set(r.outcomes) for r in rows))
    for model in (strong, weak):
        if model is not None and model not in common:
            raise OutcomeDataError(
                f"model {model!r} does not have an outcome on every row "
                f"(every row has: {', '.join(sorted(common)) or 'none'})"
            )
    if strong and weak:
        return strong, weak
    if len(common) != 2:
        raise OutcomeDataError(
            f"every row has outcomes for {len(common)} models ({', '.join(sorted(common)) or 'none'}): "
            "name the pair with --strong and --weak"
        )
    a, b = sorted(common)
    if strong:
        return strong, b if strong == a else a
    if weak:
        return (b if weak == a else a), weak
    mean_a, mean_b = (float(np.mean([r.outcomes[m] for r in rows])) for m in (a, b))
    return (a, b) if mean_a >= mean_b else (b, a)  # the premium model is the better one on average


def load_outcomes(
    paths: Sequence[str | Path],
    *,
    strong: str | None = None,
    weak: str | None = None,
    output_tokens: int = DEFAULT_OUTPUT_TOKENS,
) -> OutcomeSet:
    """Read outcome files into one set for the (strong, weak) pair; the pair is found when there are two models."""
    rows, digest = read_rows(paths)
    strong_model, weak_model = _pick_pair(rows, strong, weak)
    if strong_model == weak_model:
        raise OutcomeDataError("--strong and --weak name the same model")

    def out_tokens(model: str) -> Floats:
        return np.array([r.output_tokens.get(model, output_tokens) for r in rows], dtype=np.float64)

    return OutcomeSet(
        prompts=tuple(r.prompt for r in rows),
        groups=tuple(r.group for r in rows),
        strong_model=strong_model,
        weak_model=weak_model,
        strong=np.array([r.outcomes[strong_model] for r in rows]),
        weak=np.array([r.outcomes[weak_model] for r in rows]),
        input_tokens=np.array([count_text(r.prompt) for r in rows], dtype=np.float64),
        strong_output_tokens=out_tokens(strong_model),
        weak_output_tokens=out_tokens(weak_model),
        digest=digest,
    )
