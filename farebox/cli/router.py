"""``farebox router train|score``, registered by farebox/cli/__init__.py.

``router train`` fits a learned router on outcome data (farebox/routing/training.py) and prints its nested
grouped cross-validation figures; ``router score`` is the line protocol outside evaluation tools call (a
contract: see ``cmd_score``). Bad data raises a FareboxError: ``farebox: error <code>: <msg>``, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from farebox.errors import InvalidRequest
from farebox.routing.evaluation import Figures, Floats, figures
from farebox.routing.learned import BUILTIN, LearnedRouter, load_router, prompt_text
from farebox.routing.outcomes import DEFAULT_OUTPUT_TOKENS, KNOWN_PRICES, OutcomeDataError, OutcomeSet, load_outcomes
from farebox.settings import Settings

SCORE_BATCH = 256  # most lines scored in one call; a batch is whatever stdin had ready, up to this
READ_CHUNK = 1 << 16


# ---- shared with farebox/cli/evaluate.py ---------------------------------------------------------------


def parse_price(text: str) -> tuple[str, tuple[float, float]]:
    """``MODEL=IN/OUT`` ($ per 1M input / output tokens) -> (model, (in, out))."""
    model, sep, prices = text.rpartition("=")
    p_in, slash, p_out = prices.partition("/")
    try:
        pair = (float(p_in), float(p_out))
    except ValueError:
        pair = (-1.0, -1.0)
    if not sep or not model or not slash or min(pair) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL=IN/OUT in $ per 1M tokens, e.g. 'gpt-4o=2.5/10'")
    return model, pair


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", metavar="DATA", help="outcome files (.csv, .jsonl) or folders of them")
    p.add_argument("--strong", metavar="MODEL", help="the premium model (default: the better of two on average)")
    p.add_argument("--weak", metavar="MODEL", help="the cheap model (default: the other one)")
    p.add_argument(
        "--output-tokens",
        type=int,
        default=DEFAULT_OUTPUT_TOKENS,
        metavar="N",
        help=f"output tokens per answer where the data has no responses (default {DEFAULT_OUTPUT_TOKENS})",
    )
    p.add_argument(
        "--price",
        type=parse_price,
        action="append",
        default=[],
        metavar="MODEL=IN/OUT",
        help="$ per 1M input/output tokens of a model (known: " + ", ".join(KNOWN_PRICES) + ")",
    )


def load_data(args: argparse.Namespace) -> OutcomeSet:
    if args.output_tokens < 0:
        raise OutcomeDataError("--output-tokens must be at least 0")
    return load_outcomes(args.data, strong=args.strong, weak=args.weak, output_tokens=args.output_tokens)


def prices_of(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    return {**KNOWN_PRICES, **dict(args.price)}


def pct(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{round(100 * value, 1) + 0.0:.1f}%"


def num(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{round(value, 3) + 0.0:.3f}"


def benchmark_masks(data: OutcomeSet) -> list[tuple[str, np.ndarray]]:
    """(name, row mask) per benchmark, then ``all`` (every row) when there is more than one."""
    names = np.asarray(data.benchmarks)
    out = [(b, names == b) for b in sorted(set(data.benchmarks))]
    if len(out) > 1:
        out.append(("all", np.ones(len(data), dtype=bool)))
    return out


# ---- router train ----------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.routing.training import train_router

    if args.folds < 2:
        raise OutcomeDataError("--folds must be at least 2")
    data = load_data(args)
    started = time.perf_counter()
    try:
        trained = train_router(data, folds=args.folds, source=str(args.output))
    except ImportError as err:  # scikit-learn, an optional dependency, is missing: say what to install
        raise InvalidRequest(str(err)) from None
    elapsed = time.perf_counter() - started
    text = json.dumps(trained.document, indent=1) + "\n"
    out = Path(args.output)
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"{out}: cannot write the router file: {exc.strerror or exc}") from None

    rows = trained.trained_on if trained.trained_on is not None else data
    try:
        cost_strong, cost_weak = rows.costs(prices_of(args))
        costs: tuple[Floats, Floats] | None = (cost_strong, cost_weak)
        no_price = ""
    except OutcomeDataError as exc:
        costs, no_price = None, str(exc)
    console = Console(width=140)
    console.print(_cv_table(trained.oof, rows, costs))
    groups = np.asarray(rows.groups)
    for bench, mask in benchmark_masks(rows):
        n_groups = len(set(groups[mask]))
        if bench != "all" and n_groups == 1:
            console.print(
                f"note: {bench} is one group, so its rows were scored by routers trained without any {bench} "
                f"row: {bench} with a router trained without {bench}.",
                markup=False,
            )
    training = trained.document["training"]
    dropped = trained.dropped_groups
    console.print(
        "\n".join(
            [
                f"figures: nested grouped {args.folds}-fold cross-validation by group (rows of one group never on "
                "both sides; features chosen again inside each fold), over every row given",
                f"rows {len(rows):,}, groups {len(set(rows.groups))}, benchmarks {', '.join(training['benchmarks'])}; "
                f"strong {rows.strong_model}, weak {rows.weak_model}",
                f"dropped groups (a model below {training['min_group_quality']} mean quality: graded wrongly; "
                f"scored, not trained on): {', '.join(dropped) if dropped else 'none'}",
                f"features chosen for the open model (prompts without options, read on their question), a ridge: "
                f"{', '.join(trained.document['features'])}",
                "its features per outer fold: " + "; ".join(", ".join(f) for f in trained.selected_per_fold),
                _choice_line(trained.document),
                f"training time {elapsed:.1f} s; wrote {out} ({len(text.encode()):,} bytes), "
                f"data sha256 {data.digest[:16]}",
            ]
        ),
        markup=False,
    )
    if no_price:
        console.print(f"no savings: {no_price}", markup=False)
    return 0


def _choice_line(document: dict[str, Any]) -> str:
    from farebox.routing.training import MIN_CHOICE_ROWS

    rows = document["training"].get("choice_rows", 0)
    section = document.get("choice_model")
    if section is None:
        return f"choice model: none ({rows:,} multiple-choice rows; it needs {MIN_CHOICE_ROWS:,} in 2 groups)"
    return (
        f"choice model (prompts with options): {len(section['value'])} boosted trees of depth {section['depth']} "
        f"over {len(section['features'])} features, fitted on {rows:,} multiple-choice rows"
    )


def _cv_table(oof: Floats, data: OutcomeSet, costs: tuple[Floats, Floats] | None) -> Table:
    table = Table(title="grouped cross-validation (out-of-fold scores)")
    for col in ("benchmark", "rows", "groups", "APGR", "CPT(50%)", "CPT(80%)", "saving at 95%"):
        table.add_column(col, justify="left" if col == "benchmark" else "right")
    groups = np.asarray(data.groups)
    for bench, mask in benchmark_masks(data):
        cs, cw = costs if costs is not None else (np.ones(len(data)), np.ones(len(data)))
        f: Figures = figures(oof[mask], data.strong[mask], data.weak[mask], cs[mask], cw[mask])
        table.add_row(
            bench,
            f"{int(mask.sum()):,}",
            str(len(set(groups[mask]))),
            num(f.apgr),
            pct(f.cpt50),
            pct(f.cpt80),
            pct(f.saving95) if costs is not None else "-",
        )
    return table


# ---- router score ----------------------------------------------------------------------------------------


def default_router(settings: Settings) -> str | Path:
    """The policy's learned router when it names one, else the builtin one."""
    from farebox.routing.policy import load_policy, router_location

    where = router_location(load_policy(settings.policy), settings.policy)
    return BUILTIN if where is None else where


