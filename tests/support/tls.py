"""TLS for tests: a throwaway certificate authority and a server certificate for 127.0.0.1 and localhost,
made with the machine's ``openssl``, and a Redis server of the test's own that speaks only TLS.

Nothing here is trusted by the system: clients must be given ``ca`` (``?ssl_ca_certs=`` for Redis, ``?cafile=``
for AMQP), which is what a deployment with a private CA does. Failures raise ``TlsError``: a test fails, never
skips.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port
from tests.support.processes import stop_all


class TlsError(RuntimeError):
    """openssl or a TLS server of the test's did not do what was asked."""


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it alone must fail verification


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise TlsError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')[-400:]}")


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(cert), cwd=folder)  # fmt: skip
    return key, cert


def make_certificates(folder: Path) -> Certificates:
    ca_key, ca = _ca(folder, "farebox-test-ca")
    _, other_ca = _ca(folder, "farebox-other-ca")
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr),
             cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
             "-extfile", "san.ext", "-out", str(cert), cwd=folder)  # fmt: skip
    key.chmod(0o644)  # RabbitMQ's VM runs as this user but reads the key through its own file server
    return Certificates(ca, cert, key, other_ca)


@contextlib.contextmanager
def certificates() -> Iterator[Certificates]:
    folder = Path(tempfile.mkdtemp(prefix="fb-tls-"))
    try:
        yield make_certificates(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def tls_redis(certs: Certificates) -> Iterator[int]:
    """A redis-server listening on a free port for TLS only (its plain port off), keeping nothing on disk;
    yields the port and always stops it."""
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="fb-tls-redis-"))
    args = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(folder), "--tls-cert-file", str(certs.cert), "--tls-key-file",
            str(certs.key), "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no"]  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = []
    try:
        try:
            with (folder / "redis.log").open("wb") as log:
                processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        except OSError as err:
            raise TlsError(f"cannot start redis-server: {err}") from None
        _await_tls_port(processes[0], port, certs, folder)
        yield port
    finally:
        stop_all(processes)
        shutil.rmtree(folder, ignore_errors=True)


def _await_tls_port(process: subprocess.Popen[bytes], port: int, certs: Certificates, folder: Path) -> None:
    deadline = time.monotonic() + 20
    ping = ["redis-cli", "--tls", "--cacert", str(certs.ca), "-h", "127.0.0.1", "-p", str(port), "PING"]
    while True:
        if process.poll() is not None:
            raise TlsError(f"redis-server with TLS exited: {(folder / 'redis.log').read_text(errors='replace')[-600:]}")
        try:
            done = subprocess.run(ping, capture_output=True, timeout=5, check=False)
        except subprocess.TimeoutExpired:
            done = subprocess.CompletedProcess(ping, 1, b"", b"redis-cli did not answer in 5 s")
        if done.stdout.strip() == b"PONG":
            return
        if time.monotonic() > deadline:
            raise TlsError(f"redis-server with TLS on {port} did not answer: {done.stderr.decode(errors='replace')}")
        time.sleep(0.2)
