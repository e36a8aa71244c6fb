"""`farebox router train|score` and `farebox eval` (farebox/cli/router.py, farebox/cli/evaluate.py).

``router score`` is a contract outside evaluation tools call, so its line protocol is tested through a real
process: order, error lines, empty input, interactive use (one line, wait for its answer) and a bad router.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from farebox.cli import main
from farebox.cli.evaluate import HELD_OUT, IN_SAMPLE, MAYBE_IN_SAMPLE, sample_check
from farebox.routing.learned import load_router, router_from_document
from farebox.routing.outcomes import load_outcomes
from farebox.settings import CATALOG_DIR

REPO = Path(__file__).resolve().parents[1]
WORDS = "quantum ledger harbour violin glacier mosaic lantern orbit canyon meadow prism falcon".split()
PRICES = ["--price", "strong-m=10/30", "--price", "weak-m=1/1"]


def short_prompt(i: int) -> str:
    return f"What is {WORDS[i % len(WORDS)]}?"


def long_prompt(i: int) -> str:
    clause = f"the {WORDS[i % len(WORDS)]} and the {WORDS[(i + 3) % len(WORDS)]} interact under constraint {i}"
    return "Consider carefully, with every step shown, how " + ", then how ".join([clause] * (3 + i % 5)) + "."


def write_fixture(
    path: Path, groups: tuple[str, ...] = ("quiz_alpha", "quiz_beta", "quiz_gamma", "quiz_delta")
) -> Path:
    """Per group 12 rows: short prompts both models get right, long ones only the strong model does."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["prompt", "weak-m", "strong-m", "group"])
        n = 0
        for group in groups:
            for i in range(12):
                n += 1
                if i % 2:
                    out.writerow([long_prompt(n), "False", "True", group])
                else:
                    out.writerow([short_prompt(n), "True", "True", group])
    return path


def oracle_document() -> dict[str, Any]:
    """A hand-made router scoring by length: on the fixture, that is the oracle."""
    return {
        "format": "farebox-router",
        "version": 1,
        "features": ["log_chars"],
        "model": {"kind": "ridge-on-gain", "mean": [0.0], "scale": [1.0], "coef": [1.0], "intercept": [-4.0]},
        "calibration": {"platt": [1.0, 0.0], "levels": [1.0], "thresholds": [0.5]},
    }


