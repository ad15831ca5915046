"""The errors llmd.protocol raises: one family, so callers catch one type."""


class ProtocolError(ValueError):
    """Input that does not follow a wire format llmd reads."""


class DecodeError(ProtocolError):
    """Bytes that cannot be decoded (truncated, wrong types, absurd sizes)."""


class TopicError(ProtocolError):
    """A KV-event topic that is not `kv@<pod>@<model>`."""
