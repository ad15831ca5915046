"""A minimal Kubernetes API server on loopback: pods (list, watch) and Deployments' scale.

It speaks the real wire format, so the official `kubernetes` client is exercised end to end
(tests of discovery, the Kubernetes Cluster and the autoscaler's actuation use it). Every
scale-subresource PATCH is recorded in `patches`; an unknown Deployment is a 404 as on a real
API server.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


def pod(
    name: str,
    ip: str,
    *,
    ready: bool = True,
    phase: str = "Running",
    labels: dict[str, str] | None = None,
    created: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "llm",
            "labels": labels or {"app": "vllm"},
            "creationTimestamp": created,
        },
        "status": {
            "phase": phase,
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class FakeKube:
    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.version = 1
        self.replicas: dict[str, int] = {"vllm": 2}
        self.patches: list[tuple[str, int]] = []
        self.custom: dict[str, dict[str, dict[str, Any]]] = {}
        """Custom objects by plural (e.g. `variantautoscalings`), then `namespace/name`."""
        self.custom_groups: dict[str, str] = {}
        """Plural -> the one API group serving it (others answer 404); unset: any group."""
        self.status_patches: list[tuple[str, str, dict[str, Any]]] = []
        """(plural, namespace/name, status) of every status-subresource PATCH."""
        self.cond = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeKube:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        with self.cond:
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            name = obj["metadata"]["name"]
            if kind == "DELETED":
                self.pods.pop(name, None)
            else:
                self.pods[name] = obj
            self.events.append((self.version, kind, json.loads(json.dumps(obj))))
            self.cond.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        kube = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def _json(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _scale(self, name: str) -> dict[str, Any]:
                return {
                    "apiVersion": "autoscaling/v1",
                    "kind": "Scale",
                    "metadata": {"name": name, "namespace": "llm"},
                    "spec": {"replicas": kube.replicas[name]},
                    "status": {"replicas": kube.replicas[name]},
                }

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                parts = url.path.strip("/").split("/")
                if url.path.endswith("/pods"):
                    if query.get("watch") == ["true"]:
                        self._watch(
                            int(query.get("resourceVersion", ["0"])[0]),
                            float(query.get("timeoutSeconds", ["5"])[0]),
                        )
                        return
                    wanted = [
                        tuple(term.split("=", 1))
                        for term in query.get("labelSelector", [""])[0].split(",")
                        if "=" in term
                    ]
                    with kube.cond:
                        items = [
                            p
                            for p in kube.pods.values()
                            if all(p["metadata"]["labels"].get(k) == v for k, v in wanted)
                        ]
                        version = kube.version
                    self._json(
                        200,
                        {
                            "apiVersion": "v1",
                            "kind": "PodList",
                            "metadata": {"resourceVersion": str(version)},
                            "items": items,
                        },
                    )
                elif parts[-1] == "scale" and parts[-2] in kube.replicas:
                    self._json(200, self._scale(parts[-2]))
                elif (
                    parts[0] == "apis"
                    and parts[-1] in kube.custom
                    and kube.custom_groups.get(parts[-1], parts[1]) == parts[1]
                ):
                    # /apis/G/V/[namespaces/NS/]PLURAL
                    ns = parts[4] if len(parts) == 6 and parts[3] == "namespaces" else None
                    objs = [
                        o
                        for o in kube.custom[parts[-1]].values()
                        if ns is None or o["metadata"].get("namespace", "default") == ns
                    ]
                    self._json(200, {"apiVersion": f"{parts[1]}/{parts[2]}", "kind": "List",
                                     "metadata": {}, "items": objs})  # fmt: skip
                else:
                    self._json(404, {"kind": "Status", "code": 404})

            def do_PATCH(self) -> None:
                parts = urlparse(self.path).path.strip("/").split("/")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if parts[0] == "apis" and parts[-1] == "status" and parts[-3] in kube.custom:
                    key = f"{parts[4]}/{parts[-2]}"
                    obj = kube.custom[parts[-3]].get(key)
                    if obj is None:
                        self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                        return
                    obj["status"] = {**obj.get("status", {}), **body.get("status", {})}
                    kube.status_patches.append((parts[-3], key, body.get("status", {})))
                    self._json(200, obj)
                    return
                if parts[-2] == "pods" and parts[-1] in kube.pods:  # merge patch: None deletes
                    with kube.cond:
                        obj = json.loads(json.dumps(kube.pods[parts[-1]]))
                    meta = obj["metadata"]
                    for key, value in body.get("metadata", {}).get("annotations", {}).items():
                        notes = meta.setdefault("annotations", {})
                        if value is None:
                            notes.pop(key, None)
                        else:
                            notes[key] = value
                    kube.apply("MODIFIED", obj)
                    self._json(200, obj)
                    return
                if parts[-1] != "scale" or parts[-2] not in kube.replicas:
                    self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    return
                kube.replicas[parts[-2]] = int(body["spec"]["replicas"])
                kube.patches.append((parts[-2], kube.replicas[parts[-2]]))
                self._json(200, self._scale(parts[-2]))

            def _watch(self, since: int, timeout_s: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                deadline = time.monotonic() + min(timeout_s, 5.0)
                sent = since
                while time.monotonic() < deadline:
                    with kube.cond:
                        fresh = [e for e in kube.events if e[0] > sent]
                        if not fresh:
                            kube.cond.wait(0.2)
                            continue
                    for version, kind, obj in fresh:
                        self.wfile.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                        self.wfile.flush()
                        sent = version

        return Handler
