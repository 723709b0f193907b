"""weaveDNS: gossiped name records, the DNS answer logic and its UDP/TCP server."""
