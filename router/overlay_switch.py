"""The overlay switch: per peer, the kernel VXLAN path (fastdp) when it is healthy, else
the sleeve. The mesh sees one overlay.

Every connection runs the sleeve: it confirms the connection, carries traffic whenever
fastdp cannot, and relays for peers without a direct link. fastdp is tried only on
direct links to pyweave peers that offer it ("vxlan"; never advertised as "fastdp",
which to a Weave peer means its own OVS datapath) and only where no encryption is
needed, because this kernel path is plain VXLAN. While fastdp is healthy for a peer the
kernel carries its unicast (learnt MACs) and floods our broadcasts to it (its all-zero
FDB entry); the sleeve then leaves that peer out of its own broadcast fan-out.

fastdp's heartbeats are authenticated with keys agreed over the mesh connection: when
fastdp starts monitoring a connection the switch sends the peer our key share as the
vxlan overlay's KEY_SHARE control message (data format in :mod:`fastdp.linkkey`) and
hands the peer's share, when it arrives, to fastdp. fastdp is tried only where the
handshake put vxlan in common (both ends announced it), so the share's forwarder index
is one the peer has; a Weave peer never announces vxlan and never gets one.
"""

from __future__ import annotations

import logging
import time

from fastdp import linkkey
from fastdp.service import FastdpService, FastdpState
from router import ratelog
from router.overlay import OverlayConn, OverlayStatus
from router.peername import format_peer_name
from router.protocol import SLEEVE_OVERLAY, VXLAN_OVERLAY, ControlMessage, VxlanControl
from sleeve.service import VNET_FEATURE, SleeveOverlay

log = logging.getLogger(__name__)

# The connection-status name of the kernel path, as Weave users know it.
FASTDP_STATUS_NAME = "fastdp"


