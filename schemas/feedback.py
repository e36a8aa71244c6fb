"""Quality feedback on a finished job, published to ``farebox.feedback`` (schema version 1), and its receipt."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from farebox.schemas.result import ErrorInfo

Score = Annotated[float, Field(ge=0.0, le=1.0)] | Literal["good", "bad"]
SOURCE_PATTERN = r"^[A-Za-z0-9_.:-]+$"


class Feedback(BaseModel):
    """How good a job's answer was. One per job and ``source``: a later one from the same source replaces it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    job_id: str = Field(min_length=1, max_length=200)
    tenant: str = Field("default", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    score: Score  # in [0, 1], or "good" (1) / "bad" (0)
    label: str | None = Field(None, max_length=10_000)  # e.g. the correct answer
    source: str = Field("user", min_length=1, max_length=64, pattern=SOURCE_PATTERN)
    # The provider/model whose answer the score compares with, when a grader scored agreement (shadow grading).
    reference: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.:@/-]+$", max_length=200)

    @property
    def value(self) -> float:
        if self.score == "good":
            return 1.0
        if self.score == "bad":
            return 0.0
        return float(self.score)


class FeedbackReceipt(BaseModel):
    """Sent to the feedback message's ``reply_to`` (when it has one): recorded, or why not."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: Literal["feedback"] = "feedback"
    job_id: str
    status: Literal["ok", "error"]
    source: str | None = None
    replaced: bool = False  # an earlier score from the same source was replaced
    error: ErrorInfo | None = None
