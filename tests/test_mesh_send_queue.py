"""A peer's send queue is bounded in bytes as well as messages (issue 12: a slow peer
and big relayed broadcasts must not hold gigabytes)."""

from __future__ import annotations

from router import ratelog
from router.mesh import SEND_QUEUE_BYTES, SEND_QUEUE_LENGTH, Connection
from router.protocol import Tag


def test_the_queue_stops_at_its_byte_bound_and_counts_the_drops() -> None:
    conn = Connection(None, True, "192.0.2.1:6783", None)  # type: ignore[arg-type]  # send needs no stream
    big = b"x" * (4 << 20)
    before = ratelog.REJECTS.snapshot().get(("mesh", "send_queue_full"), 0)
    accepted = sum(conn.send(Tag.GOSSIP_BROADCAST, big) for _ in range(10))
    assert accepted == SEND_QUEUE_BYTES // (len(big) + 1)
    assert conn._queued_bytes <= SEND_QUEUE_BYTES
    assert ratelog.REJECTS.snapshot()[("mesh", "send_queue_full")] - before == 10 - accepted
    # Small messages still go once the big ones are out.
    while conn._queue:
        message, _ = conn._queue.popleft()
        conn._queued_bytes -= len(message)
    assert conn._queued_bytes == 0
    assert all(conn.send(Tag.HEARTBEAT) for _ in range(SEND_QUEUE_LENGTH))
    assert not conn.send(Tag.HEARTBEAT)
