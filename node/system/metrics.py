"""A small Prometheus registry for ``GET /metrics``, in the text exposition format 0.0.4.

Owns counters and gauges (optionally labelled) that components update, plus callback
families that read other components' counters dicts at scrape time, so the transport
or the DHT need not know about metrics at all. No dependency on prometheus_client: the
format is a few lines of text and the daemon needs only counters and gauges.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

__all__ = ["CONTENT_TYPE", "Counter", "Gauge", "Registry", "format_value", "sanitize_name"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = structlog.get_logger(__name__)

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Number = int | float
LabelValues = tuple[str, ...]
# A callback returns one number, or {label values: number} when the family has labels.
Reading = Number | Mapping[LabelValues, Number]


def sanitize_name(text: str) -> str:
    """Turn an arbitrary dict key into a valid metric name fragment (``a.b-c`` -> ``a_b_c``)."""
    cleaned = re.sub(r"[^a-zA-Z0-9_:]", "_", text)
    if not cleaned or cleaned[0].isdigit():
        cleaned = "_" + cleaned
    return cleaned


def format_value(value: Number) -> str:
    """A sample value as Prometheus writes it: ints plain, ``+Inf``/``-Inf``/``NaN``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid metric name {name!r}: use letters, digits, '_' and ':', not starting "
            "with a digit"
        )


def _check_labels(names: Sequence[str]) -> tuple[str, ...]:
    for label in names:
        if not _LABEL_RE.fullmatch(label) or label.startswith("__"):
            raise ValueError(
                f"invalid label name {label!r}: use letters, digits and '_', "
                "not starting with a digit or '__'"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label names in {list(names)}")
    return tuple(names)


def _sample_line(name: str, labelnames: tuple[str, ...], values: LabelValues, value: Number) -> str:
    if labelnames:
        pairs = ",".join(
            f'{label}="{_escape_label(str(item))}"'
            for label, item in zip(labelnames, values, strict=True)
        )
        return f"{name}{{{pairs}}} {format_value(value)}"
    return f"{name} {format_value(value)}"


@dataclass
class _Metric:
    name: str
    help: str
    kind: str
    labelnames: tuple[str, ...]
    _values: dict[LabelValues, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        return tuple(str(labels[name]) for name in self.labelnames)

    def value(self, **labels: object) -> float:
        """Current value for ``labels`` (0 when never touched)."""
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[tuple[LabelValues, Number]]:
        with self._lock:
            items = list(self._values.items())
        if not self.labelnames and not items:
            # An unlabelled metric exists from registration on, at 0.
            return [((), 0)]
        return sorted(items)


class Counter(_Metric):
    """A value that only goes up (requests served, bytes sent)."""

    def inc(self, amount: Number = 1, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} can only go up; got inc({amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    """A value that goes up and down (sessions open, bytes cached)."""

    def set(self, value: Number, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: Number = 1, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: Number = 1, **labels: object) -> None:
        self.inc(-amount, **labels)


@dataclass
class _Callback:
    name: str
    help: str
    kind: str
    labelnames: tuple[str, ...]
    read: Callable[[], Reading]

    def samples(self) -> list[tuple[LabelValues, Number]]:
        reading = self.read()
        if isinstance(reading, Mapping):
            out: list[tuple[LabelValues, Number]] = []
            for key, value in reading.items():
                values = key if isinstance(key, tuple) else (key,)
                if len(values) != len(self.labelnames):
                    raise ValueError(
                        f"{self.name}: callback gave label values {values!r} "
                        f"for labels {list(self.labelnames)}"
                    )
                out.append((tuple(str(v) for v in values), value))
            return sorted(out)
        if self.labelnames:
            raise ValueError(f"{self.name}: a labelled callback must return a dict")
        return [((), reading)]


@dataclass
class _DictFamily:
    prefix: str
    help: str
    kind: str
    read: Callable[[], Mapping[str, object]]


class Registry:
    """The metrics of one daemon; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self) -> None:
        self._items: list[_Metric | _Callback | _DictFamily] = []
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def _add(self, name: str, item: _Metric | _Callback | _DictFamily) -> None:
        _check_name(name)
        with self._lock:
            if name in self._names:
                raise ValueError(f"metric {name!r} is already registered")
            self._names.add(name)
            self._items.append(item)

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """Register a counter; by convention its name ends in ``_total``."""
        metric = Counter(name, help, "counter", _check_labels(labelnames))
        self._add(name, metric)
        return metric

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        metric = Gauge(name, help, "gauge", _check_labels(labelnames))
        self._add(name, metric)
        return metric

    def gauge_callback(
        self,
        name: str,
        help: str,
        read: Callable[[], Reading],
        labelnames: Sequence[str] = (),
    ) -> None:
        """A gauge whose value ``read()`` returns at scrape time."""
        self._add(name, _Callback(name, help, "gauge", _check_labels(labelnames), read))

    def counter_callback(
        self,
        name: str,
        help: str,
        read: Callable[[], Reading],
        labelnames: Sequence[str] = (),
    ) -> None:
        """A counter whose value ``read()`` returns at scrape time."""
        self._add(name, _Callback(name, help, "counter", _check_labels(labelnames), read))

    def counters_from_dict(
        self, prefix: str, help: str, read: Callable[[], Mapping[str, object]]
    ) -> None:
        """Expose every numeric entry of ``read()`` as counter ``{prefix}_{key}_total``.

        For components that already keep a ``{"sent": 3, "dropped": 0}`` dict: keys may
        appear later, and non-numeric entries are skipped.
        """
        self._add(prefix, _DictFamily(prefix, help, "counter", read))

    def gauges_from_dict(
        self, prefix: str, help: str, read: Callable[[], Mapping[str, object]]
    ) -> None:
        """Expose every numeric entry of ``read()`` as gauge ``{prefix}_{key}``."""
        self._add(prefix, _DictFamily(prefix, help, "gauge", read))

    def render(self) -> str:
        """The whole registry in the text exposition format (ends with a newline)."""
        with self._lock:
            items = list(self._items)
        lines: list[str] = []
        for item in items:
            try:
                if isinstance(item, _DictFamily):
                    lines.extend(self._render_dict(item))
                else:
                    lines.extend(self._render_family(item))
            except Exception as exc:
                # One broken component must not blank the whole scrape.
                name = item.prefix if isinstance(item, _DictFamily) else item.name
                log.warning("metric callback failed", metric=name, error=repr(exc))
        return "\n".join(lines) + "\n" if lines else ""

    @staticmethod
    def _header(name: str, help: str, kind: str) -> list[str]:
        return [f"# HELP {name} {_escape_help(help)}", f"# TYPE {name} {kind}"]

    def _render_family(self, item: _Metric | _Callback) -> list[str]:
        samples = item.samples()
        lines = self._header(item.name, item.help, item.kind)
        lines.extend(
            _sample_line(item.name, item.labelnames, values, value) for values, value in samples
        )
        return lines

    def _render_dict(self, item: _DictFamily) -> list[str]:
        lines: list[str] = []
        seen: set[str] = set()
        for key, value in sorted(item.read().items()):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = f"{item.prefix}_{sanitize_name(str(key))}"
            if item.kind == "counter" and not name.endswith("_total"):
                name += "_total"
            if name in seen:
                continue
            seen.add(name)
            lines.extend(self._header(name, f"{item.help}: {key}", item.kind))
            lines.append(_sample_line(name, (), (), value))
        return lines
