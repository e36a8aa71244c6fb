"""`farebox policy push`: the policy and catalog published to Redis as numbered versions, and workers with
FAREBOX_CONFIG_SOURCE=redis following them (farebox/stages/config_sync.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from farebox.cli import main as cli_main
from farebox.routing.catalog import CatalogError
from farebox.routing.store import CatalogStore
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.config_sync import (
    CATALOG_FILE,
    POLICY_FILE,
    VERSIONS_KEPT,
    Bundle,
    ConfigSourceError,
    ConfigSync,
    bundle_of,
    push,
)
from tests.support.pipeline import InProcessPipeline
from tests.test_route_learned import LEARNED, model, router_doc

BUNDLED_POLICY = json.loads((CATALOG_DIR / "policy.json").read_text())


def policy_for(tenant_allows: list[str]) -> dict[str, Any]:
    return {**BUNDLED_POLICY, "tenants": {"acme": {"allow": tenant_allows}}}


@pytest.fixture
def learned_unit(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "models").mkdir()
    catalog, policy = tmp_path / "model_costs.json", tmp_path / "policy.json"
    catalog.write_text(json.dumps({"openai": {"lo": model(0.0001, "low"), "hi": model(0.01, "high")}}))
    policy.write_text(json.dumps({"baseline_model": "openai/hi", "router": {**LEARNED, "path": "models/r.json"}}))
    (tmp_path / "models" / "r.json").write_text(json.dumps(router_doc()))
    return catalog, policy


def test_a_bundle_carries_the_policy_its_catalog_and_its_router_files(learned_unit: tuple[Path, Path]) -> None:
    catalog, policy = learned_unit
    bundle, warnings = bundle_of(policy, catalog)
    assert warnings == []
    assert sorted(bundle.files) == ["model_costs.json", "models/r.json", "policy.json"]
    assert bundle.files["models/r.json"] == (policy.parent / "models" / "r.json").read_bytes()
    assert bundle.sha256 == bundle_of(policy, catalog)[0].sha256
    assert bundle.sha256 != Bundle({**bundle.files, "policy.json": b"{}"}).sha256


@pytest.mark.parametrize(
    ("router_path", "says"),
    [
        ("missing.json", "missing.json"),  # the check a worker makes: the file must load
        ("../r.json", "outside the policy's folder"),
        ("ABSOLUTE", "absolute path"),
    ],
)
def test_a_bundle_a_worker_could_not_use_is_refused(
    learned_unit: tuple[Path, Path], tmp_path: Path, router_path: str, says: str
) -> None:
    catalog, policy = learned_unit
    if router_path == "ABSOLUTE":
        router_path = str(tmp_path / "models" / "r.json")
    if router_path == "../r.json":
        (tmp_path.parent / "r.json").write_text(json.dumps(router_doc()))
    policy.write_text(json.dumps({"baseline_model": "openai/hi", "router": {**LEARNED, "path": router_path}}))
    with pytest.raises(CatalogError, match=says):
        bundle_of(policy, catalog)


def test_push_refuses_a_bad_policy_in_one_line_and_publishes_nothing(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env(monkeypatch, settings)
    bad = tmp_path / "policy.json"
    bad.write_text(json.dumps({**BUNDLED_POLICY, "tenants": {"acme": {"alow": ["openai/*"]}}}))
    assert cli_main(["policy", "push", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alow" in err[0], err
    assert cli_main(["policy", "show"]) == 1  # nothing was published


def test_push_warns_of_what_a_worker_would_replace(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env(monkeypatch, settings)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({**BUNDLED_POLICY, "default_model": "openai/no-such-model"}))
    assert cli_main(["policy", "push", str(path)]) == 0  # a worker serves it, with the fallback model
    assert "warning" in capsys.readouterr().err and "no-such-model" in path.read_text()


def test_push_numbers_versions_and_show_reads_the_newest(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env(monkeypatch, settings)
    path = tmp_path / "policy.json"
    for allow in (["openai/*"], ["anthropic/*"]):
        path.write_text(json.dumps(policy_for(allow)))
        assert cli_main(["policy", "push", str(path)]) == 0
    out = capsys.readouterr().out
    assert "policy version 1 published" in out and "policy version 2 published" in out
    assert cli_main(["policy", "show", "-o", str(tmp_path / "got")]) == 0
    assert "policy version 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "got" / POLICY_FILE).read_text())["tenants"]["acme"]["allow"] == ["anthropic/*"]


async def test_only_the_newest_versions_are_kept(settings: Settings, redis: Redis) -> None:
    bundle = Bundle({POLICY_FILE: b"{}", CATALOG_FILE: b"{}"})
    for _ in range(VERSIONS_KEPT + 2):
        version = await push(redis, settings.keys, bundle, source="test")
    assert version == VERSIONS_KEPT + 2
    assert not await redis.exists(settings.keys.config_bundle(2))
    assert await redis.exists(settings.keys.config_bundle(3))


async def test_a_worker_follows_each_version_and_keeps_serving_through_a_bad_one(
    settings: Settings, redis: Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigSourceError, match="no policy is published"):
        await ConfigSync.start(redis, settings.keys)
    good = tmp_path / "policy.json"
    catalog = CATALOG_DIR / "model_costs.json"
    good.write_text(json.dumps(policy_for(["openai/*"])))
    await push(redis, settings.keys, bundle_of(good, catalog)[0], source="test")
    sync = await ConfigSync.start(redis, settings.keys)
    try:
        store = CatalogStore(*sync.paths, check_interval_s=0)
        assert allowed(store) == ("openai/*",)
        good.write_text(json.dumps(policy_for(["anthropic/*"])))
        await push(redis, settings.keys, bundle_of(good, catalog)[0], source="test")
        assert await sync.fetch() and sync.version == 2
        assert allowed(store) == ("anthropic/*",)
        # A version that skipped the push's check (an older farebox, a hand edit): refused, v2 serves on.
        broken = Bundle({POLICY_FILE: b'{"tenants": {"acme": {"alow": []}}}', CATALOG_FILE: catalog.read_bytes()})
        await push(redis, settings.keys, broken, source="test")
        caplog.set_level(logging.ERROR, logger="farebox.catalog")
        assert await sync.fetch() and sync.version == 3
        assert allowed(store) == ("anthropic/*",)
        assert store.last_error is not None and "alow" in store.last_error
        assert sum("reload refused" in r.getMessage() for r in caplog.records) == 1
        allowed(store)
        assert sum("reload refused" in r.getMessage() for r in caplog.records) == 1  # one line, not one per check
    finally:
        sync.close()
    assert not sync.folder.exists()


async def test_the_pipeline_routes_by_the_pushed_policy_and_takes_a_new_version_within_seconds(
    settings: Settings, redis: Redis, emulator: str, tmp_path: Path
) -> None:
    path = tmp_path / "policy.json"
    catalog = CATALOG_DIR / "model_costs.json"
    path.write_text(json.dumps(policy_for(["anthropic/*"])))
    await push(redis, settings.keys, bundle_of(path, catalog)[0], source="test")
    s = settings.model_copy(update={"config_source": "redis", "emulator_url": emulator})
    p = InProcessPipeline(s)
    try:
        await p.start()
        async with p.client() as client:
            first = await client.complete({"prompt": "Summarize: pushed policy one.", "tenant": "acme"}, timeout=30)
            assert first.provider == "anthropic", first
            path.write_text(json.dumps(policy_for(["google/*"])))
            await push(redis, settings.keys, bundle_of(path, catalog)[0], source="test")
            for attempt in range(40):  # the sync polls every 2 s, the reload checks every 2 s
                later = await client.complete({"prompt": f"Summarize: policy two, {attempt}.", "tenant": "acme"})
                if later.provider == "google":
                    break
                await asyncio.sleep(0.25)
            assert later.provider == "google"
    finally:
        await p.close()


def allowed(store: CatalogStore) -> tuple[str, ...]:
    return tuple(store.current()[1].tenants["acme"].allow or ())


def env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("FAREBOX_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("FAREBOX_REDIS_PREFIX", settings.redis_prefix)
    monkeypatch.setenv("FAREBOX_NAMESPACE", settings.namespace)
    # The CLI points the root logger at this test's captured stderr, which closes with the test.
    monkeypatch.setattr("farebox.cli.setup_logging", lambda *args, **kwargs: None)


async def test_an_unchanged_version_costs_the_poll_one_get_and_a_bad_name_is_refused(
    settings: Settings, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = CATALOG_DIR / "model_costs.json"
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy_for(["openai/*"])))
    await push(redis, settings.keys, bundle_of(path, catalog)[0], source="test")
    sync = await ConfigSync.start(redis, settings.keys)
    try:
        fetched: list[str] = []
        real = redis.hgetall
        monkeypatch.setattr(redis, "hgetall", lambda key: fetched.append(key) or real(key))
        for _ in range(3):
            assert await sync.fetch()
        assert fetched == []  # the bundle is read only when the number changes
        evil = Bundle({POLICY_FILE: path.read_bytes(), CATALOG_FILE: catalog.read_bytes(), "../../evil": b"x"})
        await push(redis, settings.keys, evil, source="test")
        assert await sync.fetch() and sync.version == 1  # refused: version 1 serves on
        assert await sync.fetch() and len(fetched) == 1  # and not read again
        assert not (sync.folder.parent / "evil").exists()
    finally:
        sync.close()