class OverlaySwitch:
    def __init__(
        self, sleeve: SleeveOverlay, fastdp: FastdpService | None, disabled_reason: str = ""
    ) -> None:
        self.sleeve = sleeve
        self.fastdp = fastdp
        self.disabled_reason = disabled_reason
        self._conns: dict[int, OverlayConn] = {}
        self._why_sleeve: dict[int, str] = {}
        self._lost_at: dict[int, float] = {}
        if fastdp is not None:
            fastdp.on_change = self._fastdp_changed

    @property
    def fastdp_available(self) -> bool:
        return self.fastdp is not None and self.fastdp.available

    def overlays(self) -> tuple[str, ...]:
        """The overlay names we announce in handshakes. Their order numbers the forwarders
        between pyweave peers (sleeve 0, vxlan 1); a Weave peer only shares the sleeve."""
        return (SLEEVE_OVERLAY, VXLAN_OVERLAY) if self.fastdp_available else (SLEEVE_OVERLAY,)

    # -- Overlay

    def features(self) -> dict[str, str]:
        return self.sleeve.features()

    def connection_up(self, conn: OverlayConn) -> None:
        self._conns[conn.remote] = conn
        self.sleeve.connection_up(conn)
        if self.fastdp is None or not self.fastdp.available:
            self._why_sleeve[conn.remote] = self.disabled_reason or (
                f"fastdp unavailable: {self.fastdp.unavailable_reason}" if self.fastdp else "fastdp off"
            )
        elif VXLAN_OVERLAY not in conn.common_overlays:
            pyweave = VNET_FEATURE in conn.features
            if not pyweave:
                why = "peer is Weave Net"
            elif VXLAN_OVERLAY in conn.features.get("Overlays", "").split():
                why = "vxlan was not announced when this connection started"
            else:
                why = "peer offers no vxlan"
            self._why_sleeve[conn.remote] = why
        elif conn.session_key is not None:
            self._why_sleeve[conn.remote] = "encrypted, untrusted"
        else:
            self._why_sleeve[conn.remote] = "fastdp not yet confirmed"
            try:
                share = self.fastdp.add_peer(conn.remote, conn.conn_uid, conn.tcp_address[0])
            except ValueError as exc:
                self._why_sleeve[conn.remote] = f"fastdp: {exc}"
            else:
                if share is not None:
                    msg = ControlMessage(VXLAN_OVERLAY, VxlanControl.KEY_SHARE, linkkey.encode_share(share))
                    self.sleeve.host.overlay_send(conn.remote, conn.conn_uid, msg)

    def connection_down(self, remote: int, conn_uid: int) -> None:
        conn = self._conns.get(remote)
        if conn is None or conn.conn_uid != conn_uid:
            return
        del self._conns[remote]
        self._why_sleeve.pop(remote, None)
        self._lost_at.pop(remote, None)
        if self.fastdp is not None:
            self.fastdp.remove_peer(remote, conn_uid)
        self._set_kernel(remote, False)
        self.sleeve.connection_down(remote, conn_uid)

    def control(self, remote: int, conn_uid: int, msg: ControlMessage) -> None:
        if msg.overlay == VXLAN_OVERLAY:
            if msg.subtag == VxlanControl.KEY_SHARE:
                self._key_share(remote, conn_uid, msg.data)
            return
        self.sleeve.control(remote, conn_uid, msg)

    def _key_share(self, remote: int, conn_uid: int, body: bytes) -> None:
        try:
            share = linkkey.decode_share(body)
        except linkkey.KeyShareError as exc:
            ratelog.reject(log, "fastdp", "bad_key_share", "overlay: bad fastdp key share from %s: %s",
                           format_peer_name(remote), exc)
            return
        conn = self._conns.get(remote)
        if (conn is None or conn.conn_uid != conn_uid or self.fastdp is None
                or not self.fastdp.set_peer_share(remote, conn_uid, share)):
            ratelog.reject(log, "fastdp", "unexpected_key_share",
                           "overlay: unexpected fastdp key share from %s", format_peer_name(remote),
                           level=logging.INFO)

    def status(self, remote: int) -> OverlayStatus | None:
        base = self.sleeve.status(remote)
        if base is None:
            return None
        state = self.fastdp.state(remote) if self.fastdp is not None else None
        if state is not None and state.healthy:
            return OverlayStatus(FASTDP_STATUS_NAME, False, self.fastdp.mtu if self.fastdp else base.mtu)
        why = self._why_sleeve.get(remote, "")
        lost = self._lost_at.get(remote)
        if state is not None and lost is not None:
            why = f"fastdp heartbeats lost {time.monotonic() - lost:.0f} s ago"
        elif state is not None and state.reason and not state.healthy and why == "fastdp not yet confirmed":
            why = f"fastdp: {state.reason}"
        return OverlayStatus(base.overlay, base.encrypted, base.mtu, why)

    def datapath_stats(self) -> dict[str, int]:
        return self.sleeve.datapath_stats()

    # -- fastdp health

    def _fastdp_changed(self, peer: int, state: FastdpState) -> None:
        conn = self._conns.get(peer)
        if conn is None or conn.conn_uid != state.conn_uid:
            return
        who = f"{format_peer_name(peer)}({conn.nickname})"
        if state.healthy:
            self._lost_at.pop(peer, None)
            log.info("overlay: %s on fastdp", who)
        elif peer in self.sleeve_kernel_peers():
            # last_failover: from the last heartbeat that got through to the switch-over.
            self._lost_at[peer] = time.monotonic() - (state.last_failover or 0.0)
            log.info("overlay: %s back on sleeve: %s", who, state.reason)
            # Lost heartbeats may mean large frames are dropped: the sleeve checks its MTU.
            self.sleeve.reverify_mtu(peer)
        self._set_kernel(peer, state.healthy)

    def sleeve_kernel_peers(self) -> frozenset[int]:
        return self.sleeve.datapath.switch.kernel_peers

    def _set_kernel(self, peer: int, on: bool) -> None:
        switch = self.sleeve.datapath.switch
        current = switch.kernel_peers
        switch.kernel_peers = current | {peer} if on else current - {peer}
