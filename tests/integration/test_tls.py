"""llmd-scheduler's gRPC over TLS: a client that trusts the certificate is served, a plaintext
client is not, a rotated certificate is picked up without a restart, and the generated Envoy
config reaches the scheduler over mutual TLS."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from llmd.dev.gateway import Gateway, GatewayTLS
from llmd.dev.sim_engines import SimFleetProcess
from llmd.indexer.app import IndexerApp, IndexerConfig
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


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca_pair(directory: Path, name: str, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    """A key and a certificate for localhost/127.0.0.1 signed by `ca`."""
    key, csr, crt = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(csr))  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(crt))  # fmt: skip
    return crt, key


def test_envoy_reaches_the_scheduler_over_mutual_tls(tmp_path: Path) -> None:
    """The generated Envoy config speaks TLS to the scheduler with a client certificate: requests
    are routed, the scheduler serves no plaintext and no client without a certificate."""
    ca, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=llmd-test-ca", "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    server_crt, server_key = make_ca_pair(tmp_path, "scheduler", ca, ca_key)
    client_crt, client_key = make_ca_pair(tmp_path, "envoy", ca, ca_key)
    certs = tmp_path / "scheduler-certs"
    certs.mkdir()
    for src, dst in ((server_crt, "tls.crt"), (server_key, "tls.key"), (ca, "ca.crt")):
        (certs / dst).write_bytes(src.read_bytes())
    fleet = SimFleetProcess.start(count=1, block_size=16, profile="instant", work=tmp_path)
    try:
        tls = GatewayTLS(certs, ca, client_cert=client_crt, client_key=client_key)
        gw = Gateway.start(Path(fleet.endpoints_file), tmp_path / "gw", tls=tls)
        try:
            r = httpx.post(
                gw.url + "/v1/completions",
                json={"model": "tiny", "prompt": "hello", "max_tokens": 2},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            assert r.headers.get("x-gateway-destination-endpoint") is None  # never echoed
            stats = gw.envoy.stats("cluster.llmd_scheduler.ssl")
            assert stats.get("cluster.llmd_scheduler.ssl.handshake", 0) >= 1, stats
            target = f"localhost:{gw.scheduler.grpc_port}"
            with pytest.raises(grpc.RpcError):
                health(target, None)  # plaintext is refused
            with pytest.raises(grpc.RpcError):
                health(target, grpc.ssl_channel_credentials(ca.read_bytes()))  # no client cert
            mutual = grpc.ssl_channel_credentials(
                ca.read_bytes(), client_key.read_bytes(), client_crt.read_bytes()
            )
            assert health(target, mutual) == health_pb2.HealthCheckResponse.SERVING
        finally:
            gw.stop()
    finally:
        fleet.stop()


def test_the_indexer_serves_grpc_over_tls(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    crt = make_cert(tmp_path, "indexer")
    certs.mkdir()
    (certs / "tls.crt").write_bytes(crt)
    (certs / "tls.key").write_bytes((tmp_path / "indexer.key").read_bytes())
    with pytest.raises(ValidationError, match="secure_serving needs cert_path"):
        IndexerConfig(secure_serving=True)

    async def run() -> None:
        with socket.socket() as s1, socket.socket() as s2:
            for s in (s1, s2):
                s.bind(("127.0.0.1", 0))
            http, grpc_port = (s.getsockname()[1] for s in (s1, s2))
        app = IndexerApp(
            IndexerConfig(host="127.0.0.1", http_port=http, grpc_port=grpc_port, write_port=0,
                          secure_serving=True, cert_path=str(certs))
        )  # fmt: skip
        await app.start()
        try:
            target = f"localhost:{grpc_port}"
            ok = await asyncio.to_thread(health, target, grpc.ssl_channel_credentials(crt))
            assert ok == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError):
                await asyncio.to_thread(health, target, None)  # plaintext is refused
        finally:
            await app.stop()

    asyncio.run(run())
