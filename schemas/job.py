"""The job a producer publishes to ``farebox.jobs`` (wire schema version 1)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError, PydanticSerializationError, to_json

Role = Literal["system", "user", "assistant"]
Task = Literal["summarize", "classify", "extract", "reason", "code", "generate", "explain", "chat"]
Quality = Literal["low", "medium", "high"]
CacheMode = Literal["use", "bypass", "refresh"]
Priority = Literal["interactive", "background"]  # the lane a job runs in (farebox/routing/priority.py)
# sync: the providers' synchronous APIs; batch: their Batch APIs, about half price, answers within hours.
PriceLane = Literal["sync", "batch"]

MAX_MESSAGES = 1000
MAX_CACHE_TTL_S = 30 * 86_400
# metadata rides along in every message and the result of its job, so it is capped: as compact JSON (what the
# messages carry), in bytes.
MAX_METADATA_BYTES = 4096


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str


class CacheOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: CacheMode = "use"
    ttl_s: int | None = Field(None, ge=0, le=MAX_CACHE_TTL_S)


# No "/": a job's records are "<tenant>/<job_id>" (constants.job_record), and a job_id may hold one.
TENANT_PATTERN = r"^[A-Za-z0-9_.@-]+$"


class Job(BaseModel):
    """A prompt job. Unknown fields are refused, so a typo (``qualty``) is an error, not a default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    job_id: str | None = Field(None, min_length=1, max_length=200)
    tenant: str = Field("default", min_length=1, max_length=64, pattern=TENANT_PATTERN)
    messages: tuple[ChatMessage, ...] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    prompt: str | None = Field(None, min_length=1)
    task: Task | None = None
    quality: Quality = "medium"
    model: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.:@/-]+$", max_length=200)
    user_tier: str | None = Field(None, max_length=64)
    # Who the job is for (a user id, a session): experiments keep one subject in one arm. Never logged.
    subject: str | None = Field(None, min_length=1, max_length=200)
    # interactive: someone waits, served ahead of background work; unset: the policy's priority decides.
    priority: Priority | None = None
    # batch: the job may wait hours for the Batch APIs' discount; sync forces the synchronous lane; unset: the
    # policy's batch defaults decide (farebox/routing/batch_lane.py).
    lane: PriceLane | None = None
    max_tokens: int = Field(256, ge=1, le=1_000_000)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    cache: CacheOptions = CacheOptions()
    deadline_s: float | None = Field(None, gt=0, le=7 * 86_400)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Sizes and the limit only: metadata may hold anything, and these messages reach dead-letter reasons.
        try:
            size = len(to_json(v))
        except PydanticSerializationError:
            raise PydanticCustomError(
                "metadata_not_json", "metadata must serialize as JSON (too deeply nested, or a non-JSON value)"
            ) from None
        if size > MAX_METADATA_BYTES:
            raise PydanticCustomError(
                "metadata_too_large",
                "metadata is {size} bytes as compact JSON; the limit is {limit} bytes",
                {"size": size, "limit": MAX_METADATA_BYTES},
            )
        return v

    @model_validator(mode="after")
    def _one_of_prompt_or_messages(self) -> Job:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    @property
    def chat(self) -> tuple[ChatMessage, ...]:
        """The conversation, with ``prompt`` read as one user message."""
        if self.messages is not None:
            return self.messages
        assert self.prompt is not None
        return (ChatMessage(role="user", content=self.prompt),)
