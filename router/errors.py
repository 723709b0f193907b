"""Error types raised by the wire codecs.

Every decoder in the router raises only subclasses of WireError on bad input, so
callers (and the fuzz tests) can treat "the peer sent garbage" as one case.
"""


class WireError(ValueError):
    """Malformed or unacceptable bytes from the network."""


class GobError(WireError):
    """A gob stream that is malformed, truncated or of an unexpected type."""


class ProtocolError(WireError):
    """A mesh protocol violation: bad frame, bad tag body, failed decryption."""


class HandshakeError(ProtocolError):
    """The connection handshake failed; the message says why."""


class GobLimitError(GobError):
    """A gob stream went past a bound on what its decoder keeps (type definitions)."""
