"""Tests for node.metrics: exact exposition-format output."""

from __future__ import annotations

import math
import threading

import pytest

from node.system.metrics import Registry, format_value, sanitize_name


def test_counter_and_gauge_exact_output() -> None:
    reg = Registry()
    requests = reg.counter("enjambre_requests_total", "HTTP requests served", ["route", "code"])
    sessions = reg.gauge("enjambre_sessions", "Open inference sessions")
    requests.inc(route="/api/chat", code=200)
    requests.inc(2, route="/api/chat", code=200)
    requests.inc(route="/v1/models", code=401)
    sessions.set(3)
    sessions.dec()
    assert reg.render() == (
        "# HELP enjambre_requests_total HTTP requests served\n"
        "# TYPE enjambre_requests_total counter\n"
        'enjambre_requests_total{route="/api/chat",code="200"} 3\n'
        'enjambre_requests_total{route="/v1/models",code="401"} 1\n'
        "# HELP enjambre_sessions Open inference sessions\n"
        "# TYPE enjambre_sessions gauge\n"
        "enjambre_sessions 2\n"
    )
    assert requests.value(route="/api/chat", code="200") == 3


def test_unlabelled_metric_starts_at_zero_and_labelled_has_no_samples() -> None:
    reg = Registry()
    reg.counter("a_total", "A")
    reg.gauge("b", "B", ["x"])
    assert (
        reg.render()
        == "# HELP a_total A\n# TYPE a_total counter\na_total 0\n# HELP b B\n# TYPE b gauge\n"
    )


def test_escaping_of_label_values_and_help() -> None:
    reg = Registry()
    g = reg.gauge("g", 'help with \\ backslash\nand newline "quotes stay"', ["name"])
    g.set(1.5, name='a"b\\c\nd')
    assert reg.render() == (
        '# HELP g help with \\\\ backslash\\nand newline "quotes stay"\n'
        "# TYPE g gauge\n"
        'g{name="a\\"b\\\\c\\nd"} 1.5\n'
    )


def test_callbacks_read_at_scrape_time() -> None:
    reg = Registry()
    peers = [1]
    stats: dict[str, object] = {"sent": 5, "dropped": 0, "name": "not a number", "ok": True}
    reg.gauge_callback("enjambre_peers_known", "Peers in the DHT routing table", lambda: peers[0])
    reg.counters_from_dict("enjambre_transport", "Transport counters", lambda: stats)
    peers[0] = 4
    assert reg.render() == (
        "# HELP enjambre_peers_known Peers in the DHT routing table\n"
        "# TYPE enjambre_peers_known gauge\n"
        "enjambre_peers_known 4\n"
        "# HELP enjambre_transport_dropped_total Transport counters: dropped\n"
        "# TYPE enjambre_transport_dropped_total counter\n"
        "enjambre_transport_dropped_total 0\n"
        "# HELP enjambre_transport_sent_total Transport counters: sent\n"
        "# TYPE enjambre_transport_sent_total counter\n"
        "enjambre_transport_sent_total 5\n"
    )


def test_labelled_callback_and_gauges_from_dict() -> None:
    reg = Registry()
    reg.gauge_callback(
        "enjambre_model_pieces", "Pieces held", lambda: {("m1",): 10, ("m0",): 2}, ["model"]
    )
    reg.gauges_from_dict("enjambre_store", "Store", lambda: {"bytes.used": 1024, "9lives": 0.25})
    assert reg.render() == (
        "# HELP enjambre_model_pieces Pieces held\n"
        "# TYPE enjambre_model_pieces gauge\n"
        'enjambre_model_pieces{model="m0"} 2\n'
        'enjambre_model_pieces{model="m1"} 10\n'
        "# HELP enjambre_store__9lives Store: 9lives\n"
        "# TYPE enjambre_store__9lives gauge\n"
        "enjambre_store__9lives 0.25\n"
        "# HELP enjambre_store_bytes_used Store: bytes.used\n"
        "# TYPE enjambre_store_bytes_used gauge\n"
        "enjambre_store_bytes_used 1024\n"
    )


def test_failing_callback_does_not_break_scrape() -> None:
    reg = Registry()

    def broken() -> float:
        raise RuntimeError("component gone")

    reg.gauge_callback("bad", "Broken", broken)
    reg.gauge("good", "Good").set(1)
    assert reg.render() == "# HELP good Good\n# TYPE good gauge\ngood 1\n"


def test_empty_registry_renders_empty() -> None:
    assert Registry().render() == ""


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3, "3"),
        (2.0, "2"),
        (0.5, "0.5"),
        (True, "1"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
        (1e300, "1e+300"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


def test_sanitize_name() -> None:
    assert sanitize_name("a.b-c d") == "a_b_c_d"
    assert sanitize_name("1st") == "_1st"
    assert sanitize_name("") == "_"


def test_user_errors() -> None:
    reg = Registry()
    c = reg.counter("x_total", "X", ["kind"])
    with pytest.raises(ValueError, match="already registered"):
        reg.gauge("x_total", "again")
    with pytest.raises(ValueError, match="invalid metric name"):
        reg.gauge("1bad", "B")
    with pytest.raises(ValueError, match="invalid metric name"):
        reg.gauge("trailing_newline\n", "B")
    with pytest.raises(ValueError, match="invalid label name"):
        reg.gauge("ok", "B", ["__reserved"])
    with pytest.raises(ValueError, match="duplicate label"):
        reg.gauge("ok2", "B", ["a", "a"])
    with pytest.raises(ValueError, match=r"takes labels \['kind'\]"):
        c.inc(other="y")
    with pytest.raises(ValueError, match="can only go up"):
        c.inc(-1, kind="a")


def test_concurrent_increments_are_not_lost() -> None:
    reg = Registry()
    c = reg.counter("hits_total", "Hits")

    def work() -> None:
        for _ in range(2000):
            c.inc()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value() == 8000
