"""Hot reload: a good edit is picked up, a broken one is refused once and the old catalog keeps serving; the
pair served has the policy's fallbacks applied, and each check warning is logged once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from farebox.routing.catalog import CatalogError
from farebox.routing.store import CatalogStore
from tests.support.files import Clock, write

POLICY = {"baseline_model": "openai/a"}


def catalog_doc(price: float) -> dict[str, object]:
    # One high-tier model serves every quality ("or better").
    return {"openai": {"a": {"input_cost_per_1k_tokens": price, "output_cost_per_1k_tokens": price, "tier": "high"}}}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    cat, pol = tmp_path / "model_costs.json", tmp_path / "policy.json"
    write(cat, catalog_doc(0.001), 0)
    write(pol, POLICY, 0)
    return cat, pol


def price(store: CatalogStore) -> float:
    catalog, _ = store.current()
    model = catalog.get("openai/a")
    assert model is not None
    return model.input_cost_per_1k


def test_reload_and_broken_file(files: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    cat, _ = files
    clock = Clock()
    store = CatalogStore(*files, check_interval_s=2.0, clock=clock)
    assert price(store) == 0.001

    write(cat, catalog_doc(0.002), 1)
    assert price(store) == 0.001  # not checked before the interval has passed
    clock.now += 2.0
    assert price(store) == 0.002 and store.reloads == 1

    caplog.set_level(logging.INFO, logger="farebox.catalog")
    caplog.clear()
    write(cat, {"openai": {"a": {"input_cost_per_1k_tokens": "free"}}}, 2)
    for _ in range(5):  # many checks of the same broken file
        clock.now += 2.0
        assert price(store) == 0.002  # the old catalog keeps serving
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert (
        "model 'openai/a'" in errors[0].getMessage() and "still serving the previous version" in errors[0].getMessage()
    )
    assert store.last_error is not None

    write(cat, catalog_doc(0.003), 3)  # fixed
    clock.now += 2.0
    assert price(store) == 0.003 and store.last_error is None


def test_policy_inconsistent_with_catalog_is_refused(files: tuple[Path, Path]) -> None:
    _, pol = files
    clock = Clock()
    store = CatalogStore(*files, clock=clock)
    # A user tier capped at low, and no low model: every one of its jobs would go to the default model.
    write(pol, {**POLICY, "user_tiers": {"free": {"max_tier": "low"}}}, 1)
    clock.now += 5
    _, policy = store.current()
    assert policy.user_tiers == {}
    assert "user tier free (max_tier low): no model of tier low" in (store.last_error or "")


def test_absent_default_model_falls_back_and_is_logged_once(
    files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cat, pol = files
    caplog.set_level(logging.INFO, logger="farebox.catalog")
    clock = Clock()
    store = CatalogStore(*files, clock=clock)
    assert store.current()[1].default_model is None
    write(pol, {**POLICY, "default_model": "openai/gpt-4o-mini"}, 1)  # an edit that needs the fallback
    clock.now += 5
    assert store.current()[1].default_model == "openai/a"
    for bump in (2, 3):  # reloads that keep the same fallback say nothing new
        write(cat, catalog_doc(0.001 * bump), bump)
        clock.now += 5
        assert price(store) == 0.001 * bump and store.current()[1].default_model == "openai/a"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == [
        f"catalog check: {pol}: field 'default_model': model 'openai/gpt-4o-mini' is not in the catalog {cat}; "
        "using 'openai/a', the cheapest eligible model, instead"
    ]


def test_deleted_file_keeps_serving(files: tuple[Path, Path]) -> None:
    cat, _ = files
    clock = Clock()
    store = CatalogStore(*files, clock=clock)
    cat.unlink()
    clock.now += 5
    assert price(store) == 0.001
    assert "cannot read" in (store.last_error or "")


def test_first_load_must_succeed(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(CatalogError):
        CatalogStore(tmp_path / "missing.json", tmp_path / "p.json")