def farebox(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "farebox", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


# ---- router train -------------------------------------------------------------------------------------------


def test_train_writes_a_small_honest_router_and_score_ranks_long_prompts_higher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_fixture(tmp_path / "quiz.csv")
    out = tmp_path / "router.json"
    assert main(["router", "train", str(data), "-o", str(out), "--folds", "4", *PRICES]) == 0
    printed = capsys.readouterr().out
    assert "nested grouped 4-fold cross-validation by group" in printed
    for word in ("APGR", "CPT(50%)", "CPT(80%)", "saving at 95%", "features chosen", "training time", "bytes"):
        assert word in printed

    router = load_router(out)  # loads: the format checks pass
    assert out.stat().st_size < 10_000
    doc = json.loads(out.read_text())
    assert doc["training"]["data_sha256"] == load_outcomes([data]).digest
    assert doc["training"]["rows"] == 48 and doc["training"]["groups"] == 4
    assert doc["training"]["group_names"] == ["quiz_alpha", "quiz_beta", "quiz_delta", "quiz_gamma"]
    thresholds = doc["calibration"]["thresholds"]
    assert len(thresholds) == len(doc["calibration"]["levels"])
    assert all(a >= b for a, b in itertools.pairwise(thresholds))  # more quality: lower bar

    shorts = [short_prompt(i) for i in range(100, 105)]
    longs = [long_prompt(i) for i in range(100, 105)]
    lines = [json.dumps({"id": i, "prompt": p}) for i, p in enumerate(shorts + longs)]
    proc = farebox("router", "score", "--router", str(out), stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [g["id"] for g in got] == list(range(10))
    scores = [g["score"] for g in got]
    assert min(scores[5:]) > max(scores[:5])
    assert scores == pytest.approx(router.score(shorts + longs).tolist())

    # Its own training data is in-sample, and `farebox eval` says so.
    assert main(["eval", str(data), "--router", str(out), "--bootstrap", "0", *PRICES]) == 0
    assert "these figures are in-sample" in capsys.readouterr().out


def test_train_refuses_one_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_fixture(tmp_path / "one.csv", groups=("quiz_only",))
    assert main(["router", "train", str(data), "-o", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("farebox: error invalid_request: grouped cross-validation needs at least 2 groups")
    assert not (tmp_path / "r.json").exists()


def test_train_bad_data_names_the_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,a,b\nq,True,False\nq2,perhaps,True\n")
    assert main(["router", "train", str(bad), "-o", str(tmp_path / "r.json")]) == 2
    assert f"{bad}: row 2, column 'a'" in capsys.readouterr().err


# ---- router score: the line protocol -----------------------------------------------------------------------


def test_score_order_errors_and_blank_lines() -> None:
    lines = [
        json.dumps({"id": "a", "prompt": "What is the capital of France?"}),
        "",
        "this is not json",
        json.dumps({"id": 7, "messages": [{"role": "user", "content": "Prove that sqrt(2) is irrational."}]}),
        json.dumps({"id": "no-text"}),
        json.dumps({"id": "bad-type", "prompt": 42}),
        json.dumps({"id": "bad-msgs", "messages": [{"role": "user"}]}),
        json.dumps({"id": "both", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}),
        json.dumps(["not", "an", "object"]),
        "   ",
        json.dumps({"id": None, "prompt": "last one, without a newline"}),
    ]
    proc = farebox("router", "score", "--router", "builtin", stdin="\n".join(lines))
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [g["id"] for g in got] == ["a", None, 7, "no-text", "bad-type", "bad-msgs", "both", None, None]
    ok = [got[i] for i in (0, 2, 8)]
    assert all(set(g) == {"id", "score"} and 0.0 <= g["score"] <= 1.0 for g in ok)
    for i in (1, 3, 4, 5, 6, 7):
        assert set(got[i]) == {"id", "error"}
        assert got[i]["error"]["code"] == "invalid_request" and got[i]["error"]["message"]
    assert got[1]["error"]["message"].startswith("line 3: not JSON")


def test_score_empty_input() -> None:
    proc = farebox("router", "score", "--router", "builtin", stdin="")
    assert (proc.returncode, proc.stdout) == (0, "")
    proc = farebox("router", "score", "--router", "builtin", stdin="\n\n")
    assert (proc.returncode, proc.stdout) == (0, "")


def test_score_interactive_one_line_at_a_time() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "farebox", "router", "score", "--router", "builtin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with ThreadPoolExecutor(1) as pool:
            for i in range(3):
                proc.stdin.write(json.dumps({"id": i, "prompt": f"question number {i}?"}) + "\n")
                proc.stdin.flush()
                # The answer must come before the next line is written: a batching deadlock fails here.
                answer = json.loads(pool.submit(proc.stdout.readline).result(timeout=30))
                assert answer["id"] == i and 0.0 <= answer["score"] <= 1.0
            proc.stdin.write("{broken\n")
            proc.stdin.flush()
            assert "error" in json.loads(pool.submit(proc.stdout.readline).result(timeout=30))
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_score_defaults_to_the_policys_router(tmp_path: Path) -> None:
    (tmp_path / "oracle.json").write_text(json.dumps(oracle_document()))
    policy = json.loads((CATALOG_DIR / "policy.json").read_text())
    levels = {"low": 0.85, "medium": 0.95, "high": 1.0}
    policy["router"] = {"kind": "learned", "path": "oracle.json", "levels": levels}  # relative to the policy
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    env = {**os.environ, "FAREBOX_POLICY": str(tmp_path / "policy.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "farebox", "router", "score"],
        input=json.dumps({"id": 1, "prompt": "abc"}) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    expected = 1 / (1 + math.exp(-(math.log1p(3) - 4.0)))  # the oracle file's score for 3 characters
    assert json.loads(proc.stdout)["score"] == pytest.approx(expected)


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"format": "something-else"})])
def test_score_unusable_router_file_one_line_exit_2(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "router.json"
    if content is not None:
        path.write_text(content)
    proc = farebox("router", "score", "--router", str(path), stdin=json.dumps({"id": 1, "prompt": "x"}) + "\n")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("farebox: error invalid_request: ") and str(path) in proc.stderr


# ---- eval -----------------------------------------------------------------------------------------------------


def test_eval_json_oracle_beats_random(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_fixture(tmp_path / "quiz.csv")
    oracle = tmp_path / "oracle.json"
    oracle.write_text(json.dumps(oracle_document()))
    argv = ["eval", str(data), "--router", str(oracle), "--baseline", "random", "--baseline", "rules"]
    assert main([*argv, "--json", "--bootstrap", "30", *PRICES]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["data"]["rows"] == 48 and doc["data"]["sha256"] == load_outcomes([data]).digest
    assert doc["bootstrap"] == {"rounds": 30, "seed": 0, "level": 0.95}
    assert set(doc["benchmarks"]) == {"quiz", "all"}
    assert doc["benchmarks"]["quiz"]["q_strong"] == 1.0 and doc["benchmarks"]["quiz"]["q_weak"] == 0.5
    by_name = {r["name"]: r for r in doc["routers"]}
    assert list(by_name) == [str(oracle), "random", "rules"]
    for r in doc["routers"]:
        for bench in ("quiz", "all"):
            figs = r["figures"][bench]
            assert set(figs) == {"apgr", "cpt50", "cpt80", "saving95", "saving100"}
            assert set(figs["apgr"]) == {"value", "low", "high"}
    best, coin = by_name[str(oracle)]["figures"]["all"], by_name["random"]["figures"]["all"]
    # The oracle sends the 24 long prompts first: PGR reaches 1 at x = .5 and stays: APGR = .25 + .5 = .75.
    assert best["apgr"]["value"] == pytest.approx(0.75)
    assert coin["apgr"]["value"] == pytest.approx(0.5)
    assert best["cpt50"]["value"] == pytest.approx(0.25) and coin["cpt50"]["value"] == pytest.approx(0.5)
    assert best["saving95"]["value"] > coin["saving95"]["value"]
    assert best["apgr"]["low"] > coin["apgr"]["high"]
    # A hand-made file says nothing of its training data: overlap cannot be ruled out, and that is said.
    assert by_name[str(oracle)]["sample"] == MAYBE_IN_SAMPLE
    assert doc["warnings"] and "possibly in-sample" in captured.err
    assert by_name["rules"]["kind"] == "baseline" and "decision-only" in by_name["rules"]["note"]


def test_eval_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_fixture(tmp_path / "quiz.csv")
    oracle = tmp_path / "oracle.json"
    oracle.write_text(json.dumps(oracle_document()))
    png = tmp_path / "curves.png"
    assert main(["eval", str(data), "--router", str(oracle), "--baseline", "random", "--plot", str(png), *PRICES]) == 0
    out = capsys.readouterr().out
    assert "APGR" in out and "saving at 100%" in out and "random" in out and "0.750" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_plot_without_matplotlib(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    data = write_fixture(tmp_path / "quiz.csv")
    assert main(["eval", str(data), "--plot", str(tmp_path / "x.png"), *PRICES]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_eval_needs_prices_for_unknown_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_fixture(tmp_path / "quiz.csv")
    assert main(["eval", str(data), "--baseline", "random"]) == 2
    assert "no price for model 'strong-m'" in capsys.readouterr().err


def test_sample_check(tmp_path: Path) -> None:
    data = load_outcomes([write_fixture(tmp_path / "quiz.csv")])

    def router(training: dict[str, Any] | None) -> Any:
        doc = oracle_document() | ({"training": training} if training is not None else {})
        return router_from_document(doc, "test")

    assert sample_check(router(None), data)[0] == MAYBE_IN_SAMPLE
    assert sample_check(router({"data_sha256": data.digest}), data)[0] == IN_SAMPLE
    assert sample_check(router({"group_names": ["quiz_alpha", "other"]}), data)[0] == IN_SAMPLE
    # Groups left out of training (dropped) do not count as seen.
    held = {"group_names": ["other", "quiz_beta"], "dropped_groups": ["quiz_beta"]}
    assert sample_check(router(held), data)[0] == HELD_OUT
    assert sample_check(router({"benchmarks": ["quiz"]}), data)[0] == MAYBE_IN_SAMPLE
    assert sample_check(router({"benchmarks": ["mmlu"]}), data)[0] == HELD_OUT
    assert np.isfinite(router(None).score(["x"])).all()
