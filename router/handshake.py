"""The mesh connection handshake as a sans-IO state machine (both ends).

Usage (h11 style; the caller owns the socket)::

    hs = Handshake(outbound=True, local=PeerIdentity(name, "host", uid, short_id),
                   conn_id=random_u64, password=b"secret", overlays=["sleeve"])
    sock.send(hs.initiate())                       # the 7-byte header
    try:
        while not hs.complete:
            sock.send(hs.receive_data(sock.recv()))
    except HandshakeFailure as exc:                # exc.reason, exc.retryable
        sock.send(exc.unsent)                      # best effort, then close
        raise
    hs.remote, hs.version, hs.conn_uid, hs.session_key
    frames = hs.codec.feed(b"")   # do call this: frames that came with the features

States: IDLE -> (initiate) -> AWAIT_HEADER -> [v2: AWAIT_FLAG] -> AWAIT_FEATURES ->
COMPLETE, or FAILED from any state (``error`` holds the failure; further calls re-raise it).

Wire sequence (see weave-net.md §2.2-2.3):

1. both ends send ``b"weave" min max`` at once; version = min of the maxes, and the
   ranges must overlap.
2. v2: each end sends a flag byte (1 = crypto, followed by a fresh X25519 public key),
   then a length-prefixed frame holding the gob ``map[string]string`` of features,
   sealed when both ends have a password. Later frames go through ``FrameCodec``.
3. v1 (legacy): each end sends its features as the first value of a gob stream that
   lasts the whole connection (in clear; only the five v1 keys plus ``PublicKey`` in
   hex), later messages are gob ``[]byte`` values (``GobFrameCodec``).

Until the handshake completes the peer has proved nothing, so its frames (the v2
features frame, each v1 gob message) are refused above ``MAX_HANDSHAKE_FRAME_SIZE``
as soon as the length prefix is in, and the v1 stream's type definitions count
against the bounds of ``v1_stream_decoder`` for the whole connection.

Results once ``complete``: ``remote`` (``RemoteFeatures``: name, nickname, uid,
conn_id, short_id, trusted, overlays, raw map), ``version``, ``codec`` (``FrameCodec``
or ``GobFrameCodec``, holding any bytes that followed the features), ``conn_uid``
(our ConnID XOR theirs, equal at both ends), ``session_key`` and
``overlay_session_key`` (the key only when either end does not trust the other).
Reading a result earlier, or calling methods out of order, raises RuntimeError.

Every failure is a ``HandshakeFailure`` (a ``HandshakeError``) with a ``reason`` and
``retryable``: a name collision or a connection to ourself is never worth retrying.
The machine only ever waits for more bytes; timeouts and EOF are the caller's to report.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import nacl.public

from router.errors import GobError, HandshakeError, ProtocolError
from router.gob import STRING_MAP, Decoder, encode
from router.peername import PEER_NAME_FLAVOUR, format_peer_name
from router.protocol import LENGTH_PREFIX_SIZE, MAX_HANDSHAKE_FRAME_SIZE
from router.session_crypto import (
    KEY_SIZE,
    Codec,
    FrameCodec,
    GobFrameCodec,
    GobMessageSplitter,
    as_private_key,
    derive_session_key,
    generate_private_key,
    is_definition,
    v1_stream_decoder,
)

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

PROTOCOL_NAME = b"weave"
HEADER_SIZE = len(PROTOCOL_NAME) + 2
PROTOCOL_MIN_VERSION = 1
PROTOCOL_MAX_VERSION = 2
# Go's process-wide gob id for map[string]string in every Weave 2.8 router seen.
FEATURES_TYPE_ID = 74
SHORT_ID_BITS = 12
V1_FEATURES = ("ConnID", "Name", "NickName", "PeerNameFlavour", "UID")
REQUIRED_FEATURES = ("PeerNameFlavour", "Name", "NickName", "UID", "ConnID")
_U64_MAX = (1 << 64) - 1

# Weave's exact wording (including its "specificed" typo) so logs match real peers'.
ERR_EXPECTED_CRYPTO = "password specified, but peer requested an unencrypted connection"
ERR_EXPECTED_NO_CRYPTO = "no password specificed, but peer requested an encrypted connection"


class FailureReason(enum.Enum):
    BAD_HEADER = "bad protocol header"
    VERSION_MISMATCH = "incompatible protocol versions"
    BAD_ENCRYPTION_FLAG = "bad encryption flag"
    EXPECTED_CRYPTO = "peer has no password"
    EXPECTED_NO_CRYPTO = "peer has a password"
    BAD_PUBLIC_KEY = "bad public key"
    DECRYPTION_FAILED = "decryption failed"
    MALFORMED_FEATURES = "malformed features"
    MISSING_FEATURE = "missing feature"
    FLAVOUR_MISMATCH = "peer name flavour mismatch"
    BAD_FEATURE_VALUE = "bad feature value"
    NAME_COLLISION = "peer name collision"
    CONNECT_TO_SELF = "connection to ourself"


_NEVER_RETRY = frozenset({FailureReason.NAME_COLLISION, FailureReason.CONNECT_TO_SELF})


class HandshakeFailure(HandshakeError):
    """Why a handshake failed, and whether dialling that address again could help."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        # Bytes produced in the failing receive_data call before the failure. Sending
        # them before closing lets the peer fail for the real reason (e.g. it reports
        # the wrong password instead of an EOF), as a Go peer's concurrent write does.
        self.unsent = b""

    @property
    def retryable(self) -> bool:
        return self.reason not in _NEVER_RETRY


