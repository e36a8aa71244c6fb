"""The learned router's pieces: features, grouped folds, the ridge and Platt fits, training and the file format."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from farebox.routing.evaluation import apgr, quality_curve
from farebox.routing.features import FEATURES, MAX_CHARS, MAX_COMPARED_OPTIONS, lexical_features
from farebox.routing.learned import (
    BUILTIN,
    RouterFileError,
    load_router,
    router_from_document,
)
from farebox.routing.outcomes import OutcomeDataError, OutcomeSet
from farebox.routing.training import (
    LEVELS,
    NEVER,
    broken_groups,
    fit_platt,
    fit_ridge,
    group_folds,
    train_router,
)
from tests.support.outcomes import outcome_set


def synthetic(n_groups: int = 6, per_group: int = 60, seed: int = 1) -> OutcomeSet:
    """Rows whose gain grows with the prompt's length, in every group alike: a learnable, transferable signal."""
    rng = np.random.default_rng(seed)
    prompts, groups, strong, weak = [], [], [], []
    for g in range(n_groups):
        for _ in range(per_group):
            words = int(rng.integers(3, 120))
            hard = rng.random() < words / 120
            prompts.append(" ".join(["word"] * words) + "?")
            groups.append(f"bench_{g}")
            strong.append(1.0 if hard or rng.random() < 0.9 else 0.0)
            weak.append(0.0 if hard else 1.0)
    return outcome_set(prompts, groups, strong, weak, "0" * 64)


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        ("", "log_chars", 0.0),
        ("abc", "log_chars", np.log1p(3)),
        ("two words", "log_words", np.log1p(2)),
        ("Q?\nA. yes\nB. no", "log_option_chars", np.log1p(2.5)),
        ("no options here", "log_option_chars", 0.0),
        ("Q?\nA. yes\nB. no", "log_question_chars", np.log1p(3)),
        ("a1b2", "digit_share", 2 / 5),
        ("x = y + 1", "math_share", 2 / 10),
        ("ABcd", "upper_share", 2 / 5),
        ("photosynthesis is", "long_word_share", 0.5),
        # the two most alike options: "red apple" and "green apple" share 1 of 3 words; case is ignored
        ("Which?\nA. red apple\nB. Green Apple\nC. a pear", "option_overlap_max", 1 / 3),
        ("Which?\nA. 12 m/s\nB. 12 m/s\nC. 3 m/s", "option_overlap_max", 1.0),  # words and numbers alike
        ("Which?\nA. cat\nB. dog", "option_overlap_max", 0.0),
        ("Which?\nA. (i)\nB. (ii)", "option_overlap_max", 0.0),
        ("Which?\nA. cat\nB. dog\nC. Cat", "option_overlap_max", 1.0),  # the best pair is A and C, not neighbours
        ("Which?\nA. 12 m/s\nB. 13 m/s", "option_overlap_max", 0.5),  # {m, s} of {12, 13, m, s}
        ("Which?\nA. ---\nB. ...", "option_overlap_max", 0.0),  # options without a word say nothing
        ("Which?\nA. ---\nB. a word", "option_overlap_max", 0.0),
        ("Вопрос?\nA. кошка и собака\nB. кошка и мышь\nC. дом", "option_overlap_max", 0.5),  # any script's words
        ("問題?\nA. 東京\nB. 東京\nC. 大阪", "option_overlap_max", 1.0),
        ("प्रश्न?\nA. किताब\nB. कातिब", "option_overlap_max", 0.0),  # Hindi: vowel signs are part of a word
        ("प्रश्न?\nA. लाल किताब\nB. नीली किताब", "option_overlap_max", 1 / 3),
        # An option is one line: "A." with its text on a later line is none, and blank lines before the options
        # belong to the question.
        ("Q?\nA.\n\nfoo\nB.\n\nbar", "log_option_chars", 0.0),
        ("Q?\n\n\nA. x\nB. y", "log_question_chars", np.log1p(5)),
        ("Ερώτηση;\nA. κόκκινο μήλο\nB. πράσινο Μήλο", "option_overlap_max", 1 / 3),  # Greek, case ignored
        ("no options here", "option_overlap_max", 0.0),
        ("Which?\nA. only one", "option_overlap_max", 0.0),
    ],
)
def test_lexical_features_table(text: str, name: str, expected: float) -> None:
    assert lexical_features([text], [name])[0, 0] == pytest.approx(expected)


def _numbered_options(count: int, alike: tuple[int, int]) -> str:
    """``count`` option lines with distinct words, except the two at ``alike`` (1-based), which say the same."""
    words = [f"answer{i}" for i in range(1, count + 1)]
    words[alike[1] - 1] = words[alike[0] - 1]
    return "Which?\n" + "".join(f"{'ABCDEFGHIJ'[i % 10]}. {word}\n" for i, word in enumerate(words))


@pytest.mark.parametrize(
    ("count", "alike", "expected"),
    [(10, (1, 10), 1.0), (12, (1, 10), 1.0), (12, (11, 12), 0.0), (12, (1, 11), 0.0), (300, (299, 300), 0.0)],
)
def test_option_overlap_compares_only_the_first_options(count: int, alike: tuple[int, int], expected: float) -> None:
    # A prompt of a thousand option-like lines costs the route stage 45 pairs, not a million.
    assert MAX_COMPARED_OPTIONS == 10
    text = _numbered_options(count, alike)[:MAX_CHARS]
    assert lexical_features([text], ["option_overlap_max"])[0, 0] == pytest.approx(expected)


def test_features_read_only_the_first_max_chars() -> None:
    long = "a" * (MAX_CHARS * 3)
    assert lexical_features([long], ["log_chars"])[0, 0] == pytest.approx(np.log1p(MAX_CHARS))


