"""llmd-scheduler's gRPC over TLS: a client that trusts the certificate is served, a plaintext
client is not, and a rotated certificate is picked up without a restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmd.vllm_cpu.server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def make_cert(directory: Path, name: str) -> bytes:
    """A self-signed certificate for localhost/127.0.0.1 in `directory` (tls.crt, tls.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt.read_bytes()


def health(target: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        return int(reply.status)


def test_tls_serves_trusted_clients_and_follows_rotation(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    ca1 = make_cert(tmp_path, "one")
    certs.mkdir()
    (certs / "tls.crt").write_bytes((tmp_path / "one.crt").read_bytes())
    (certs / "tls.key").write_bytes((tmp_path / "one.key").read_bytes())
    pool = tmp_path / "pool.yaml"
    pool.write_text("endpoints: []\n")
    grpc_port, metrics = free_port(), free_port()
    log = tmp_path / "scheduler.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmd.scheduler.cli", "--host", "127.0.0.1",
             "--endpoints-file", str(pool), "--grpc-port", str(grpc_port),
             "--grpc-health-port", "0", "--metrics-port", str(metrics),
             "--secure-serving", "--cert-path", str(certs), "--drain-timeout", "1s"],
            stdout=out, stderr=out, env=dict(os.environ),
        )  # fmt: skip
    target = f"localhost:{grpc_port}"
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                status = health(target, grpc.ssl_channel_credentials(ca1))
                break
            except grpc.RpcError:
                time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING, log.read_text()
        with pytest.raises(grpc.RpcError):
            health(f"127.0.0.1:{grpc_port}", None)  # plaintext is not served
        ca2 = make_cert(tmp_path, "two")  # rotation: a new key and certificate
        (certs / "tls.key").write_bytes((tmp_path / "two.key").read_bytes())
        (certs / "tls.crt").write_bytes(ca2)
        assert health(target, grpc.ssl_channel_credentials(ca2)) == (
            health_pb2.HealthCheckResponse.SERVING
        )
        with pytest.raises(grpc.RpcError):
            health(target, grpc.ssl_channel_credentials(ca1))  # the old one is gone
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0, log.read_text()


def test_secure_serving_without_certificates_is_a_config_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llmd.scheduler.cli", "--secure-serving", "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "secure_serving needs cert_path" in done.stderr
