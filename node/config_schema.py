"""Config schema: every section and key of the node's TOML file, declared once.

A section is a frozen dataclass, so callers get typed attributes (``config.network.
peer_port``) that mypy checks. Each of its fields is one key, and the field's metadata
(``key(...)``) carries everything else about it: the converter that checks it, its
default, and the doc text that ``nodectl init`` and ``configs/node.example.toml``
print above it. The loader (``node.config``) and the writer (``node.config_render``)
walk these declarations with ``sections()`` / ``keys()``; nothing repeats the list.

Defaults are written the way a user would write them in the file (``"4MiB"``, not
``4194304``) and go through the same converter as a user's value, so a default can
never be one the loader would refuse, and the file shows it in its readable form.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

from node import config_values as v
from node.net.addresses import is_loopback_host
from node.system.logs import FORMATS, LEVELS

__all__ = [
    "COMPUTE_DTYPES",
    "DEFAULT_API_HOST",
    "DEFAULT_API_PORT",
    "DEFAULT_BEACON_GROUP",
    "DEFAULT_BEACON_PORT",
    "DEFAULT_DHT_PORT",
    "DEFAULT_LISTEN",
    "DEFAULT_PEER_PORT",
    "KV_DTYPES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_PIECE_SIZE",
    "MIN_PIECE_SIZE",
    "RENAMED",
    "WEIGHT_FORMATS",
    "ApiSection",
    "ClusterSection",
    "Config",
    "DhtSection",
    "EngineSection",
    "Key",
    "LogSection",
    "NetworkSection",
    "NodeSection",
    "ResourcesSection",
    "SwarmSection",
    "default_data_dir",
    "keys",
    "sections",
]

# The defaults other modules need too (the CLI's flags, the beacon): defined here only.
DEFAULT_LISTEN = "127.0.0.1"
DEFAULT_PEER_PORT = 7420
DEFAULT_DHT_PORT = 7421
DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 7422
DEFAULT_BEACON_GROUP = "239.255.74.20"
DEFAULT_BEACON_PORT = 7423

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHT_FORMATS = ("native", "int8")
KV_DTYPES = ("auto", "float32", "float16", "bfloat16")  # node/engine/config.py's KV_DTYPES
LOG_LEVELS = tuple(LEVELS)
LOG_FORMATS = tuple(FORMATS)
MIN_PIECE_SIZE = 16 * 1024
MAX_PIECE_SIZE = 64 * 1024 * 1024

# Keys that had another name once: an old file gets told the new name instead of
# "unknown key". Dotted old name -> dotted new name.
RENAMED: dict[str, str] = {
    # Renamed because inside the DHT "refresh" is kademlia's bucket refresh.
    "dht.refresh_interval": "dht.republish_interval",
}


@dataclass(frozen=True)
class Key:
    """What the schema knows about one key, beyond its name and Python type."""

    convert: v.Convert
    doc: str
    # The default as written in TOML; None = no fixed default (see computed / required).
    default: Any = None
    # A default that depends on the machine or on earlier keys of the section.
    computed: Callable[[Mapping[str, Any]], Any] | None = None
    required: bool = False
    # What the written file shows, commented out, for a key without a fixed default.
    example: Any = None

    @property
    def shown(self) -> Any:
        """The value the written file shows for this key when it is not set."""
        return self.default if self.default is not None else self.example


_META = "enjambre.config"


def key(
    convert: v.Convert,
    doc: str,
    *,
    default: Any = None,
    computed: Callable[[Mapping[str, Any]], Any] | None = None,
    required: bool = False,
    example: Any = None,
) -> dict[str, Key]:
    """Field metadata for one key: ``name: str = field(metadata=key(...))``."""
    return {_META: Key(convert, doc, default, computed, required, example)}


def default_data_dir() -> Path:
    """Where a node keeps its key, pieces and caches when the config does not say.

    ``$STATE_DIRECTORY`` first (systemd sets it from ``StateDirectory=``; a service
    with ``ProtectHome=yes`` cannot write under a home directory), then
    ``$XDG_DATA_HOME/enjambre``, then ``~/.local/share/enjambre``.
    """
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        # systemd passes a colon-separated list when several are configured.
        return Path(state.split(":")[0])
    base = os.environ.get("XDG_DATA_HOME")
    root = Path(base).expanduser() if base else Path.home() / ".local" / "share"
    return root / "enjambre"


# ---------------------------------------------------------------------------------------
# Sections, in the order the file lists them. A section's docstring heads it in the file.


@dataclass(frozen=True, slots=True)
class NodeSection:
    """This machine: its name, where it keeps its state, and its identity key."""

    name: str = field(
        metadata=key(
            v.node_name,
            "Name shown in `nodectl status` and in logs. Default: the machine's hostname.",
            computed=lambda _: socket.gethostname() or "node",
            example="workstation-1",
        )
    )
    data_dir: Path = field(
        metadata=key(
            v.path,
            "Where the node keeps its key, model pieces and caches. Default: "
            "$STATE_DIRECTORY (set by systemd), else $XDG_DATA_HOME/enjambre, "
            "else ~/.local/share/enjambre.",
            computed=lambda _: default_data_dir(),
            example="/var/lib/enjambre",
        )
    )
    key_file: Path = field(
        metadata=key(
            v.path,
            "The node's Ed25519 private key (created by `nodectl init`). Must be "
            'chmod 600. Default: "node.key" inside data_dir.',
            computed=lambda section: Path(section["data_dir"]) / "node.key",
            example="/var/lib/enjambre/node.key",
        )
    )


@dataclass(frozen=True, slots=True)
class ClusterSection:
    """Which cluster this node belongs to."""

    secret_file: Path = field(
        metadata=key(
            v.path,
            "REQUIRED. The cluster secret shared by every node of the cluster: knowing "
            "it is membership. Must exist and be chmod 600. `nodectl init --new-cluster` "
            "creates it on the first node; on the others, save the output of "
            "`nodectl secret` (run on any member) to a file and run "
            "`nodectl init --secret-file FILE`.",
            required=True,
            example="cluster.secret",
        )
    )
    allow: tuple[str, ...] = field(
        metadata=key(
            v.node_names,
            "Nodes (names or ids) that may serve layers of a model this node plans or "
            "adopts; empty = every member. Every member holds the secret: this is how an "
            "operator keeps a machine it does not trust out of the pipelines it drives.",
            default=[],
        )
    )
    deny: tuple[str, ...] = field(
        metadata=key(
            v.node_names,
            "Nodes (names or ids) that never serve layers of a model this node plans or "
            "adopts (a plan naming one is re-planned without it).",
            default=[],
        )
    )


@dataclass(frozen=True, slots=True)
class NetworkSection:
    """How this node reaches its peers and how they find it."""

    listen: str = field(
        metadata=key(
            v.listen_address,
            "The IP address this node binds and tells its peers to dial. Must be a "
            "concrete address (not 0.0.0.0): use this machine's LAN address, e.g. "
            '"192.168.1.20". The default only lets nodes on this same machine connect.',
            default=DEFAULT_LISTEN,
        )
    )
    peer_port: int = field(
        metadata=key(
            v.port(allow_zero=True),
            "TCP port for encrypted peer streams (activations, model pieces). "
            "0 = let the OS pick a free port (it is advertised in the DHT).",
            default=DEFAULT_PEER_PORT,
        )
    )
    dht_port: int = field(
        metadata=key(
            v.port(allow_zero=True),
            "UDP port of the DHT. 0 = let the OS pick a free port.",
            default=DEFAULT_DHT_PORT,
        )
    )
    bootstrap: tuple[tuple[str, int], ...] = field(
        metadata=key(
            v.bootstrap,
            'DHT addresses ("HOST:PORT") of nodes already in the cluster, used to join. '
            'IPv6 needs brackets: "[fd00::2]:7421". Host names are allowed. '
            "Empty is fine when discovery finds peers on the LAN.",
            default=[],
        )
    )
    discovery: bool = field(
        metadata=key(
            v.as_bool, "Find peers with a UDP multicast beacon on the LAN.", default=True
        )
    )
    beacon_group: str = field(
        metadata=key(
            v.multicast_group,
            "Multicast group of the beacon. All nodes of a LAN must agree.",
            default=DEFAULT_BEACON_GROUP,
        )
    )
    beacon_port: int = field(
        metadata=key(
            v.port(allow_zero=False),
            "UDP port of the beacon. All nodes of a LAN must agree, so it cannot be 0.",
            default=DEFAULT_BEACON_PORT,
        )
    )
    beacon_interval: float = field(
        metadata=key(v.positive_seconds, "Seconds between beacons.", default=5.0)
    )
    allow_public: bool = field(
        metadata=key(
            v.as_bool,
            "Refuse peers (and this node's own listen address) outside private, "
            "link-local and loopback ranges unless set to true. enjambre is LAN software.",
            default=False,
        )
    )


@dataclass(frozen=True, slots=True)
class ApiSection:
    """The HTTP API: Ollama /api/*, OpenAI /v1/* and the cluster endpoints."""

    host: str = field(
        metadata=key(
            v.api_host,
            "Address the HTTP API binds. Anything other than loopback exposes it to "
            "the network and requires token_file.",
            default=DEFAULT_API_HOST,
        )
    )
    port: int = field(
        metadata=key(
            v.port(allow_zero=True),
            "TCP port of the HTTP API. 0 = let the OS pick a free port.",
            default=DEFAULT_API_PORT,
        )
    )
    token_file: Path | None = field(
        metadata=key(
            v.path,
            "File holding the bearer token clients must send (Authorization: Bearer ...). "
            "Must exist and be chmod 600. Required when host is not loopback. "
            "Default: none (no token).",
            example="api.token",
        )
    )
    allowed_origins: tuple[str, ...] = field(
        metadata=key(
            v.origins,
            "Web pages (origins, e.g. \"http://192.168.1.20:3000\" for a chat front end) that "
            "may call the API from a browser. Requests from any other page are refused, so "
            "a web page open on this machine cannot use the API behind your back.",
            default=[],
        )
    )

    @property
    def is_loopback(self) -> bool:
        """True when the API is reachable only from this machine."""
        return is_loopback_host(self.host)


@dataclass(frozen=True, slots=True)
class ResourcesSection:
    """What this machine lends to the cluster."""

    # Bytes; None = decided at start by node.cluster.capabilities.
    max_memory: int | None = field(
        metadata=key(
            v.size(minimum=1),
            "Most memory the node lends to the cluster (weights + KV cache), as a size. "
            "Default: 75% of the memory available when the node starts, never more than "
            "is available.",
            example="12 GiB",
        )
    )


@dataclass(frozen=True, slots=True)
class DhtSection:
    """The distributed hash table the nodes publish themselves and their models in."""

    republish_interval: float = field(
        metadata=key(
            v.positive_seconds,
            "Seconds between re-publishing this node's records (was refresh_interval).",
            default=10.0,
        )
    )
    record_ttl: float = field(
        metadata=key(
            v.positive_seconds,
            "Seconds a record lives without being re-published; must be longer than "
            "republish_interval.",
            default=30.0,
        )
    )
    ksize: int = field(
        metadata=key(v.int_range(1, 256), "Kademlia bucket size (k), 1-256.", default=20)
    )
    alpha: int = field(
        metadata=key(
            v.int_range(1, 64),
            "Kademlia lookup parallelism (alpha), 1-64 and at most ksize.",
            default=3,
        )
    )


@dataclass(frozen=True, slots=True)
class EngineSection:
    """The inference engine."""

    max_context: int = field(
        metadata=key(
            v.int_range(1),
            "Longest context (prompt + generated tokens) a session may reach.",
            default=4096,
        )
    )
    compute_dtype: str = field(
        metadata=key(
            v.choice(COMPUTE_DTYPES),
            f"dtype used for compute: {' | '.join(COMPUTE_DTYPES)}. "
            "auto = the engine picks one the device runs well.",
            default="auto",
        )
    )
    weights: str = field(
        metadata=key(
            v.choice(WEIGHT_FORMATS),
            "How matrices are held: native (the compute dtype) | int8 (per-row int8 with "
            "float32 scales: a quarter of float32's memory; W8A8 matmuls on CPU).",
            default="native",
        )
    )
    kv_dtype: str = field(
        metadata=key(
            v.choice(KV_DTYPES),
            f"dtype the KV cache is held in: {' | '.join(KV_DTYPES)}. auto = float16 beside "
            "float32 compute (half the cache's memory; greedy output as with a float32 "
            "cache in the engine's measurements), else the compute dtype.",
            default="auto",
        )
    )
    max_sessions: int = field(
        metadata=key(
            v.int_range(1, 256),
            "Sessions a loaded model serves at once (KV cache slots on every node of its "
            "plan); requests beyond them wait in the queue.",
            default=4,
        )
    )
    queue: int = field(
        metadata=key(
            v.int_range(0, 4096),
            "Requests this node holds waiting for a session; beyond them the API answers 503.",
            default=16,
        )
    )
    keep_alive: float = field(
        metadata=key(
            v.positive_seconds,
            "Seconds a loaded model stays loaded without requests (Ollama's keep_alive).",
            default=300.0,
        )
    )
    step_timeout: float = field(
        metadata=key(
            v.positive_seconds,
            "Seconds a pipeline step may take before the node holding it is treated as "
            "failed and the session is rebuilt on the others.",
            default=60.0,
        )
    )
    prefill_chunk: int = field(
        metadata=key(
            v.int_range(16, 8192),
            "Prompt tokens per prefill call: a long prompt is prefilled in chunks "
            "interleaved with the other sessions' decode steps.",
            default=256,
        )
    )
    max_rtt_ms: float = field(
        metadata=key(
            v.positive_seconds,
            "Plans leave out a node whose round trip to the others exceeds this "
            "(milliseconds), unless the model does not fit without it.",
            default=50.0,
        )
    )
    compile_cache: Path | None = field(
        metadata=key(
            v.path,
            "Directory of XLA's persistent compilation cache. Daemons on one machine may "
            "share one (a node taking over a range another compiled loads it in a fraction "
            "of a second). Default: xla-cache in the data dir.",
            example="/var/cache/enjambre/xla",
        )
    )


@dataclass(frozen=True, slots=True)
class SwarmSection:
    """Sharing model files between nodes, piece by verified piece."""

    piece_size: int = field(
        metadata=key(
            v.size(minimum=MIN_PIECE_SIZE, maximum=MAX_PIECE_SIZE),
            "Size of one verified piece of a model file (16 KiB to 64 MiB). All nodes "
            "importing a model should use the same piece size: it is part of the manifest.",
            default="4MiB",
        )
    )
    max_upload_rate: int = field(  # bytes/s, 0 = unlimited
        metadata=key(
            v.size(), "Upload limit per second for model pieces (a size); 0 = unlimited.", default=0
        )
    )
    max_download_rate: int = field(  # bytes/s, 0 = unlimited
        metadata=key(
            v.size(),
            "Download limit per second for model pieces (a size); 0 = unlimited.",
            default=0,
        )
    )
    share: bool = field(
        metadata=key(
            v.as_bool,
            "Serve the pieces this node fetched to other nodes. Off, it serves only the models "
            "it imported itself (everyone else fetches from those).",
            default=True,
        )
    )


@dataclass(frozen=True, slots=True)
class LogSection:
    """What the daemon logs and how."""

    level: str = field(
        metadata=key(v.choice(LOG_LEVELS), " | ".join(LOG_LEVELS), default="info")
    )
    format: str = field(
        metadata=key(
            v.choice(LOG_FORMATS),
            "auto (JSON lines when not on a terminal, e.g. under systemd; readable "
            "key=value on a terminal) | json | console",
            default="auto",
        )
    )


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeSection
    cluster: ClusterSection
    network: NetworkSection
    api: ApiSection
    resources: ResourcesSection
    dht: DhtSection
    engine: EngineSection
    swarm: SwarmSection
    log: LogSection
    path: Path  # the file it was loaded from


# ---------------------------------------------------------------------------------------
# Walking the declarations


@cache
def sections() -> Mapping[str, type]:
    """Section name -> section dataclass, in file order (the fields of ``Config``)."""
    hints = get_type_hints(Config)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(Config)
        if dataclasses.is_dataclass(hints[f.name])
    }


@cache
def keys(section: type) -> Mapping[str, Key]:
    """Key name -> ``Key`` of one section dataclass, in file order."""
    return {f.name: f.metadata[_META] for f in dataclasses.fields(section)}
