"""Wire formats and pure functions shared by every llmd component (no I/O, no asyncio)."""

from llmd.protocol.errors import DecodeError, ProtocolError, TopicError

__all__ = ["DecodeError", "ProtocolError", "TopicError"]
