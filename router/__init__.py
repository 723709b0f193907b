"""pyweave router: the per-host daemon, its mesh protocol and the `weave` CLI."""

__version__ = "0.1.0"
