"""The per-connection keys that authenticate fastdp probe frames (sans-IO).

Probe frames travel as plain UDP, so anyone on the underlay can send one. Each end of a
mesh connection that runs fastdp therefore sends the other a random key share over the
mesh TCP connection (encrypted when a password is set), in an overlay control message
(tag OverlayControl) that is ours alone: fastdp runs only between pyweave routers.
Body::

    magic "PWfk" (4) | version 1 (1) | key share (32)

Anything else under that tag (e.g. a Weave peer's own overlay control messages) is
not ours and is ignored. The key for frames from A to B on connection ConnUID is::

    BLAKE2b-256(key = share_A || share_B,
                msg = "pyweave fastdp link key" || name_A (6) || name_B (6) || ConnUID (8))

so each direction of each connection has its own key: a frame from an old connection,
or one reflected back at its sender, does not verify. Until both shares are known no
key exists, and a link neither sends nor accepts heartbeats.
"""

from __future__ import annotations

import hashlib
import secrets
import struct

from router.errors import WireError

SHARE_LEN = 32
KEY_LEN = 32
MAGIC = b"PWfk"
VERSION = 1
_HEADER = struct.Struct("!4sB")
MESSAGE_LEN = _HEADER.size + SHARE_LEN
_CONTEXT = b"pyweave fastdp link key"


class KeyShareError(WireError):
    """An overlay control message that is not a well-formed fastdp key share."""


def new_share() -> bytes:
    return secrets.token_bytes(SHARE_LEN)


def encode_share(share: bytes) -> bytes:
    """The overlay control message body that hands `share` to the peer."""
    if len(share) != SHARE_LEN:
        raise ValueError(f"a key share is {SHARE_LEN} bytes, not {len(share)}")
    return _HEADER.pack(MAGIC, VERSION) + share


def is_share_message(body: bytes) -> bool:
    """Whether an overlay control message claims to be ours (so errors in it are worth counting)."""
    return body[:4] == MAGIC


def decode_share(body: bytes | bytearray | memoryview) -> bytes:
    """The key share in an overlay control message. Raises KeyShareError if it is not one."""
    if len(body) != MESSAGE_LEN:
        raise KeyShareError(f"fastdp key share message is {len(body)} bytes, not {MESSAGE_LEN}")
    magic, version = _HEADER.unpack_from(body, 0)
    if magic != MAGIC:
        raise KeyShareError("not a fastdp key share message")
    if version != VERSION:
        raise KeyShareError(f"unsupported fastdp key share version {version}")
    return bytes(body[_HEADER.size:])


def derive_key(sender_share: bytes, receiver_share: bytes, sender: int, receiver: int,
               conn_uid: int) -> bytes:
    """The key of frames from `sender` to `receiver` on connection `conn_uid`."""
    if len(sender_share) != SHARE_LEN or len(receiver_share) != SHARE_LEN:
        raise ValueError(f"key shares are {SHARE_LEN} bytes")
    if not (0 < sender < 1 << 48 and 0 < receiver < 1 << 48 and 0 <= conn_uid < 1 << 64):
        raise ValueError("peer names are 48 bits, a ConnUID 64")
    msg = _CONTEXT + sender.to_bytes(6, "big") + receiver.to_bytes(6, "big") + conn_uid.to_bytes(8, "big")
    return hashlib.blake2b(msg, key=sender_share + receiver_share, digest_size=KEY_LEN).digest()
