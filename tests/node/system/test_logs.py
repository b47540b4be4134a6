"""Tests for node.logs: JSON and console output, stdlib routing, levels, redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from node.system.logs import (
    LIBRARY_LEVELS,
    LIBRARY_LOGGERS,
    REDACTED,
    configure_logging,
    is_secret_key,
    redact_secrets,
)


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    library_levels = {n: logging.getLogger(n).level for n in LIBRARY_LOGGERS}
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
        for name, lib_level in library_levels.items():
            logging.getLogger(name).setLevel(lib_level)
        logging.captureWarnings(False)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_format_one_object_per_line() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    structlog.get_logger("node.test").info("peer joined", peer="abc", port=7420)
    [line] = json_lines(out)
    assert line["event"] == "peer joined"
    assert line["peer"] == "abc" and line["port"] == 7420
    assert line["level"] == "info" and line["logger"] == "node.test"
    assert str(line["timestamp"]).endswith("Z")
    assert list(line)[:4] == ["timestamp", "level", "logger", "event"]


def test_auto_is_json_when_not_a_tty() -> None:
    out = io.StringIO()
    configure_logging("info", "auto", out)
    structlog.get_logger().warning("x", n=1)
    assert json_lines(out)[0]["n"] == 1


def test_auto_is_console_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")  # keep ANSI codes out of the assertion
    out = FakeTty()
    configure_logging("info", "auto", out)
    structlog.get_logger("node.test").info("serving", port=7422, name="box")
    text = out.getvalue()
    assert not text.lstrip().startswith("{")
    assert "serving" in text and "port=7422" in text and "name=box" in text
    assert "[info" in text and "\x1b[" not in text


def test_console_format_on_plain_stream_has_no_colours() -> None:
    out = io.StringIO()
    configure_logging("debug", "console", out)
    structlog.get_logger().debug("tick", step=3)
    assert "tick" in out.getvalue() and "step=3" in out.getvalue()
    assert "\x1b[" not in out.getvalue()


def test_stdlib_loggers_use_same_format_and_level() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    logging.getLogger("kademlia.network").error("bootstrap %s failed", "10.0.0.2")
    logging.getLogger("kademlia.network").warning("no response from 10.0.0.3")  # one per datagram: hidden
    logging.getLogger("kademlia.network").debug("noise")
    logging.getLogger("rpcudp.protocol").error("datagram")
    logging.getLogger("node.other").info("ours")  # a stdlib logger of our own keeps the configured level
    lines = json_lines(out)
    assert [line["event"] for line in lines] == ["bootstrap 10.0.0.2 failed", "datagram", "ours"]
    assert lines[0]["logger"] == "kademlia.network" and lines[0]["level"] == "error"


@pytest.mark.parametrize("level", ["info", "warning", "debug"])
def test_library_chatter_only_at_debug(level: str) -> None:
    # kademlia's per-datagram info lines once made 33 MB of log per node in 37 minutes.
    out = io.StringIO()
    configure_logging(level, "json", out)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(f"{name}.protocol").info("got successful response from %s", "10.0.0.2")
        logging.getLogger(f"{name}.protocol").warning("%s is unhappy", name)
        logging.getLogger(f"{name}.protocol").error("%s failed", name)
    structlog.get_logger("node.dht").info("our info")
    events = [line["event"] for line in json_lines(out)]
    if level == "debug":
        assert events == [e for name in LIBRARY_LOGGERS for e in ("got successful response from 10.0.0.2",
                                                                   f"{name} is unhappy", f"{name} failed")
                          ] + ["our info"]
        return
    # kademlia and rpcudp warn once per datagram to a dead peer: errors only; the others warn.
    shown = [e for name in LIBRARY_LOGGERS for e in ((f"{name} is unhappy",) if LIBRARY_LEVELS[name] <= logging.WARNING
                                                      else ()) + (f"{name} failed",)]
    assert events == ([*shown, "our info"] if level == "info" else shown)
    assert "kademlia is unhappy" not in events and "jax is unhappy" in events


def test_level_filters_structlog_and_stdlib() -> None:
    out = io.StringIO()
    configure_logging("warning", "json", out)
    log = structlog.get_logger("node.test")
    log.info("hidden")
    log.warning("shown")
    logging.getLogger("aiohttp.server").info("hidden too")
    logging.getLogger("aiohttp.server").error("shown too")
    assert [line["event"] for line in json_lines(out)] == ["shown", "shown too"]


def test_debug_level_shows_library_debug() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    logging.getLogger("kademlia.crawling").debug("crawl")
    assert json_lines(out)[0]["event"] == "crawl"


def test_reconfigure_replaces_handler_and_applies_to_existing_loggers() -> None:
    first, second = io.StringIO(), io.StringIO()
    log = structlog.get_logger("node.early")  # created before configuration, like module globals
    configure_logging("info", "json", first)
    log.info("one")
    configure_logging("info", "json", second)
    log.info("two")
    assert [line["event"] for line in json_lines(first)] == ["one"]
    assert [line["event"] for line in json_lines(second)] == ["two"]
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_enjambre_handler", False)]
    assert len(ours) == 1


def test_secrets_are_redacted_in_json() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    structlog.get_logger().info(
        "joined",
        secret="hunter2",
        cluster_secret="s3cr3t-value",
        api_token="tok-value",
        password="pw-value",
        private_key=b"\x01\x02",
        Authorization="Bearer abc",
        key_file="/var/lib/enjambre/node.key",
        public_key="ab12",
        node_id="deadbeef",
        peers=[{"token": "inner", "id": 1}],
        nested={"level2": {"psk": "x", "port": 1}},
    )
    [line] = json_lines(out)
    for name in (
        "secret",
        "cluster_secret",
        "api_token",
        "password",
        "private_key",
        "Authorization",
    ):
        assert line[name] == REDACTED, name
    assert line["key_file"] == "/var/lib/enjambre/node.key"
    assert line["public_key"] == "ab12" and line["node_id"] == "deadbeef"
    assert line["peers"] == [{"token": REDACTED, "id": 1}]
    assert line["nested"] == {"level2": {"psk": REDACTED, "port": 1}}
    for leaked in ("hunter2", "s3cr3t-value", "tok-value", "pw-value", "Bearer abc", "inner"):
        assert leaked not in out.getvalue()


def test_secrets_are_redacted_in_console_and_stdlib_extra() -> None:
    out = io.StringIO()
    configure_logging("info", "console", out)
    structlog.get_logger().info("login", token="abc123secret")
    logging.getLogger("aiohttp.server").warning("request", extra={"password": "pw-value"})
    text = out.getvalue()
    assert "abc123secret" not in text and "pw-value" not in text
    assert f"token={REDACTED}" in text and f"password={REDACTED}" in text


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_exception_tracebacks_without_locals(fmt: str) -> None:
    out = io.StringIO()
    configure_logging("info", fmt, out)
    secret_value = "very-secret-local"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger().exception("failed")
    assert "RuntimeError: boom" in out.getvalue()
    assert secret_value not in out.getvalue()


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("secret", True),
        ("cluster_secret", True),
        ("token", True),
        ("bearer_token", True),
        ("Password", True),
        ("private_key", True),
        ("privkey", True),
        ("key", False),
        ("node_key", True),
        ("api-key", True),
        ("key_material", True),
        ("seed", False),
        ("key_file", False),
        ("secret_file", False),
        ("token_file", False),
        ("public_key", False),
        ("node_id", False),
        ("ksize", False),
        ("keys_known", False),
        ("tokens_generated", False),
        ("n_tokens", False),
        ("max_tokens", False),
        ("token_count", False),
    ],
)
def test_is_secret_key(name: str, secret: bool) -> None:
    assert is_secret_key(name) is secret


def test_redact_processor_leaves_event_alone() -> None:
    out = redact_secrets(None, "info", {"event": "token refreshed", "token": "x"})
    assert out == {"event": "token refreshed", "token": REDACTED}


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "json"), ("info", "xml")])
def test_bad_level_or_format(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(level, fmt, io.StringIO())
