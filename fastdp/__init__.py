"""fastdp: the kernel VXLAN data path (DESIGN.md §4).

pyweave's fast data path is one Linux kernel VXLAN device (``vxlan-6784``) enslaved to
the bridge ``weave`` as an ``isolated`` port, with one all-zero FDB entry per peer whose
link is healthy (head-end replication); the kernel learns unicast MACs. It is *not*
Weave's Open vSwitch datapath and is never advertised as Weave's "fastdp" overlay: to
other pyweave peers it is the overlay called ``"vxlan"`` (:data:`fastdp.vxlan.OVERLAY_NAME`).

Modules:

- :mod:`fastdp.vxlan` (driver): create/remove the VXLAN device, manage its FDB.
- :mod:`fastdp.probe` (sans-IO codec + driver): heartbeats that travel the real VXLAN
  path, built in userspace and read back from a probe port on the peer's bridge.
- :mod:`fastdp.health` (sans-IO): per-peer health state machine driven by heartbeats.
- :mod:`fastdp.linkkey` (sans-IO): the key shares exchanged over the mesh connection
  and the per-direction keys that authenticate probe frames.
- :mod:`fastdp.srcfilter` (driver): the nftables table that lets only current peers
  send to the VXLAN port.
"""
