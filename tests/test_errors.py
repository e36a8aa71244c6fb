"""describe_validation_error: one line per rejected job, by field, never echoing the input (it may be prompt text)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from farebox.errors import describe_validation_error
from farebox.schemas import Job

SECRET = "secret-prompt-text-4111"


@pytest.mark.parametrize(
    ("data", "limit", "expected"),
    [
        ({"prompt": SECRET, "qualty": "high"}, 5, "qualty: Extra inputs are not permitted"),
        ({"prompt": SECRET, "quality": SECRET}, 5, "quality: Input should be 'low', 'medium' or 'high'"),
        (
            {"prompt": SECRET, "temperature": SECRET},
            5,
            "temperature: Input should be a valid number, unable to parse string as a number",
        ),
        ({"prompt": SECRET, "max_tokens": 0}, 5, "max_tokens: Input should be greater than or equal to 1"),
        (SECRET, 5, "body: Input should be a valid dictionary or instance of Job"),  # no field: the whole body
        ({}, 5, "body: Value error, give exactly one of 'prompt' or 'messages'"),
        (
            {"prompt": SECRET, "a": 1, "b": 2, "c": 3},
            2,
            "a: Extra inputs are not permitted; b: Extra inputs are not permitted; and 1 more",
        ),
        (
            {"prompt": SECRET, "a": 1, "b": 2},
            2,
            "a: Extra inputs are not permitted; b: Extra inputs are not permitted",
        ),
    ],
)
def test_describe_validation_error(data: Any, limit: int, expected: str) -> None:
    with pytest.raises(ValidationError) as exc_info:
        Job.model_validate(data)
    text = describe_validation_error(exc_info.value, limit=limit)
    assert text == expected
    assert SECRET not in text
