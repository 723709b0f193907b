"""IPAM: Weave Net's address allocator, as a sans-IO core.

- `address`: IPv4 addresses, ranges and CIDRs as integers.
- `ring`: the ring CRDT saying which peer owns which part of the range.
- `space`: the addresses this peer owns, free and in use.
- `paxos`: single-value Paxos used to agree on the peers that seed the ring.
- `wire`: gob schemas and codecs for the `IPallocation` gossip channel.
- `allocator`: the state machine tying these together (a `router.gossip_api.Gossiper`).
- `store`: sqlite persistence of the ring and of allocations.
"""
