"""The sleeve overlay: Ethernet frames carried in UDP datagrams on port 6783 (sans-IO core).

- ``sleeve.wire``: the plain packet format, batching, special frames, overheads and MTU;
- ``sleeve.crypto``: the encrypted packet format (NaCl secretbox, sequence numbers);
- ``sleeve.replay``: the per-decryptor replay window;
- ``sleeve.ipfrag``: ICMP "fragmentation needed" replies and IPv4 fragmentation.
"""
