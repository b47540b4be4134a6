"""enjambre node: the daemon, its networking, and the `nodectl` CLI."""

__version__ = "0.1.0"
