"""Faults a test injects into a stage core."""

from __future__ import annotations

import pytest


def crash_route_on_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the route stage raise (a bug, not a farebox error) for every job of tenant "poison"."""
    import farebox.stages.route as route_module

    real = route_module.choose_route

    def crash_on_poison(job, *args, **kwargs):  # type: ignore[no-untyped-def]
        if job.tenant == "poison":
            raise RuntimeError("simulated bug")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(route_module, "choose_route", crash_on_poison)
