"""The error the DHT raises for what a caller or the config got wrong."""

from __future__ import annotations

__all__ = ["DHTError"]


class DHTError(Exception):
    """A DHT operation could not be carried out (message says why and what to do)."""
