"""``GET /metrics``: Prometheus collectors over the counters the node's parts keep.

The parts (transport, DHT, beacon) count with ``node.system.counters.Counters`` and
know nothing of Prometheus; at scrape time ``CountersCollector`` turns one part's
counters into ``enjambre_<part>_<name>_total`` families (a ``reason`` label where
the part counts by reason) and ``GaugesCollector`` reads levels (peers known,
records held) from callables. ``prometheus_client`` does the exposition format, and
its histograms serve request latency and tokens per second when they arrive.

A collector that fails is logged and skipped, so one broken part never blanks the
whole scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.system.counters import Counters

__all__ = ["CONTENT_TYPE", "CountersCollector", "GaugesCollector", "new_registry", "render"]

log = structlog.get_logger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class CountersCollector(Collector):
    """One part's counters as ``enjambre_<part>_<name>_total`` counter families."""

    def __init__(self, part: str, counters: Counters, help: Mapping[str, str] | None = None) -> None:
        self._prefix = f"enjambre_{part}"
        self._part = part
        self._counters = counters
        self._help = dict(help or {})

    def _doc(self, name: str) -> str:
        return self._help.get(name, f"{self._part}: {name.replace('_', ' ')}")

    def collect(self) -> Iterator[Metric]:
        try:
            families: list[Metric] = []
            for name, value in self._counters.plain():
                families.append(CounterMetricFamily(f"{self._prefix}_{name}", self._doc(name), value=value))
            for name, reasons in self._counters.by_reason():
                family = CounterMetricFamily(
                    f"{self._prefix}_{name}", self._doc(name), labels=["reason"]
                )
                for reason, value in sorted(reasons.items()):
                    family.add_metric([reason], value)
                families.append(family)
        except Exception as exc:  # never let one part blank the scrape
            log.warning("metric collector failed", part=self._part, error=repr(exc))
            return
        yield from families


class GaugesCollector(Collector):
    """Levels read at scrape time: name -> (help, read)."""

    def __init__(self, gauges: Mapping[str, tuple[str, Callable[[], float]]]) -> None:
        self._gauges = dict(gauges)

    def collect(self) -> Iterator[Metric]:
        for name, (doc, read) in self._gauges.items():
            try:
                value = float(read())
            except Exception as exc:
                log.warning("metric gauge failed", metric=name, error=repr(exc))
                continue
            yield GaugeMetricFamily(name, doc, value=value)


def new_registry(collectors: Iterable[Collector] = ()) -> CollectorRegistry:
    """A registry of this daemon's own (the process-global default one is left alone)."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The body of ``GET /metrics`` in the text exposition format."""
    return generate_latest(registry)
