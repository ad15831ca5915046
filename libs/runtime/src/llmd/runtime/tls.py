"""TLS for llmd's gRPC and HTTPS servers, with certificates re-read when they change.

A certificate directory holds `tls.crt` and `tls.key` (what a Kubernetes TLS secret mounts, and
llm-d's `--cert-path` layout), and optionally `ca.crt`: with it, clients must present a
certificate signed by that CA (mutual TLS). `TLSFiles.credentials()` gives gRPC server
credentials that look at the files again for each new connection and switch to the new pair
when they changed (cert-manager rotations need no restart). `TLSFiles.ssl_context()` gives an
HTTPS server context, and `refresh(context)` loads a changed pair into it (new connections use
it). A missing or unreadable file at start is an OSError naming it; a bad rotation keeps the
previous pair and is logged.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from pydantic import BaseModel, Field, model_validator

log = logging.getLogger(__name__)


@dataclass
class TLSFiles:
    """A certificate directory and what was last loaded from it."""

    directory: Path
    _loaded: tuple[bytes, bytes, bytes | None] | None = field(default=None, repr=False)
    reloads: int = 0

    @property
    def mutual(self) -> bool:
        return (self.directory / "ca.crt").is_file()

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        crt, key = self.directory / "tls.crt", self.directory / "tls.key"
        try:
            ca = self.directory / "ca.crt"
            return crt.read_bytes(), key.read_bytes(), ca.read_bytes() if ca.is_file() else None
        except OSError as exc:
            raise OSError(f"cannot read TLS files in {self.directory}: {exc}") from None

    def _config(self) -> grpc.ServerCertificateConfiguration | None:
        """The certificate configuration when the files changed since the last call."""
        try:
            current = self._read()
        except OSError as exc:
            log.error("%s; keeping the certificates already loaded", exc)
            return None
        if current == self._loaded:
            return None
        crt, key, ca = current
        if self._loaded is not None:
            self.reloads += 1
            log.info("TLS certificates in %s changed: reloaded", self.directory)
        self._loaded = current
        return grpc.ssl_server_certificate_configuration([(key, crt)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow the files (OSError when they cannot be read now)."""
        crt, key, ca = self._read()
        self._loaded = (crt, key, ca)
        initial = grpc.ssl_server_certificate_configuration([(key, crt)], root_certificates=ca)
        return grpc.dynamic_ssl_server_credentials(
            initial, self._config, require_client_authentication=ca is not None
        )

    def ssl_context(self) -> ssl.SSLContext:
        """An HTTPS server context from the files (client certificates required when ca.crt
        is there); OSError or ssl.SSLError when they cannot be used now."""
        current = self._read()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(context)
        self._loaded = current
        return context

    def _load(self, context: ssl.SSLContext) -> None:
        d = self.directory
        context.load_cert_chain(d / "tls.crt", d / "tls.key")
        if self.mutual:
            context.load_verify_locations(d / "ca.crt")
            context.verify_mode = ssl.CERT_REQUIRED

    def refresh(self, context: ssl.SSLContext) -> bool:
        """Load the files into `context` if they changed since the last load; True when it
        did. A pair that cannot be loaded is logged and the previous one stays in force."""
        try:
            current = self._read()
        except OSError as exc:
            log.error("%s; keeping the certificates already loaded", exc)
            return False
        if current == self._loaded:
            return False
        try:
            # a pair that fails half way (a key that does not match) would leave the live
            # context with the new certificate and the old key: try it on a scratch one first
            self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
            self._load(context)
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "TLS files in %s cannot be used (%s); keeping the previous", self.directory, exc
            )
            return False
        self._loaded = current
        self.reloads += 1
        log.info("TLS certificates in %s changed: reloaded", self.directory)
        return True


class TLSServing(BaseModel):
    """The TLS settings a service with gRPC servers takes (llm-d's `--secure-serving` and
    `--cert-path`); a service config inherits them."""

    secure_serving: bool = Field(
        default=False, description="serve gRPC over TLS (certificates from cert_path)"
    )
    cert_path: str | None = Field(
        default=None,
        description="directory with tls.crt and tls.key (and ca.crt to require client "
        "certificates); re-read when they change",
    )

    @model_validator(mode="after")
    def _needs_certificates(self) -> TLSServing:
        if self.secure_serving and not self.cert_path:
            raise ValueError("secure_serving needs cert_path (a directory with tls.crt, tls.key)")
        return self

    def tls_files(self) -> TLSFiles | None:
        """The certificate directory to serve from, or None for plaintext."""
        return TLSFiles(Path(self.cert_path)) if self.secure_serving and self.cert_path else None
