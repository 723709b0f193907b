"""Upstream resolvers: resolv.conf parsing and re-reading, own-address filtering."""

from __future__ import annotations

import os
from pathlib import Path

from weavedns.upstream import ResolvConfWatcher, UpstreamConfig, parse_resolv_conf

RESOLV = """\
# generated
search example.com
nameserver 192.0.2.53
nameserver   172.17.0.1   # weaveDNS itself
options ndots:2
nameserver 2001:db8::1
nameserver fe80::1%eth0
nameserver not-an-address
; nameserver 192.0.2.99
nameserver
"""


def test_parse_keeps_order_and_drops_junk() -> None:
    assert parse_resolv_conf(RESOLV) == ("192.0.2.53", "172.17.0.1", "2001:db8::1", "fe80::1")


def test_own_listen_address_is_filtered() -> None:
    assert parse_resolv_conf(RESOLV, exclude=["172.17.0.1"]) == ("192.0.2.53", "2001:db8::1", "fe80::1")
    assert parse_resolv_conf(RESOLV, exclude=["2001:0db8:0::1"]) == ("192.0.2.53", "172.17.0.1", "fe80::1")


def test_watcher_checks_at_most_every_interval_and_rereads_on_mtime_change() -> None:
    w = ResolvConfWatcher(exclude=["172.17.0.1"], check_interval=5.0)
    assert w.due(100.0)
    assert w.checked(100.0, mtime=1.0)  # first look: read it
    w.load("nameserver 192.0.2.1\n", 1.0)
    assert w.servers == ("192.0.2.1",)
    assert not w.due(104.9)
    assert w.due(105.0)
    assert not w.checked(105.0, mtime=1.0)  # unchanged: keep what we have
    assert w.checked(110.0, mtime=2.0)
    w.load("nameserver 192.0.2.2\nnameserver 172.17.0.1\n", 2.0)
    assert w.servers == ("192.0.2.2",)
    assert not w.checked(115.0, mtime=None)  # file gone: keep the last good list
    assert w.servers == ("192.0.2.2",)


def test_upstream_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.1\n")
    os.utime(path, (1000, 1000))
    now = [0.0]
    cfg = UpstreamConfig(str(path), exclude=["192.0.2.9"], port=5353, clock=lambda: now[0])
    assert cfg.servers() == [("192.0.2.1", 5353)]
    path.write_text("nameserver 192.0.2.2\nnameserver 192.0.2.9\n")
    os.utime(path, (2000, 2000))
    now[0] = 4.0
    assert cfg.servers() == [("192.0.2.1", 5353)]  # not looked at again within 5 s
    now[0] = 5.0
    assert cfg.servers() == [("192.0.2.2", 5353)]
    path.unlink()
    now[0] = 20.0
    assert cfg.servers() == [("192.0.2.2", 5353)]


def test_missing_file_gives_no_servers(tmp_path: Path) -> None:
    assert UpstreamConfig(str(tmp_path / "nope")).servers() == []
