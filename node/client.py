"""The CLI's side of the daemon's HTTP API: where the daemon is, and talking to it.

Client commands find the daemon like Ollama's ``OLLAMA_HOST``: ``--host HOST:PORT``,
else ``$ENJAMBRE_HOST``, else the API address in the config (``--config``,
``$ENJAMBRE_CONFIG``, default path). The token comes from ``--token-file``,
``$ENJAMBRE_TOKEN`` or the config's ``api.token_file``; never from the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

from node.config import DEFAULT_API_HOST, DEFAULT_API_PORT, default_config_path
from node.net.addresses import format_hostport, parse_hostport

__all__ = ["DEFAULT_API", "CliError", "api_address", "call", "download", "load_config_for", "stream"]

DEFAULT_API = (DEFAULT_API_HOST, DEFAULT_API_PORT)


class CliError(Exception):
    """A user error: printed as one line, exit code 1."""


def load_config_for(args: argparse.Namespace) -> Any:
    from node.config import ConfigError, load_config

    path = Path(args.config or default_config_path()).expanduser()
    if not path.exists():
        raise CliError(f"no config at {path}; create one with `nodectl init` (or pass --config)")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def api_address(args: argparse.Namespace) -> tuple[str, int, str | None]:
    """(host, port, token) of the daemon to talk to."""
    # Never from the command line: other users can read a process's arguments.
    token = _token_from_file(args.token_file) if args.token_file else os.environ.get("ENJAMBRE_TOKEN")
    explicit = args.host or os.environ.get("ENJAMBRE_HOST")
    if explicit:
        text = explicit.removeprefix("http://")
        try:
            host, port = parse_hostport(text, default_port=DEFAULT_API[1])
        except ValueError as exc:
            raise CliError(f"bad daemon address {explicit!r}: {exc}") from None
        return host, port, token
    path = Path(args.config or default_config_path()).expanduser()
    if not path.exists():
        return DEFAULT_API[0], DEFAULT_API[1], token
    cfg = load_config_for(args)
    host, port = cfg.api.host, cfg.api.port
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if port == 0:  # the daemon picked a port and wrote it down
        from node.system.datadir import read_runtime

        runtime = read_runtime(cfg.node.data_dir) or {}
        port = int(runtime.get("api_port", 0))
    if token is None and cfg.api.token_file is not None:
        try:
            token = Path(cfg.api.token_file).read_text().strip()
        except OSError:
            token = None
    return host, port, token


def _token_from_file(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read the token file {path}: {exc.strerror}") from None


def _open(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """The daemon's response (an open HTTP response), or CliError saying what is wrong."""
    host, port, token = api_address(args)
    shown = format_hostport(host, port)
    not_running = (
        f"no enjambre daemon is answering at {shown}; start one with `nodectl serve` "
        "(or `systemctl start enjambre`), or point --host / $ENJAMBRE_HOST at a running one"
    )
    if port == 0:
        raise CliError(not_running)
    data = json.dumps({} if body is None else body).encode() if method in ("POST", "DELETE") else None
    req = urllib.request.Request(f"http://{shown}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        return urllib.request.urlopen(req, timeout=args.timeout)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise CliError(f"daemon at {shown} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError | FileNotFoundError):
            raise CliError(not_running) from None
        raise CliError(f"{not_running} ({reason})") from None




def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One request, one JSON answer ({} for an empty body, as /api/copy answers)."""
    with _open(args, method, path, body) as resp:
        data = resp.read()
    return json.loads(data) if data.strip() else {}


def stream(args: argparse.Namespace, method: str, path: str,
           body: Any = None) -> Generator[dict[str, Any], None, None]:
    """One request, an NDJSON answer: each line as it comes."""
    with _open(args, method, path, body) as resp:
        for line in resp:
            if line.strip():
                yield json.loads(line)


def download(args: argparse.Namespace, path: str) -> Iterator[bytes]:
    with _open(args, "GET", path) as resp:
        while chunk := resp.read(1 << 20):
            yield chunk
