"""The emulator's outcomes knob over real HTTP on loopback: labelled prompts answered right or
wrong per provider/model, as an outcomes file says."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from farebox.cli.emulator import add_commands, knobs_from_args, run_command
from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.outcomes import load_outcomes, normalise, wrong_answer
from farebox.emulator.server import running
from farebox.errors import InvalidRequest
from farebox.tokens import count_text

MATH = "What is 2+2?"
CAPITAL = "Name the capital of France."
LINES: list[dict[str, Any]] = [
    {"prompt": MATH, "label": "4", "correct": {"openai/gpt-4o-mini": False, "anthropic/*": False}},
    {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": CAPITAL}],
        "label": "Paris",
        # First match wins: gpt-4o is right although "openai/*" below says wrong.
        "correct": {"openai/gpt-4o": True, "openai/*": False, "*": True},
    },
    {"prompt": "Say yes.", "label": "yes"},  # no "correct": every model is right
]


def write(tmp_path: Path, lines: list[Any], name: str = "outcomes.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@contextlib.asynccontextmanager
async def emulator(outcomes: Path | None, **knobs: Any) -> AsyncIterator[httpx.AsyncClient]:
    if outcomes is not None:
        knobs["outcomes"] = str(outcomes)
    async with running(EmulatorKnobs(port=0, **knobs)) as url, httpx.AsyncClient(base_url=url) as client:
        yield client


async def openai(
    client: httpx.AsyncClient, model: str, messages: list[dict[str, str]], provider: str = "openai"
) -> Any:
    r = await client.post(
        f"/{provider}/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 40}
    )
    assert r.status_code == 200, r.text
    return r.json()


async def openai_text(client: httpx.AsyncClient, model: str, prompt: str, provider: str = "openai") -> str:
    body = await openai(client, model, [{"role": "user", "content": prompt}], provider)
    return str(body["choices"][0]["message"]["content"])


async def anthropic_text(client: httpx.AsyncClient, model: str, prompt: str, system: str | None = None) -> str:
    body: dict[str, Any] = {"model": model, "max_tokens": 40, "messages": [{"role": "user", "content": prompt}]}
    if system is not None:
        body["system"] = system
    r = await client.post("/anthropic/v1/messages", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["content"][0]["text"])


async def gemini_text(client: httpx.AsyncClient, model: str, prompt: str) -> str:
    body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
    r = await client.post(f"/google/v1beta/models/{model}:generateContent", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["candidates"][0]["content"]["parts"][0]["text"])


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    data: dict[str, Any] = (await client.get("/_emulator/stats")).json()
    return data


async def test_right_and_wrong_per_model_over_three_wire_formats(tmp_path: Path) -> None:
    async with emulator(write(tmp_path, LINES)) as client:
        right_openai = await openai_text(client, "gpt-4o", MATH)
        wrong_openai = await openai_text(client, "gpt-4o-mini", MATH)
        wrong_anthropic = await anthropic_text(client, "claude-3-5-haiku-latest", MATH)
        right_gemini = await gemini_text(client, "gemini-2.0-flash", MATH)
        # The provider is the path's first segment: "vllm/gpt-4o-mini" matches no pattern.
        right_vllm = await openai_text(client, "gpt-4o-mini", MATH, provider="vllm")
        again = await openai_text(client, "gpt-4o-mini", MATH)
        seen = await stats(client)
    assert right_openai == right_gemini == right_vllm == "4"
    assert wrong_openai == wrong_anthropic == again  # deterministic
    assert normalise(wrong_openai) != normalise("4") and "4" not in wrong_openai.split()
    assert seen["outcomes"] == {"right": 3, "wrong": 3, "unmatched": 0}


async def test_first_matching_pattern_wins_and_messages_lines_match(tmp_path: Path) -> None:
    system_user = [{"role": "system", "content": "be brief"}, {"role": "user", "content": CAPITAL}]
    async with emulator(write(tmp_path, LINES)) as client:
        gpt4o = await openai(client, "gpt-4o", system_user)
        mini = await openai(client, "gpt-4o-mini", system_user)
        # Anthropic sends the system prompt apart from the messages; the joined text is the same.
        claude = await anthropic_text(client, "claude-3-5-haiku-latest", CAPITAL, system="be brief")
        # Whitespace around the whole text does not matter; one message alone is another prompt.
        padded = await openai_text(client, "gpt-4o", f"  be brief\n{CAPITAL}\n")
        alone = await openai_text(client, "gpt-4o", CAPITAL)
        seen = await stats(client)
    assert gpt4o["choices"][0]["message"]["content"] == "Paris"
    assert gpt4o["usage"]["completion_tokens"] == count_text("Paris")
    assert gpt4o["choices"][0]["finish_reason"] == "stop"
    assert mini["choices"][0]["message"]["content"] == wrong_answer("Paris")
    assert mini["usage"]["completion_tokens"] == count_text(wrong_answer("Paris"))
    assert claude == padded == "Paris"
    assert alone not in {"Paris", wrong_answer("Paris")}
    assert seen["outcomes"] == {"right": 3, "wrong": 1, "unmatched": 1}


async def test_unmatched_prompts_answer_as_usual_and_reset_zeroes_counts(tmp_path: Path) -> None:
    async with emulator(None) as client:
        plain = await openai_text(client, "gpt-4o", "Tell me a story.")
        plain_stats = await stats(client)
    async with emulator(write(tmp_path, LINES)) as client:
        unmatched = await openai_text(client, "gpt-4o", "Tell me a story.")
        yes = await openai_text(client, "gpt-4o-mini", "Say yes.")
        before = await stats(client)
        await client.post("/_emulator/reset")
        after = await stats(client)
    assert unmatched == plain and unmatched.startswith("Emulated answer from gpt-4o")
    assert "outcomes" not in plain_stats
    assert yes == "yes"
    assert before["outcomes"] == {"right": 1, "wrong": 0, "unmatched": 1}
    assert before["requests"] == {"openai/gpt-4o": 1, "openai/gpt-4o-mini": 1}
    assert after["outcomes"] == {"right": 0, "wrong": 0, "unmatched": 0}


async def test_faults_still_come_first(tmp_path: Path) -> None:
    async with emulator(write(tmp_path, LINES), fail_rate=1.0) as client:
        r = await client.post(
            "/openai/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": MATH}]}
        )
        seen = await stats(client)
    assert r.status_code == 500
    assert seen["faults"] == {"fail": 1} and seen["outcomes"] == {"right": 0, "wrong": 0, "unmatched": 0}


@pytest.mark.parametrize(
    "label",
    ["4", "Paris", "(wrong) answer", "WRONG answer!", " a ", "b", wrong_answer("x"), "(Wrong) Answer " + "0" * 10],
)
def test_wrong_answer_never_equals_the_label(label: str) -> None:
    wrong = wrong_answer(label)
    assert wrong == wrong_answer(label) and normalise(wrong) != normalise(label)


@pytest.mark.parametrize(
    ("lines", "where", "what"),
    [
        ([LINES[0], "{not json"], "line 2", "not valid JSON"),
        ([LINES[0], "", {"prompt": "x"}], "line 3", "'label' is required"),
        ([{"prompt": "x", "label": ""}], "line 1", "'label' is required"),
        ([{"prompt": "x", "label": 4}], "line 1", "'label' is required"),
        ([{"prompt": "x", "label": "y", "correct": {"*": "yes"}}], "line 1", "'correct' must be an object"),
        ([{"prompt": "x", "label": "y", "correct": ["*"]}], "line 1", "'correct' must be an object"),
        ([{"label": "y"}], "line 1", "exactly one of 'prompt'"),
        ([{"prompt": "x", "messages": [], "label": "y"}], "line 1", "exactly one of 'prompt'"),
        ([{"messages": [{"role": "user"}], "label": "y"}], "line 1", "messages[0]"),
        ([[1, 2]], "line 1", "not a JSON object"),
    ],
)
def test_bad_files_name_the_line(tmp_path: Path, lines: list[Any], where: str, what: str) -> None:
    path = write(tmp_path, lines)
    with pytest.raises(InvalidRequest) as caught:
        load_outcomes(str(path))
    message = str(caught.value)
    assert message.startswith(f"outcomes file {path} {where}: ") and what in message and "\n" not in message


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"outcomes file .*nope\.jsonl: cannot read it: No such file"):
        load_outcomes(str(tmp_path / "nope.jsonl"))
    with pytest.raises(InvalidRequest, match="no labelled prompts"):
        load_outcomes(str(write(tmp_path, [""])))


def test_flag_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("FAREBOX_EMULATOR_OUTCOMES", "/from/env.jsonl")
    assert knobs_from_args(parser.parse_args(["emulator"])).outcomes == "/from/env.jsonl"
    args = parser.parse_args(["emulator", "--outcomes", "/from/flag.jsonl"])
    assert knobs_from_args(args).outcomes == "/from/flag.jsonl"


def test_command_refuses_a_bad_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    path = write(tmp_path, [LINES[0], {"prompt": "x", "label": "y", "correct": {"*": 1}}])
    args = parser.parse_args(["emulator", "--port", "0", "--outcomes", str(path)])
    assert run_command(args, None) == 2
    err = capsys.readouterr().err
    assert err == f"farebox emulator: outcomes file {path} line 2: {json_correct_message()}\n"


def json_correct_message() -> str:
    return "'correct' must be an object of \"provider/model pattern\": true or false"
