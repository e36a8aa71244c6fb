"""Pydantic message models: the wire job and result (CONTRACT.md) and the internal envelope."""

from farebox.schemas.envelope import BudgetHold, Envelope, Evaluation, Outcome, RouteDecision
from farebox.schemas.feedback import Feedback, FeedbackReceipt
from farebox.schemas.job import CacheOptions, ChatMessage, Job
from farebox.schemas.result import ErrorInfo, JobResult, RouteInfo, StrategyRef, Usage

__all__ = [
    "BudgetHold",
    "CacheOptions",
    "ChatMessage",
    "Envelope",
    "ErrorInfo",
    "Evaluation",
    "Feedback",
    "FeedbackReceipt",
    "Job",
    "JobResult",
    "Outcome",
    "RouteDecision",
    "RouteInfo",
    "StrategyRef",
    "Usage",
]
