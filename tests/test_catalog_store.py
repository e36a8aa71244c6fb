"""Hot reload: a good edit is picked up, a broken one is refused once and the old catalog keeps serving."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from farebox.routing.catalog import CatalogError
from farebox.routing.store import CatalogStore

POLICY = {"baseline_model": "openai/a"}


def catalog_doc(price: float) -> dict[str, object]:
    return {"openai": {"a": {"input_cost_per_1k_tokens": price, "output_cost_per_1k_tokens": price, "tier": "low"}}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, data: object, bump: int) -> None:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    # Make the change visible even on filesystems with coarse mtimes.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


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


def test_policy_inconsistent_with_catalog_is_refused(
    files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, pol = files
    clock = Clock()
    store = CatalogStore(*files, clock=clock)
    write(pol, {"baseline_model": "openai/missing"}, 1)
    clock.now += 5
    _, policy = store.current()
    assert policy.baseline_model == "openai/a"
    assert "baseline_model" in (store.last_error or "")


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
