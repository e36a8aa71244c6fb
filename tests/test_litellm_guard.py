"""The LiteLLM benchmark's install guard (bench/litellm_proxy.py): a `.pth` that would run code at
every start of the peer's Python (litellm_init.pth, the 1.82.7/1.82.8 malware's hook, or any other
with an import line) makes it refuse and remove the environment; setuptools' own and plain path
entries pass; the version comes from the dist-info without running the venv's interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import litellm_proxy


@pytest.fixture
def venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "venv"
    site = root / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (site / "distutils-precedence.pth").write_text("import os; var = 'SETUPTOOLS_USE_DISTUTILS'\n")
    (site / "plain.pth").write_text("/some/extra/path\n")
    monkeypatch.setattr(litellm_proxy, "VENV", root)
    return site


def test_a_clean_environment_passes(venv: Path) -> None:
    litellm_proxy._refuse_if_planted(litellm_proxy.VENV)
    assert venv.exists()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("litellm_init.pth", "/harmless/looking/path\n"),
        ("evil.pth", "import base64; exec(base64.b64decode('cHJpbnQoMSk='))\n"),
    ],
)
def test_a_code_running_pth_is_refused_and_the_environment_removed(venv: Path, name: str, text: str) -> None:
    (venv / name).write_text(text)
    with pytest.raises(SystemExit, match=name):
        litellm_proxy._refuse_if_planted(litellm_proxy.VENV)
    assert not litellm_proxy.VENV.exists()


def test_version_is_read_from_the_dist_info(venv: Path) -> None:
    assert litellm_proxy.installed_version(litellm_proxy.VENV) is None
    meta = venv / "litellm-1.106.12.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: litellm\nVersion: 1.106.12\n")
    assert litellm_proxy.installed_version(litellm_proxy.VENV) == "1.106.12"


@pytest.mark.parametrize("pin", ["1.82.7", "1.82.8", "1.83.6", "1.70.0"])
def test_unsafe_pins_are_refused(pin: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(litellm_proxy, "LITELLM_VERSION", pin)
    monkeypatch.setattr(litellm_proxy, "VENV", tmp_path / "never-created")
    with pytest.raises(SystemExit, match="refusing"):
        litellm_proxy.ensure_litellm()
    assert not (tmp_path / "never-created").exists()