class HandshakeState(enum.Enum):
    IDLE = "idle"
    AWAIT_HEADER = "await header"
    AWAIT_FLAG = "await encryption flag"
    AWAIT_FEATURES = "await features"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True)
class PeerIdentity:
    """What the local peer tells the remote about itself."""

    name: int
    nickname: str
    uid: int
    short_id: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.name < 1 << 48:
            raise ValueError(f"peer name {self.name} does not fit in 48 bits")
        if not 0 <= self.uid <= _U64_MAX:
            raise ValueError(f"peer UID {self.uid} does not fit in 64 bits")
        if self.short_id is not None and not 0 <= self.short_id < 1 << SHORT_ID_BITS:
            raise ValueError(f"short ID {self.short_id} does not fit in {SHORT_ID_BITS} bits")


@dataclass(frozen=True)
class RemoteFeatures:
    """The remote's feature map, parsed. ``overlays`` is None when the key is absent
    (an old peer that only speaks the compat sleeve overlay)."""

    name: int
    nickname: str
    uid: int
    conn_id: int
    short_id: int | None = None
    trusted: bool = False
    overlays: tuple[str, ...] | None = None
    raw: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)


# ---------------------------------------------------------------- feature maps


def make_features(
    local: PeerIdentity,
    conn_id: int,
    trusted_remote: bool = False,
    overlays: Iterable[str] = (),
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Our feature map, keys in the order a real Weave peer was captured sending them."""
    features = {"Name": format_peer_name(local.name), "NickName": local.nickname}
    if local.short_id is not None:
        features["ShortID"] = str(local.short_id)
    features["UID"] = str(local.uid)
    features["ConnID"] = str(conn_id)
    features["Trusted"] = "true" if trusted_remote else "false"
    overlay_list = list(overlays)
    if overlay_list:
        features["Overlays"] = " ".join(overlay_list)
    features["PeerNameFlavour"] = PEER_NAME_FLAVOUR
    for key, value in (extra or {}).items():
        features.setdefault(key, value)
    return features


def encode_features(features: Mapping[str, str]) -> bytes:
    """A fresh gob stream holding the map, as Weave's ``gob.NewEncoder(buf).Encode``."""
    return encode(dict(features), STRING_MAP, type_ids={STRING_MAP: FEATURES_TYPE_ID})


def decode_features(data: bytes) -> dict[str, str]:
    """The feature map in one gob stream (as a v2 features frame). Raises GobError."""
    value = Decoder(data).decode(STRING_MAP)
    return dict(value)


_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_MAC = re.compile(r"[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}", re.ASCII)
_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


def _bad_value(key: str, value: str, why: str) -> HandshakeFailure:
    return HandshakeFailure(FailureReason.BAD_FEATURE_VALUE, f"feature {key}={value!r}: {why}")


def _parse_uint(key: str, value: str, bits: int) -> int:
    # Go's strconv.ParseUint(s, 10, bits): ASCII digits only, no sign, no spaces.
    if not _DIGITS.fullmatch(value):
        raise _bad_value(key, value, "not a decimal unsigned integer")
    number = int(value)
    if number >= 1 << bits:
        raise _bad_value(key, value, f"out of range for {bits} bits")
    return number


def parse_features(features: Mapping[str, str]) -> RemoteFeatures:
    """Validate a received feature map the way mesh does. Raises HandshakeFailure."""
    for key in REQUIRED_FEATURES:
        if key not in features:
            raise HandshakeFailure(FailureReason.MISSING_FEATURE, f"Field {key} is missing")
    flavour = features["PeerNameFlavour"]
    if flavour != PEER_NAME_FLAVOUR:
        raise HandshakeFailure(
            FailureReason.FLAVOUR_MISMATCH,
            f"Peer name flavour mismatch (ours: '{PEER_NAME_FLAVOUR}', theirs: '{flavour}')",
        )
    name_text = features["Name"]
    if not _MAC.fullmatch(name_text):
        raise _bad_value("Name", name_text, "not a MAC-style peer name")
    name = int(re.sub("[:-]", "", name_text), 16)
    short_id = None
    if "ShortID" in features:
        short_id = _parse_uint("ShortID", features["ShortID"], SHORT_ID_BITS)
    trusted = False
    if "Trusted" in features:
        trusted_text = features["Trusted"]
        if trusted_text not in _GO_BOOLS:
            raise _bad_value("Trusted", trusted_text, "not a boolean")
        trusted = _GO_BOOLS[trusted_text]
    uid = _parse_uint("UID", features["UID"], 64)
    conn_id = _parse_uint("ConnID", features["ConnID"], 64)
    overlays = None
    if "Overlays" in features:
        overlays = tuple(o for o in features["Overlays"].split(" ") if o)
    return RemoteFeatures(
        name=name,
        nickname=features["NickName"],
        uid=uid,
        conn_id=conn_id,
        short_id=short_id,
        trusted=trusted,
        overlays=overlays,
        raw=dict(features),
    )


# ---------------------------------------------------------------- the state machine


class Handshake:
    """One end of one connection's handshake. See the module docstring.

    ``password`` None or empty means no encryption. ``private_key`` (bytes or a PyNaCl
    PrivateKey) replaces the fresh per-connection key, for tests; it is only used
    when there is a password. ``trusted_remote`` is whether *we* trust the remote's
    address (sent as our ``Trusted`` feature).
    """

    def __init__(
        self,
        outbound: bool,
        local: PeerIdentity,
        conn_id: int,
        password: bytes | None = None,
        trusted_remote: bool = False,
        overlays: Iterable[str] = (),
        min_version: int = PROTOCOL_MIN_VERSION,
        max_version: int = PROTOCOL_MAX_VERSION,
        private_key: nacl.public.PrivateKey | bytes | None = None,
        extra_features: Mapping[str, str] | None = None,
    ) -> None:
        if not PROTOCOL_MIN_VERSION <= min_version <= max_version <= PROTOCOL_MAX_VERSION:
            raise ValueError(
                f"protocol versions [{min_version},{max_version}] outside the supported "
                f"[{PROTOCOL_MIN_VERSION},{PROTOCOL_MAX_VERSION}]"
            )
        if not 0 <= conn_id <= _U64_MAX:
            raise ValueError(f"connection id {conn_id} does not fit in 64 bits")
        self.outbound = outbound
        self.local = local
        self.conn_id = conn_id
        self.trusted_remote = trusted_remote
        self.min_version = min_version
        self.max_version = max_version
        self._password = bytes(password) if password else None
        self._private_key: nacl.public.PrivateKey | None = None
        if self._password is not None:
            self._private_key = (
                as_private_key(private_key) if private_key is not None else generate_private_key()
            )
        self._features = make_features(local, conn_id, trusted_remote, overlays, extra_features)

        self._state = HandshakeState.IDLE
        self._buf = bytearray()
        self._error: HandshakeFailure | None = None
        self._version: int | None = None
        self._session_key: bytes | None = None
        self._codec: FrameCodec | GobFrameCodec | None = None
        self._remote: RemoteFeatures | None = None
        self._v1_splitter: GobMessageSplitter | None = None
        self._v1_decoder: Decoder | None = None

    # -- results

    @property
    def state(self) -> HandshakeState:
        return self._state

    @property
    def complete(self) -> bool:
        return self._state is HandshakeState.COMPLETE

    @property
    def error(self) -> HandshakeFailure | None:
        return self._error

    @property
    def features(self) -> Mapping[str, str]:
        """The feature map we send (before v1 filtering)."""
        return dict(self._features)

    @property
    def public_key(self) -> bytes | None:
        """Our ephemeral public key, when there is a password."""
        return bytes(self._private_key.public_key) if self._private_key is not None else None

    @property
    def version(self) -> int:
        if self._version is None:
            raise RuntimeError("protocol version not negotiated yet")
        return self._version

    @property
    def remote(self) -> RemoteFeatures:
        return self._result(self._remote)

    @property
    def codec(self) -> Codec:
        """The established connection's codec, holding any bytes that followed the features."""
        return self._result(self._codec)

    @property
    def session_key(self) -> bytes | None:
        """The connection's session key; None on an unencrypted connection."""
        self._require_complete()
        return self._session_key

    @property
    def conn_uid(self) -> int:
        """Local ConnID XOR remote ConnID: the same number at both ends."""
        return self.conn_id ^ self.remote.conn_id

    @property
    def untrusted(self) -> bool:
        """Either end does not trust the other: the overlay must encrypt too."""
        return not self.trusted_remote or not self.remote.trusted

    @property
    def overlay_session_key(self) -> bytes | None:
        """The session key to give the overlay: only for untrusted connections."""
        return self.session_key if self.untrusted else None

    def _require_complete(self) -> None:
        if self._state is not HandshakeState.COMPLETE:
            raise RuntimeError(f"handshake not complete (state: {self._state.value})")

    def _result(self, value: _T | None) -> _T:
        self._require_complete()
        assert value is not None
        return value

    # -- driving

    def initiate(self) -> bytes:
        """The bytes to send as soon as the TCP connection is up."""
        if self._state is not HandshakeState.IDLE:
            raise RuntimeError("handshake already initiated")
        self._state = HandshakeState.AWAIT_HEADER
        return PROTOCOL_NAME + bytes((self.min_version, self.max_version))

    def receive_data(self, data: bytes) -> bytes:
        """Consume bytes from the peer; returns the bytes to send to it (maybe empty)."""
        if self._state is HandshakeState.FAILED:
            assert self._error is not None
            self._error.unsent = b""
            raise self._error
        if self._state is HandshakeState.IDLE:
            raise RuntimeError("call initiate() before receive_data()")
        if self._state is HandshakeState.COMPLETE:
            raise RuntimeError("handshake complete: feed further data to the codec")
        self._buf += data
        out = bytearray()
        try:
            while self._step(out):
                pass
        except HandshakeFailure as exc:
            exc.unsent = bytes(out)
            self._fail(exc)
            raise
        return bytes(out)

    def _fail(self, exc: HandshakeFailure) -> None:
        self._state = HandshakeState.FAILED
        self._error = exc
        self._buf.clear()
        logger.debug("handshake failed (%s): %s", exc.reason.name, exc)

    def _step(self, out: bytearray) -> bool:
        """Make one transition if the buffered input allows it."""
        if self._state is HandshakeState.AWAIT_HEADER:
            return self._on_header(out)
        if self._state is HandshakeState.AWAIT_FLAG:
            return self._on_flag(out)
        if self._state is HandshakeState.AWAIT_FEATURES:
            return self._on_features_v2() if self._version == 2 else self._on_features_v1()
        return False

    def _on_header(self, out: bytearray) -> bool:
        if len(self._buf) < HEADER_SIZE:
            # Reject a wrong protocol name early rather than waiting for 7 bytes.
            prefix = bytes(self._buf[: len(PROTOCOL_NAME)])
            if not PROTOCOL_NAME.startswith(prefix):
                raise HandshakeFailure(
                    FailureReason.BAD_HEADER, f"remote protocol header not recognised: {list(prefix)}"
                )
            return False
        header = bytes(self._buf[:HEADER_SIZE])
        del self._buf[:HEADER_SIZE]
        if header[: len(PROTOCOL_NAME)] != PROTOCOL_NAME:
            raise HandshakeFailure(
                FailureReason.BAD_HEADER,
                f"remote protocol header not recognised: {list(header[: len(PROTOCOL_NAME)])}",
            )
        their_min, their_max = header[-2], header[-1]
        version = min(their_max, self.max_version)
        if max(their_min, self.min_version) > version:
            raise HandshakeFailure(
                FailureReason.VERSION_MISMATCH,
                f"remote version range [{their_min},{their_max}] is incompatible with ours "
                f"[{self.min_version},{self.max_version}]",
            )
        self._version = version
        if version == 2:
            public_key = self.public_key
            out += b"\x00" if public_key is None else b"\x01" + public_key
            self._state = HandshakeState.AWAIT_FLAG
        else:
            out += self._v1_intro()
            self._v1_splitter = GobMessageSplitter(MAX_HANDSHAKE_FRAME_SIZE)
            self._v1_decoder = v1_stream_decoder()
            self._state = HandshakeState.AWAIT_FEATURES
        return True

    # -- v2

    def _on_flag(self, out: bytearray) -> bool:
        if not self._buf:
            return False
        flag = self._buf[0]
        if flag == 0:
            if self._password is not None:
                raise HandshakeFailure(FailureReason.EXPECTED_CRYPTO, ERR_EXPECTED_CRYPTO)
            del self._buf[:1]
            self._codec = FrameCodec(None, self.outbound)
        elif flag == 1:
            if self._password is None:
                raise HandshakeFailure(FailureReason.EXPECTED_NO_CRYPTO, ERR_EXPECTED_NO_CRYPTO)
            if len(self._buf) < 1 + KEY_SIZE:
                return False
            remote_public = bytes(self._buf[1 : 1 + KEY_SIZE])
            del self._buf[: 1 + KEY_SIZE]
            self._session_key = self._derive(remote_public)
            self._codec = FrameCodec(self._session_key, self.outbound)
        else:
            raise HandshakeFailure(FailureReason.BAD_ENCRYPTION_FLAG, f"Bad encryption flag {flag}")
        out += self._codec.encode_frame(encode_features(self._features))
        self._state = HandshakeState.AWAIT_FEATURES
        return True

    def _derive(self, remote_public: bytes) -> bytes:
        assert self._private_key is not None and self._password is not None
        try:
            return derive_session_key(remote_public, self._private_key, self._password)
        except ProtocolError as exc:
            raise HandshakeFailure(FailureReason.BAD_PUBLIC_KEY, str(exc)) from None

    def _on_features_v2(self) -> bool:
        assert isinstance(self._codec, FrameCodec)
        if len(self._buf) < LENGTH_PREFIX_SIZE:
            return False
        length = int.from_bytes(self._buf[:LENGTH_PREFIX_SIZE], "big")
        if length > MAX_HANDSHAKE_FRAME_SIZE:
            raise HandshakeFailure(
                FailureReason.MALFORMED_FEATURES,
                f"incoming features message exceeds maximum size: {length} > {MAX_HANDSHAKE_FRAME_SIZE}",
            )
        end = LENGTH_PREFIX_SIZE + length
        if len(self._buf) < end:
            return False
        raw_frame = bytes(self._buf[:end])
        rest = bytes(self._buf[end:])
        self._buf.clear()
        try:
            (payload,) = self._codec.feed(raw_frame)
        except ProtocolError as exc:
            raise HandshakeFailure(
                FailureReason.DECRYPTION_FAILED,
                f"{exc}; the peer's password differs from ours",
            ) from None
        try:
            features = decode_features(payload)
        except GobError as exc:
            raise HandshakeFailure(FailureReason.MALFORMED_FEATURES, f"bad features message: {exc}") from None
        self._finish(features, rest)
        return False

    # -- v1

    def _v1_intro(self) -> bytes:
        features = {k: v for k, v in self._features.items() if k in V1_FEATURES}
        if self.public_key is not None:
            features["PublicKey"] = self.public_key.hex()
        return encode_features(features)

    def _on_features_v1(self) -> bool:
        splitter, decoder = self._v1_splitter, self._v1_decoder
        assert splitter is not None and decoder is not None
        splitter.push(bytes(self._buf))
        self._buf.clear()
        # One message at a time: what follows the features belongs to the codec and its
        # post-handshake size limit, not to the handshake's.
        while True:
            try:
                message = splitter.pop()
                if message is None:
                    return False
                decoder.feed(message)
                if is_definition(message):
                    decoder.consume_definitions()
                    continue
                received = dict(decoder.decode(STRING_MAP))
            except (GobError, ProtocolError) as exc:
                raise HandshakeFailure(
                    FailureReason.MALFORMED_FEATURES, f"bad features message: {exc}"
                ) from None
            self._finish_v1(received, splitter.take_rest())
            return False

    def _finish_v1(self, received: dict[str, str], rest: bytes) -> None:
        remote_public = received.get("PublicKey")
        if self._password is None:
            if remote_public is not None:
                raise HandshakeFailure(FailureReason.EXPECTED_NO_CRYPTO, ERR_EXPECTED_NO_CRYPTO)
        else:
            if remote_public is None:
                raise HandshakeFailure(FailureReason.EXPECTED_CRYPTO, ERR_EXPECTED_CRYPTO)
            try:
                key_bytes = bytes.fromhex(remote_public)
            except ValueError:
                raise HandshakeFailure(
                    FailureReason.BAD_PUBLIC_KEY, f"PublicKey feature is not hexadecimal: {remote_public!r}"
                ) from None
            self._session_key = self._derive(key_bytes)
        self._codec = GobFrameCodec(self._session_key, self.outbound, decoder=self._v1_decoder)
        self._finish({k: v for k, v in received.items() if k in V1_FEATURES}, rest)

    # -- both

    def _finish(self, received: dict[str, str], rest: bytes) -> None:
        remote = parse_features(received)
        if remote.name == self.local.name:
            if remote.uid != self.local.uid:
                ours = f"{format_peer_name(self.local.name)}({self.local.nickname})"
                theirs = f"{format_peer_name(remote.name)}({remote.nickname})"
                raise HandshakeFailure(
                    FailureReason.NAME_COLLISION, f'local "{ours}" and remote "{theirs}" peer names collision'
                )
            raise HandshakeFailure(FailureReason.CONNECT_TO_SELF, "cannot connect to ourself")
        assert self._codec is not None
        self._codec.queue(rest)
        self._remote = remote
        self._state = HandshakeState.COMPLETE
        logger.debug(
            "handshake with %s(%s) complete: protocol v%d, %s",
            format_peer_name(remote.name),
            remote.nickname,
            self._version,
            "encrypted" if self._session_key is not None else "unencrypted",
        )
