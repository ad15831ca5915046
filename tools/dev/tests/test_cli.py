"""llmd-dev's command line: help, status and argument errors (no engines started)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from llmd.dev.cli import gateway_tls, main
from llmd.dev.envoy import EnvoySettings, envoy_config
from llmd.vllm_cpu.server import free_port


def test_help_documents_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmd.dev.cli", "up", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--engine",
        "--count",
        "--block-size",
        "--duration",
        "--profile",
        "--port",
        "--config",
    ):
        assert flag in out


def test_status_says_plainly_what_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Envoy" in out
    assert "llmd-scheduler" in out
    assert "llmd-sim" in out
    assert "real vLLM" in out


@pytest.mark.integration
def test_up_runs_simulated_engines_by_default_and_stops_cleanly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port, control, metrics = free_port(), free_port(), free_port()
    scaled: list[int] = []

    def send_and_scale() -> None:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    json={"model": "tiny", "prompt": "hello", "max_tokens": 2},
                    timeout=5,
                )
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        url = f"http://127.0.0.1:{control}"
        scaled.append(main(["scale", "sim", "3", "--control-url", url, "--timeout", "60"]))
        scaled.append(main(["scale", "sim", "1", "--control-url", url, "--timeout", "60"]))

    sender = threading.Thread(target=send_and_scale)
    sender.start()
    argv = ["up", "--count", "2", "--duration", "25", "--port", str(port)]
    argv += ["--control-port", str(control), "--scheduler-metrics-port", str(metrics)]
    assert main(argv) == 0
    sender.join()
    assert scaled == [0, 0]
    out = capsys.readouterr().out
    assert f"metrics http://127.0.0.1:{metrics}/metrics" in out
    assert "pool sim: 3 ready" in out
    assert "sim-2 ready at" in out
    assert "pool sim: 1 ready" in out
    assert "sim-1 stopped" in out
    assert "sim-0" in out
    assert "sim-1" in out
    assert f"curl -s http://127.0.0.1:{port}/v1/completions" in out
    assert "tiny: -> sim-" in out  # a live routing decision was shown
    assert "engines stopped" in out


@pytest.mark.parametrize(
    "argv", [["up", "--count", "0"], ["up", "--engine", "vllm", "--block-size", "16"]]
)
def test_bad_arguments_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_tls_dir_is_read_as_documented(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tls\.crt is missing"):
        gateway_tls(tmp_path)
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).write_text("pem")
    plain = gateway_tls(tmp_path)  # server-side TLS: Envoy trusts the (self-signed) tls.crt
    assert plain.ca == tmp_path / "tls.crt"
    assert plain.client_cert is None
    (tmp_path / "ca.crt").write_text("pem")
    with pytest.raises(ValueError, match=r"envoy\.crt and envoy\.key"):
        gateway_tls(tmp_path)
    for name in ("envoy.crt", "envoy.key"):
        (tmp_path / name).write_text("pem")
    mutual = gateway_tls(tmp_path)
    assert (mutual.ca, mutual.client_cert) == (tmp_path / "ca.crt", tmp_path / "envoy.crt")
    settings = EnvoySettings(
        extproc_tls_ca=str(mutual.ca),
        extproc_tls_client_cert=str(mutual.client_cert),
        extproc_tls_client_key=str(mutual.client_key),
    )
    cluster = next(c for c in envoy_config(settings)["static_resources"]["clusters"]
                   if c["name"] == "llmd_scheduler")  # fmt: skip
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "localhost"
    assert tls["common_tls_context"]["tls_certificates"][0]["certificate_chain"] == {
        "filename": str(tmp_path / "envoy.crt")
    }
    with pytest.raises(ValueError, match="need extproc_tls_ca"):
        envoy_config(EnvoySettings(extproc_tls_client_cert="x", extproc_tls_client_key="y"))


def test_the_ext_authz_gateway_shape() -> None:
    cfg = envoy_config(EnvoySettings(scheduler_api="ext_authz", extauthz_port=9555))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    # the Lua filter sits before ext_authz so that the check's rejections pass through it
    assert filters == [
        "envoy.filters.http.lua",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    authz = hcm["typed_config"]["http_filters"][1]["typed_config"]
    assert authz["http_service"]["path_prefix"] == "/llmd/check"
    assert authz["with_request_body"]["allow_partial_message"] is False
    upstream = {p["exact"] for p in authz["http_service"]["authorization_response"][
        "allowed_upstream_headers"]["patterns"]}  # fmt: skip
    assert "x-gateway-destination-endpoint" in upstream
    assert "x-prefiller-host-port" in upstream
    log = hcm["typed_config"]["access_log"][0]["filter"]["metadata_filter"]["matcher"]
    assert (log["filter"], log["path"]) == (
        "envoy.filters.http.ext_authz",
        [{"key": "x-llmd-pick"}],
    )
    cluster = next(c for c in cfg["static_resources"]["clusters"]
                   if c["name"] == "llmd_scheduler_http")  # fmt: skip
    assert cluster["health_checks"][0]["http_health_check"] == {"path": "/llmd/health"}
    with pytest.raises(ValueError, match="needs response_path lean"):
        envoy_config(EnvoySettings(scheduler_api="ext_authz", response_path="full"))
    with pytest.raises(ValueError, match="no TLS"):
        envoy_config(EnvoySettings(scheduler_api="ext_authz", extproc_tls_ca="ca.pem"))
