"""The emulator's knobs, read from ``FAREBOX_EMULATOR_*`` so ``farebox up`` can pass them on."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class EmulatorKnobs(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAREBOX_EMULATOR_", frozen=True, extra="ignore")

    port: int = Field(8099, ge=0, le=65535)  # 0 = any free port (tests)
    host: str = "127.0.0.1"
    latency_ms: float = Field(0.0, ge=0.0)
    fail_rate: float = Field(0.0, ge=0.0, le=1.0)
    rate_limit_rate: float = Field(0.0, ge=0.0, le=1.0)
    timeout_rate: float = Field(0.0, ge=0.0, le=1.0)
    malformed_rate: float = Field(0.0, ge=0.0, le=1.0)
    truncated_rate: float = Field(0.0, ge=0.0, le=1.0)
    faulty: str = ""
    outcomes: str = ""  # JSONL of labelled prompts answered right or wrong per model (emulator/outcomes.py)
    seed: int | None = None
    retry_after_s: float = Field(1.0, ge=0.0)
    # How long a "timeout" request hangs: far beyond any sane client timeout, yet finite so a
    # forgotten emulator cannot pin memory forever.
    hang_s: float = Field(3600.0, gt=0.0)
    # Batch APIs (emulator/batches.py): a batch ends this long after it is created, by the clock,
    # however often it is polled; the real providers' 24 hours compressed to a test's patience.
    batch_delay_s: float = Field(3.0, ge=0.0)
    batch_fail_rate: float = Field(0.0, ge=0.0, le=1.0)  # share of batches that fail as a whole
    batch_expire_rate: float = Field(0.0, ge=0.0, le=1.0)  # share that expire with half their requests done
    batch_error_line_rate: float = Field(0.0, ge=0.0, le=1.0)  # share of batch requests answered with a 500

    @model_validator(mode="after")
    def _rates_fit(self) -> EmulatorKnobs:
        # One draw picks at most one fault, so the shares must fit in a single unit interval.
        if self.fault_total > 1.0 + 1e-9:
            raise ValueError("the fault rates add up to more than 1")
        if self.batch_fail_rate + self.batch_expire_rate > 1.0 + 1e-9:  # one draw per batch, likewise
            raise ValueError("batch_fail_rate and batch_expire_rate add up to more than 1")
        return self

    @property
    def fault_total(self) -> float:
        return self.fail_rate + self.rate_limit_rate + self.timeout_rate + self.malformed_rate + self.truncated_rate

    @property
    def faulty_providers(self) -> frozenset[str]:
        """Providers the fault rates apply to; empty means every provider."""
        return frozenset(p.strip().lower() for p in self.faulty.split(",") if p.strip())

    def faults_apply_to(self, provider: str) -> bool:
        chosen = self.faulty_providers
        return not chosen or provider.lower() in chosen
