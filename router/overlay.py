"""The contract between the mesh and the data path (the overlay) of its connections.

A mesh connection carries gossip from the moment its handshake completes, but it is
"established" (usable for data, and so for unicast routes) only when the overlay has
confirmed that frames get through to the peer. The mesh tells the overlay about
connections and the control messages it receives for it; the overlay answers through
the `OverlayHost` it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from router.protocol import SLEEVE_OVERLAY, ControlMessage


@dataclass
class OverlayConn:
    """What an overlay knows of one mesh connection."""

    remote: int  # peer name
    nickname: str
    conn_uid: int
    outbound: bool  # we dialled
    tcp_address: tuple[str, int]  # the remote end of the TCP connection
    session_key: bytes | None  # set when the overlay must encrypt (untrusted, password)
    features: dict[str, str] = field(default_factory=dict)  # the remote's handshake features
    # The overlays both ends announced (router.protocol.ControlFraming.common): only
    # these may send control messages on the connection.
    common_overlays: tuple[str, ...] = (SLEEVE_OVERLAY,)


@dataclass(frozen=True)
class OverlayStatus:
    """How a connection's data travels, for `weave status connections`."""

    overlay: str  # "sleeve", "fastdp", ...
    encrypted: bool
    mtu: int
    detail: str = ""  # e.g. why this overlay was chosen


class OverlayHost(Protocol):
    """The mesh, as an overlay sees it."""

    def overlay_established(self, remote: int, conn_uid: int) -> None: ...

    def overlay_failed(self, remote: int, conn_uid: int, reason: str) -> None: ...

    def overlay_send(self, remote: int, conn_uid: int, msg: ControlMessage) -> None:
        """Send `msg` on the connection, framed as the handshake agreed (ControlFraming)."""
        ...


class Overlay(Protocol):
    def features(self) -> dict[str, str]:
        """Extra handshake features we announce."""
        ...

    def connection_up(self, conn: OverlayConn) -> None: ...

    def connection_down(self, remote: int, conn_uid: int) -> None: ...

    def control(self, remote: int, conn_uid: int, msg: ControlMessage) -> None:
        """A control message for one of the connection's common overlays arrived; the mesh
        has checked its framing, sub-tag and (for the sleeve) its length."""
        ...

    def status(self, remote: int) -> OverlayStatus | None: ...
