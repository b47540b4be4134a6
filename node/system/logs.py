"""Logging setup for the daemon and the CLI: one format for every log line.

Owns ``configure_logging``: structlog for our own logs, and the standard ``logging``
records of libraries (kademlia, rpcudp, aiohttp, asyncio) rendered by the same
processors: their warnings and errors always, their info and debug chatter only at
level debug. JSON lines when the stream is not a terminal (journald
and ``docker logs`` store one object per line), key=value with colours on a terminal.

Secrets never reach the output: ``redact_secrets`` replaces the values of keys that
name secret material (``secret``, ``token``, ``password``, ``private_key``, ...) with
``"[redacted]"``, also inside nested dicts and lists.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["LEVELS", "LIBRARY_LEVELS", "LIBRARY_LOGGERS", "REDACTED", "configure_logging", "is_secret_key", "redact_secrets"]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("auto", "json", "console")
REDACTED = "[redacted]"

# Loggers of libraries the daemon uses, and the least level they show below debug:
# kademlia logs every datagram's answer and every crawl at info (161,000 lines, 33 MB
# per node in 37 minutes), and a warning per datagram to a peer that died ("no response
# from ..., removing from router", twenty for one death): our own DHT and pipeline log a
# departure once. jax announces each accelerator it does not find at info. At debug they
# show everything.
LIBRARY_LEVELS = {"kademlia": logging.ERROR, "rpcudp": logging.ERROR, "jax": logging.WARNING,
                  "aiohttp": logging.WARNING, "asyncio": logging.WARNING}
LIBRARY_LOGGERS = tuple(LIBRARY_LEVELS)

# Word-ish matches on the key name: "cluster_secret", "api_token", "Authorization",
# "private_key", "node_key", "psk" - but not "key_file", "public_key" or "ksize".
_SECRET_KEY = re.compile(
    r"(^|_)(secrets?|token|password|passwd|passphrase|authorization|cookie|"
    r"credentials?|psk|private_?key|priv_?key|signing_?key|api_?key|key_?material)($|_)",
    re.IGNORECASE,
)
# Not bare "key" (DHT keys are public and useful in logs), nor "tokens" / "seed" (LLM
# token counts and sampling seeds are everyday fields here).
_SECRET_EXACT = {"node_key", "cluster_key", "ca_key", "aead_key", "session_key"}
_PUBLIC_SUFFIXES = ("_file", "_path", "_id", "_len", "_size", "_count")

_OUR_HANDLER_ATTR = "_enjambre_handler"


def is_secret_key(name: str) -> bool:
    """True when a log field called ``name`` would carry secret material."""
    lowered = name.lower().replace("-", "_")
    # A path or an id derived from a secret is fine to log and helps debugging.
    if lowered.endswith(_PUBLIC_SUFFIXES) or lowered.startswith("public"):
        return False
    return lowered in _SECRET_EXACT or _SECRET_KEY.search(lowered) is not None


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            key: (REDACTED if isinstance(key, str) and is_secret_key(key) else _redact(item))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact(item) for item in value)
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hide the values of fields whose names mean secret material."""
    for key in list(event_dict):
        if key == "event":
            continue
        if is_secret_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(event_dict[key])
    return event_dict


def _drop_color_message(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    # uvicorn/aiohttp-style records may carry a duplicate coloured message.
    event_dict.pop("color_message", None)
    return event_dict


def _head_first(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    # Readers scan JSON lines left to right: time, level, source and message first.
    head = {
        k: event_dict.pop(k) for k in ("timestamp", "level", "logger", "event") if k in event_dict
    }
    head.update(event_dict)
    return head


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to ``stream`` (default stderr) in one format.

    ``level``: debug | info | warning | error. ``fmt``: auto (JSON unless ``stream`` is a
    terminal) | json | console. Calling it again replaces the previous setup.
    Raises ``ValueError`` for an unknown level or format.
    """
    out: TextIO = sys.stderr if stream is None else stream
    level_name = level.lower() if isinstance(level, str) else level
    if level_name not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; choose one of {', '.join(LEVELS)}")
    fmt_name = fmt.lower() if isinstance(fmt, str) else fmt
    if fmt_name not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose one of {', '.join(FORMATS)}")
    numeric = LEVELS[level_name]
    tty = _is_tty(out)
    as_json = fmt_name == "json" or (fmt_name == "auto" and not tty)
    colors = tty and not os.environ.get("NO_COLOR")

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_color_message,
        redact_secrets,
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
        # format_exc_info, not dict_tracebacks: the latter records frame locals, which
        # can hold secrets that the redaction by key name cannot see.
        final: list[Processor] = [structlog.processors.format_exc_info, _head_first, renderer]
    else:
        # plain_traceback: the default (rich, when installed) prints frame locals.
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
        final = [renderer]

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _OUR_HANDLER_ATTR, True)

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OUR_HANDLER_ATTR, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name, least in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(numeric if numeric == logging.DEBUG else max(numeric, least))
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Loggers are created at import time all over the code base; without caching,
        # a later configure_logging (tests, `--log-level`) takes effect everywhere.
        cache_logger_on_first_use=False,
    )
