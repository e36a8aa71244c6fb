"""The peer of the LiteLLM comparison (bench/litellm_peer.py): installed by the harness itself and
run on loopback.

LiteLLM goes into a virtual environment of its own (bench/.litellm-venv), pinned to one exact
release. Releases 1.82.7 and 1.82.8 carried malware and those before 1.83.7 have a known
remote-code-execution hole, so the pin is checked against that floor. The malicious releases ran
code at every interpreter start through `litellm_init.pth`: before the venv's Python ever runs, and
again after the install, the environment is searched for it (and any other code-running .pth) and
the harness refuses, removing the venv, if one is there. Wheels only, so no build script runs. The
proxy listens on 127.0.0.1 only, with a random master key.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from common import ROOT, port_is_free

from farebox.settings import Settings

LITELLM_VERSION = "1.106.12"  # newest release whose [proxy] extra resolves from PyPI on 2026-11-27
SAFE_FLOOR = (1, 83, 7)
KNOWN_MALICIOUS = {"1.82.7", "1.82.8"}
VENV = ROOT / "bench" / ".litellm-venv"
PROXY_PORT = 4017
MASTER_KEY = "sk-" + secrets.token_hex(24)  # a fresh random key per harness run
MODEL = "gpt-4o-mini"  # what every LiteLLM request asks for; farebox routes by its policy instead


# --- installing the peer ---------------------------------------------------------------------------------------
def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(part) for part in v.split(".")[:3])


KNOWN_PTH = {"distutils-precedence.pth"}  # setuptools' own, in every virtual environment


def _code_running_pth(venv_dir: Path) -> list[Path]:
    """.pth files that would run code at every start of the venv's Python (lines beginning with
    `import` are executed by site.py), other than setuptools' own; litellm_init.pth in any case."""
    found = []
    for pth in venv_dir.glob("lib/python*/site-packages/*.pth"):
        lines = pth.read_text(errors="replace").splitlines()
        if pth.name == "litellm_init.pth" or (
            pth.name not in KNOWN_PTH and any(line.startswith(("import ", "import\t")) for line in lines)
        ):
            found.append(pth)
    return found


def _refuse_if_planted(venv_dir: Path) -> None:
    planted = _code_running_pth(venv_dir)
    if planted:
        shutil.rmtree(venv_dir)
        raise SystemExit(
            f"refusing to run: {', '.join(map(str, planted))} would run code at every start of the "
            f"venv's Python (litellm_init.pth was the 1.82.7/1.82.8 malware's hook); {venv_dir} removed"
        )


def installed_version(venv_dir: Path) -> str | None:
    """Read from the dist-info, so no interpreter of the venv runs before the .pth check."""
    for meta in venv_dir.glob("lib/python*/site-packages/litellm-*.dist-info/METADATA"):
        for line in meta.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def ensure_litellm_venv(venv_dir: Path, version: str, extras: str = "") -> Path:
    """The Python of ``venv_dir`` with ``litellm[extras]==version`` installed from wheels and checked: the
    release floor and known malicious releases refused, code-running .pth files searched for before the venv's
    Python first runs and after the install (SystemExit, the venv removed, when one is there)."""
    if version in KNOWN_MALICIOUS or _version_tuple(version) < SAFE_FLOOR:
        raise SystemExit(f"refusing litellm=={version}: older than 1.83.7 or a known malicious release")
    if venv_dir.exists():
        _refuse_if_planted(venv_dir)  # before any of the venv's own Python runs
    python = venv_dir / "bin" / "python"
    if not python.exists():
        venv.create(venv_dir, with_pip=True)
    requirement = f"litellm{extras}=={version}"
    if installed_version(venv_dir) != version:
        print(f"installing {requirement} into {venv_dir} ...", file=sys.stderr)
        # Wheels only: no package's build script runs during the install.
        subprocess.run([python, "-m", "pip", "install", "-q", "--only-binary=:all:", requirement], check=True)
    _refuse_if_planted(venv_dir)
    return python


def ensure_litellm() -> Path:
    ensure_litellm_venv(VENV, LITELLM_VERSION, "[proxy]")
    return VENV / "bin" / "litellm"


@contextlib.contextmanager
def litellm_proxy(exe: Path, emulator: str, *, cache_namespace: str | None, workers: int) -> Iterator[tuple[str, int]]:
    """The proxy on 127.0.0.1 with one model served by the emulator; yields (url, pid)."""
    if not port_is_free(PROXY_PORT):
        raise SystemExit(f"port {PROXY_PORT} is taken (a stale proxy?); free it before benchmarking")
    with tempfile.TemporaryDirectory(prefix="fbbench-litellm-") as tmp:
        settings: dict[str, Any] = {"telemetry": False}
        if cache_namespace:
            redis = urlsplit(Settings().redis_url)  # the Redis farebox uses, so both sides share one server
            settings.update(
                cache=True,
                cache_params={
                    "type": "redis",
                    "host": redis.hostname or "127.0.0.1",
                    "port": redis.port or 6379,
                    "namespace": cache_namespace,
                },
            )
        config = {
            "model_list": [
                {
                    "model_name": MODEL,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": f"{emulator}/openai/v1",
                        "api_key": "sk-emulator",
                    },
                }
            ],
            "litellm_settings": settings,
        }
        (Path(tmp) / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": tmp,
            "LITELLM_MASTER_KEY": MASTER_KEY,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        with open(Path(tmp) / "proxy.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    exe,
                    "--config",
                    "config.yaml",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(PROXY_PORT),
                    "--num_workers",
                    str(workers),
                ],
                cwd=tmp,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            url = f"http://127.0.0.1:{PROXY_PORT}"
            try:
                _wait_until_up(url, proc, Path(tmp) / "proxy.log")
                yield url, proc.pid
            finally:
                _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the proxy's process group (uvicorn workers included), SIGKILL what is left after 30 s,
    so no stale proxy keeps the port for the next run."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the LiteLLM proxy exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            # An authenticated call: only the proxy we started knows this run's key.
            if (
                httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=2).status_code
                == 200
            ):
                return
        time.sleep(0.5)
    raise SystemExit(f"the LiteLLM proxy did not answer in 180 s:\n{log.read_text()[-3000:]}")


async def drop_litellm_keys(namespace: str) -> None:
    from redis.asyncio import Redis

    async with Redis.from_url(Settings().redis_url) as redis:
        async for key in redis.scan_iter(match=f"{namespace}*", count=1000):
            await redis.delete(key)