def _batches(stream: IO[bytes]) -> Iterator[list[bytes]]:
    """Complete lines as they arrive: each batch is what one read gave (never waits for more than one line)."""
    pending = bytearray()
    read1 = getattr(stream, "read1", stream.read)
    while True:
        chunk = read1(READ_CHUNK)
        if not chunk:
            if pending:
                yield [bytes(pending)]
            return
        pending += chunk
        end = pending.rfind(b"\n")
        if end < 0:
            continue
        lines = bytes(pending[:end]).split(b"\n")
        del pending[: end + 1]
        for i in range(0, len(lines), SCORE_BATCH):
            yield lines[i : i + SCORE_BATCH]


def parse_request(raw: bytes, line_no: int) -> tuple[Any, str | None, str | None]:
    """(id, text to score, None) or (id, None, error message) for one input line."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        return None, None, f"line {line_no}: not JSON ({reason})"
    if not isinstance(obj, dict):
        return None, None, f'line {line_no}: expected an object {{"id": ..., "prompt": "..."}}'
    ident = obj.get("id")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is not None and messages is not None:
        return ident, None, f"line {line_no}: give one of 'prompt' or 'messages', not both"
    if prompt is not None:
        if not isinstance(prompt, str):
            return ident, None, f"line {line_no}: 'prompt' must be a string"
        return ident, prompt, None
    if messages is not None:
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                for m in messages
            )
        ):
            return ident, None, f"line {line_no}: 'messages' must be a non-empty list of {{role, content}} strings"
        return ident, prompt_text([m["content"] for m in messages]), None
    return ident, None, f"line {line_no}: needs 'prompt' (a string) or 'messages' (a list of {{role, content}})"


def serve_scores(router: LearnedRouter, stream: IO[bytes], out: IO[str]) -> int:
    """One output line per non-blank input line, in order, flushed after every batch; returns lines answered."""
    line_no = answered = 0
    for batch in _batches(stream):
        replies: list[dict[str, Any]] = []
        texts: list[str] = []
        slots: list[int] = []
        for raw in batch:
            line_no += 1
            if not raw.strip():
                continue
            ident, text, error = parse_request(raw, line_no)
            if error is not None:
                replies.append({"id": ident, "error": {"code": "invalid_request", "message": error}})
            else:
                assert text is not None
                replies.append({"id": ident, "score": None})
                texts.append(text)
                slots.append(len(replies) - 1)
        if texts:
            for slot, score in zip(slots, router.score(texts), strict=True):
                replies[slot]["score"] = float(score)
        if replies:
            out.write("".join(json.dumps(r) + "\n" for r in replies))
            out.flush()
            answered += len(replies)
    return answered


def cmd_score(args: argparse.Namespace, settings: Settings) -> int:
    """The line protocol (a contract; outside evaluation tools call it): on stdin JSON lines
    ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [{"role": ..., "content": ...}, ...]}``; on
    stdout one line per input line, in order: ``{"id": ..., "score": P}`` (P = P(needs premium) in [0, 1]) or
    ``{"id": <id or null>, "error": {"code": "invalid_request", "message": ...}}``. Blank lines are skipped;
    answers are flushed as soon as the lines read so far are scored, so a caller may write one line and
    wait for its answer. Exit 0 at end of input; a router file that cannot be used: one line on stderr, exit 2."""
    router = load_router(args.router if args.router else default_router(settings))
    try:
        serve_scores(router, sys.stdin.buffer, sys.stdout)
    except BrokenPipeError:
        # The reader went away: nothing left to tell it. Point stdout at nothing so the exit flush is quiet.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def add_commands(subparsers: Any) -> None:
    grp = subparsers.add_parser("router", help="train a learned router on outcome data, score prompts with one")
    sub = grp.add_subparsers(dest="router_command", required=True)

    p = sub.add_parser(
        "train",
        help="fit a router on outcome data and print its nested grouped cross-validation figures",
        description="Fit a learned router (JSON, no pickle) on outcome data: per prompt, whether each model "
        "answered well. Prints honest figures: nested cross-validation grouped by subject/source.",
    )
    add_data_arguments(p)
    p.add_argument("-o", "--output", required=True, metavar="ROUTER", help="where to write the router file")
    p.add_argument("--folds", type=int, default=7, help="outer grouped cross-validation folds (default 7)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "score",
        help="JSON lines {id, prompt|messages} on stdin -> {id, score} on stdout",
        description=cmd_score.__doc__,
    )
    p.add_argument(
        "--router",
        metavar="ROUTER",
        help='router file, or "builtin" (default: the policy\'s learned router, else the builtin one)',
    )
    p.set_defaults(func=cmd_score)