def test_group_folds_keep_each_group_on_one_side() -> None:
    groups = ["a"] * 50 + ["b"] * 30 + ["c"] * 30 + ["d"] * 10 + ["e"] * 5
    folds = group_folds(groups, 3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(groups)))
    for test in folds:
        inside = {groups[i] for i in test}
        outside = {groups[i] for i in range(len(groups)) if i not in set(test.tolist())}
        assert not inside & outside
    assert len(group_folds(groups, 10)) == 5  # never more folds than groups


def test_group_folds_need_two_groups() -> None:
    with pytest.raises(OutcomeDataError, match="at least 2 groups"):
        group_folds(["only"] * 10, 5)


def test_ridge_recovers_a_line() -> None:
    x = np.linspace(0, 1, 50)[:, None]
    y = 3 * x[:, 0] + 1
    fit = fit_ridge(x, y, alpha=1e-9)
    assert fit.predict(np.array([[0.5]]))[0] == pytest.approx(2.5, abs=1e-6)


def test_platt_is_increasing_when_the_label_rises_with_the_score() -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=2000)
    label = (rng.random(2000) < 1 / (1 + np.exp(-2 * raw))).astype(float)
    a, b = fit_platt(raw, label)
    assert a == pytest.approx(2.0, rel=0.2)
    assert b == pytest.approx(0.0, abs=0.2)


def test_broken_groups_finds_a_model_below_the_floor() -> None:
    data = synthetic()
    strong = data.strong.copy()
    strong[np.asarray(data.groups) == "bench_2"] = 0.0
    broken = OutcomeSet(**{**data.__dict__, "strong": strong})
    assert broken_groups(broken) == ["bench_2"]
    assert broken_groups(data) == []


def test_training_learns_a_signal_that_transfers_across_groups() -> None:
    trained = train_router(synthetic(), folds=3)
    assert "log_words" in trained.document["features"] or "log_chars" in trained.document["features"]
    data = trained.trained_on
    assert data is not None
    held_out = apgr(quality_curve(trained.oof, data.strong, data.weak))
    by_length = apgr(quality_curve(lexical_features(data.prompts, ["log_words"])[:, 0], data.strong, data.weak))
    # Length is the whole signal here (0.72; the oracle 0.84, random 0.5): the held-out groups get nearly all of it.
    assert held_out > 0.97 * by_length
    short, long = trained.router.score(["word " * 5, "word " * 110])
    assert long > short
    thresholds = trained.document["calibration"]["thresholds"]
    assert trained.document["calibration"]["levels"] == list(LEVELS)
    # A higher level of premium quality never needs a higher threshold (more jobs go to premium).
    assert all(a >= b for a, b in itertools.pairwise(thresholds))
    assert trained.document["training"]["data_sha256"] == "0" * 64


def test_a_router_document_round_trips_through_a_file(tmp_path: Path) -> None:
    trained = train_router(synthetic(), folds=3)
    path = tmp_path / "router.json"
    path.write_text(json.dumps(trained.document))
    loaded = load_router(path)
    texts = ["word " * 7, "word " * 70]
    assert loaded.score(texts) == pytest.approx(trained.router.score(texts))
    assert loaded.threshold(0.95) == trained.router.threshold(0.95)


def test_threshold_takes_the_first_calibrated_level_at_or_above() -> None:
    router = load_router(BUILTIN)
    assert router.threshold(0.945) == router.threshold(0.95)
    assert router.threshold(0.5) == router.thresholds[0]
    assert router.threshold(1.0) == router.thresholds[-1]
    # At 80% of premium quality the cheaper model alone is enough: no score reaches the threshold.
    assert router.thresholds[0] == NEVER


def _broken(doc: dict[str, Any], path: tuple[str, ...], value: object) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("format",), "something-else", "not a farebox router file"),
        (("version",), 99, "format version 99"),
        (("features",), ["no_such_feature"], "unknown features"),
        (("model", "coef"), [1.0], "has 1 values"),
        (("model", "scale"), KeyError, "must be a list"),
        (("model", "mean"), "nope", "must be a list"),
        (("calibration", "levels"), [0.8 + 0.01 * i for i in range(20)] + [0.9], "must increase"),
        (("calibration", "platt"), [1.0, float("nan")], "finite numbers"),
        (("model",), KeyError, "incomplete router file"),
    ],
)
def test_a_bad_router_document_is_refused_in_one_line(path: tuple[str, ...], value: object, message: str) -> None:
    doc = _builtin_document()
    with pytest.raises(RouterFileError, match=message) as err:
        router_from_document(_broken(doc, path, value), "r.json")
    assert "\n" not in str(err.value)


def _builtin_document() -> dict[str, Any]:
    from importlib import resources

    return json.loads(resources.files("farebox.catalog").joinpath("router.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "router file not found"),
        ("{not json", "not JSON"),
        (b"\xff\xfe", "cannot read"),
        ("[]", "not a farebox router file"),
    ],
)
def test_a_bad_router_file_is_refused_in_one_line(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    path = tmp_path / "r.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(RouterFileError, match=message):
        load_router(path)


def test_the_builtin_router_is_small_and_names_its_training_data() -> None:
    router = load_router(BUILTIN)
    assert set(router.features) <= set(FEATURES)
    training = router.meta["training"]
    assert len(training["data_sha256"]) == 64
    assert training["strong_model"] == "gpt-4-1106-preview"
    assert "mmlu_high_school_mathematics" in training["dropped_groups"]
    assert 0.0 <= float(router.score(["What is the capital of France?"])[0]) <= 1.0
