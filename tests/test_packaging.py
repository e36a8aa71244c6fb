"""What installing farebox puts into site-packages, from a wheel built here (no network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """Built from a copy of what the wheel needs (links kept as links), so no build/ or egg-info is
    left in the checkout and no stale build/ of an earlier tree can slip files into the wheel."""
    src = tmp_path_factory.mktemp("src")
    for name in ("farebox", "schemas", "workers", "catalog"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("farebox-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_one_top_level_package(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"farebox"}
    (info,) = [t for t in tops if t.endswith(".dist-info")]
    assert wheel.read(f"{info}/top_level.txt").decode().split() == ["farebox"]


def test_every_module_of_the_tree_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    """Packages are found, not listed: a new subpackage needs no edit anywhere to be installed."""
    source = {
        str(Path(d, f).relative_to(ROOT))
        for d, _, files in os.walk(ROOT / "farebox", followlinks=True)
        for f in files
        if f.endswith(".py")
    }
    assert {"farebox/stages/runtime.py", "farebox/schemas/job.py"} <= source
    assert {n for n in wheel.namelist() if n.endswith(".py")} == source


def test_the_bundled_catalog_is_package_data(wheel: zipfile.ZipFile) -> None:
    for name in ("model_costs.json", "policy.json"):
        shipped = wheel.read(f"farebox/catalog/{name}")
        assert json.loads(shipped) == json.loads((ROOT / "catalog" / name).read_text())


def test_the_settings_find_the_catalog_through_importlib_resources() -> None:
    from importlib.resources import files

    from farebox.settings import Settings

    settings = Settings()
    assert settings.catalog.is_file() and settings.policy.is_file()
    assert settings.catalog.parent == Path(str(files("farebox.catalog")))


def test_the_console_script_is_the_cli(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "farebox = farebox.cli:main" in wheel.read(entry_points).decode()


def test_benchmark_tables_are_not_tracked() -> None:
    """A benchmark run writes bench/results/; that folder must stay out of git."""
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/results/x.md"], cwd=ROOT, check=False)
    assert ignored.returncode == 0
