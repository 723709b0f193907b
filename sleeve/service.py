"""The sleeve overlay: wires each mesh connection's SleeveLink to the data path (trio).

The mesh reports connections and their control messages; this service keeps a
SleeveLink per connection, runs its timers, turns its actions into UDP special frames
(through the data path, so they are encrypted like data) and TCP control messages, and
confirms the connection to the mesh once the link is established.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from router import ratelog
from router.bridge import VNET_HDR_LEN
from router.overlay import OverlayConn, OverlayHost, OverlayStatus
from router.peername import format_peer_name
from router.protocol import SLEEVE_OVERLAY, ControlMessage, SleeveControl
from sleeve.crypto import SleeveCipher
from sleeve.datapath import DataPath, Link, path_mtu
from sleeve.link import Action, Established, Failed, MtuChanged, SendControl, SendFrame, SleeveLink
from sleeve.wire import SpecialFrame, classify_special, heartbeat_conn_uid

log = logging.getLogger(__name__)

OVERLAY_NAME = SLEEVE_OVERLAY
# Announced in the handshake: frames on the link carry a virtio header (pyweave peers).
VNET_FEATURE = "PyweaveSleeveVnet"
MAC_SWEEP_INTERVAL = 60.0


@dataclass
class _Conn:
    info: OverlayConn
    ctl: SleeveLink
    link: Link


class SleeveOverlay:
    def __init__(
        self,
        host: OverlayHost,
        datapath: DataPath,
        port: int,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.host = host
        self.datapath = datapath
        self.port = port
        self._clock = clock
        self._conns: dict[int, _Conn] = {}
        self._wake = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        datapath.on_special = self._special_from_thread

    # -- Overlay (called by the mesh)

    def features(self) -> dict[str, str]:
        return {VNET_FEATURE: "1"} if self.datapath.vnet_hdr else {}

    def connection_up(self, conn: OverlayConn) -> None:
        now = self._clock()
        address = (conn.tcp_address[0], self.port) if conn.outbound else None
        pmtu = path_mtu((conn.tcp_address[0], self.port)) or 1500
        vnet = self.datapath.vnet_hdr and conn.features.get(VNET_FEATURE) == "1"
        encrypted = conn.session_key is not None
        extra = VNET_HDR_LEN if vnet else 0
        ctl = SleeveLink(conn.conn_uid, conn.outbound, address, encrypted, now, pmtu, extra)
        cipher = None
        if conn.session_key is not None:
            cipher = SleeveCipher(conn.session_key, self.datapath.ourself, conn.outbound)
        link = Link(conn.remote, address, cipher, ctl.mtu, vnet=vnet)
        self._conns[conn.remote] = _Conn(conn, ctl, link)
        self.datapath.links = {**self.datapath.links, conn.remote: link}
        log.debug("sleeve: link to %s (%s, vnet %s)", _who(conn), "encrypted" if cipher else "plain", vnet)
        self._perform(conn.remote, ctl.tick(now))
        self._wake.set()

    def connection_down(self, remote: int, conn_uid: int) -> None:
        entry = self._conns.get(remote)
        if entry is None or entry.info.conn_uid != conn_uid:
            return
        del self._conns[remote]
        links = dict(self.datapath.links)
        links.pop(remote, None)
        self.datapath.links = links
        self.datapath.switch.macs.forget_peer(remote)

    def control(self, remote: int, conn_uid: int, msg: ControlMessage) -> None:
        entry = self._conns.get(remote)
        if entry is None or entry.info.conn_uid != conn_uid or msg.overlay != OVERLAY_NAME:
            return
        self._perform(remote, entry.ctl.control(SleeveControl(msg.subtag), msg.data, self._clock()))
        self._wake.set()

    def status(self, remote: int) -> OverlayStatus | None:
        entry = self._conns.get(remote)
        if entry is None:
            return None
        return OverlayStatus(OVERLAY_NAME, entry.link.cipher is not None, entry.ctl.mtu)

    def reverify_mtu(self, remote: int) -> None:
        """Probe the path MTU again (e.g. fastdp just lost full-size heartbeats to it)."""
        entry = self._conns.get(remote)
        if entry is not None:
            self._perform(remote, entry.ctl.reverify(self._clock()))
            self._wake.set()

    def datapath_stats(self) -> dict[str, int]:
        return dict(self.datapath.stats)

    # -- special frames, from the data path's receiving thread

    def _special_from_thread(self, sender: int, address: tuple[str, int], frame: bytes) -> None:
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._special_safely, sender, address, frame)
        except trio.RunFinishedError:
            pass

    def _special_safely(self, sender: int, address: tuple[str, int], frame: bytes) -> None:
        # Run by trio.run_sync_soon: an exception there ends the whole trio run (the daemon).
        try:
            self._special(sender, address, frame)
        except Exception as exc:
            ratelog.reject(log, "sleeve", "internal_error", "sleeve: a special frame from %s raised %s: %s",
                           address[0], type(exc).__name__, exc, level=logging.ERROR)

    def _special(self, sender: int, address: tuple[str, int], frame: bytes) -> None:
        entry = self._conns.get(sender)
        if entry is None:
            return
        kind = classify_special(frame)
        now = self._clock()
        if kind is SpecialFrame.HEARTBEAT:
            actions = entry.ctl.heartbeat(heartbeat_conn_uid(frame), address, now)
        elif kind in (SpecialFrame.FRAGMENTATION_TEST, SpecialFrame.PMTU_PROBE):
            actions = entry.ctl.special_frame_ack(len(frame))
        else:
            return
        self._perform(sender, actions)
        self._wake.set()

    # -- actions and timers

    def _perform(self, remote: int, actions: list[Action]) -> None:
        entry = self._conns.get(remote)
        if entry is None:
            return
        info, ctl, link = entry.info, entry.ctl, entry.link
        link.address = ctl.address
        link.frag_ok = ctl.frag_ok
        for action in actions:
            if isinstance(action, SendFrame):
                self.datapath.send_special(remote, action.frame, action.df)
            elif isinstance(action, SendControl):
                self.host.overlay_send(remote, info.conn_uid, ControlMessage(OVERLAY_NAME, action.subtag,
                                                                             action.body))
            elif isinstance(action, Established):
                link.established = True
                self.host.overlay_established(remote, info.conn_uid)
            elif isinstance(action, MtuChanged):
                link.mtu = action.mtu
            elif isinstance(action, Failed):
                log.info("sleeve: link to %s failed: %s", _who(info), action.reason)
                self.host.overlay_failed(remote, info.conn_uid, action.reason)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.datapath.start()
        try:
            task_status.started()
            next_sweep = self._clock() + MAC_SWEEP_INTERVAL
            while True:
                now = self._clock()
                for remote, entry in list(self._conns.items()):
                    if entry.ctl.next_deadline() <= now:
                        self._perform(remote, entry.ctl.tick(now))
                if now >= next_sweep:
                    self.datapath.switch.expire_macs()
                    next_sweep = now + MAC_SWEEP_INTERVAL
                deadline = min((e.ctl.next_deadline() for e in self._conns.values()), default=next_sweep)
                deadline = min(deadline, next_sweep)
                with trio.move_on_at(max(deadline, now + 0.001)):
                    await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self._token = None
            await trio.to_thread.run_sync(self.datapath.stop)


def _who(conn: OverlayConn) -> str:
    return f"{format_peer_name(conn.remote)}({conn.nickname})"
