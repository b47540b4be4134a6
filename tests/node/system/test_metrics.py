"""/metrics: the collectors over the parts' counters, parsed back with prometheus_client's parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from node.system.counters import Counters
from node.system.metrics import CountersCollector, GaugesCollector, new_registry, render


def _families(body: bytes) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        samples = out.setdefault(f"{family.type}:{family.name}", {})
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_counters_become_total_families_with_reason_labels() -> None:
    counters = Counters(["bytes_sent", "requests_sent"])
    counters.inc("bytes_sent", 300)
    counters.inc("dropped", reason="stale")
    counters.inc("dropped", 2, reason="bad_seal")
    peers = [3]
    registry = new_registry([
        CountersCollector("dht", counters, {"bytes_sent": "Bytes of DHT datagrams sent"}),
        GaugesCollector({"enjambre_peers_known": ("Peers in the routing table", lambda: peers[0])}),
    ])
    got = _families(render(registry))
    assert got["counter:enjambre_dht_bytes_sent"] == {("enjambre_dht_bytes_sent_total", ()): 300.0}
    # named up front: exposed at 0 before it ever happens
    assert got["counter:enjambre_dht_requests_sent"] == {("enjambre_dht_requests_sent_total", ()): 0.0}
    assert got["counter:enjambre_dht_dropped"] == {
        ("enjambre_dht_dropped_total", (("reason", "bad_seal"),)): 2.0,
        ("enjambre_dht_dropped_total", (("reason", "stale"),)): 1.0,
    }
    assert got["gauge:enjambre_peers_known"] == {("enjambre_peers_known", ()): 3.0}
    peers[0] = 5  # read at scrape time
    assert _families(render(registry))["gauge:enjambre_peers_known"] == {("enjambre_peers_known", ()): 5.0}
    assert b"# HELP enjambre_dht_bytes_sent_total Bytes of DHT datagrams sent" in render(registry)


def test_a_failing_part_does_not_blank_the_scrape() -> None:
    class Broken(Counters):
        def plain(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    good = Counters(["frames_sent"])

    def fail() -> float:
        raise RuntimeError("no gauge")

    registry = new_registry([
        CountersCollector("beacon", Broken()),
        CountersCollector("transport", good),
        GaugesCollector({"enjambre_bad": ("fails", fail), "enjambre_good": ("works", lambda: 1)}),
    ])
    got = _families(render(registry))
    assert "counter:enjambre_transport_frames_sent" in got
    assert "gauge:enjambre_good" in got
    assert not any("beacon" in name or "enjambre_bad" in name for name in got)
