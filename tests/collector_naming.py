"""How the OpenTelemetry Collector's Prometheus exporter names an OTLP metric: a port of
`normalizeName` in opentelemetry-collector-contrib, pkg/translator/prometheus/normalize_name.go
(the collector-contrib 0.114 image of docker-compose.yml; default `add_metric_suffixes: true`).

No collector binary exists in the registries the tests can use, so this is the faithful
stand-in for the OTLP path: the dashboard must answer with these names too.
"""

from __future__ import annotations

import re

# normalize_name.go: unitMap and perUnitMap.
_UNITS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes",
    "MiBy": "mebibytes", "GiBy": "gibibytes", "TiBy": "tibibytes", "KBy": "kilobytes",
    "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes", "m": "meters", "V": "volts",
    "A": "amperes", "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius", "Hz": "hertz",
    "1": "", "%": "percent",
}  # fmt: skip
_PER_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month",
              "y": "year"}  # fmt: skip
_NOT_ALNUM = re.compile(r"[^0-9A-Za-z]+")


def _tokens(text: str) -> list[str]:
    return [token for token in _NOT_ALNUM.split(text) if token]


def collector_metric_name(name: str, unit: str, *, kind: str, monotonic: bool = False) -> str:
    """`kind`: "gauge", "sum" or "histogram" (the OTLP data type). Counters come out with
    `_total`, unit-"1" gauges with `_ratio`, units as words, unless already in the name."""
    tokens = _tokens(name)
    parts = unit.split("/", 1)
    main = parts[0].strip()
    if main and "{" not in main and "}" not in main:
        word = "_".join(_tokens(_UNITS.get(main, main)))
        if word and word not in tokens:
            tokens.append(word)
    if len(parts) > 1 and parts[1].strip():
        per = parts[1].strip()
        if "{" not in per and "}" not in per:
            word = "_".join(_tokens(_PER_UNITS.get(per, per)))
            if word and word not in tokens:
                tokens += ["per", word]
    if kind == "sum" and monotonic:
        tokens = [token for token in tokens if token != "total"] + ["total"]
    if unit == "1" and kind == "gauge":
        tokens = [token for token in tokens if token != "ratio"] + ["ratio"]
    joined = "_".join(tokens)
    return "_" + joined if joined[:1].isdigit() else joined


def collector_series_names(name: str, unit: str, *, kind: str, monotonic: bool = False) -> set[str]:
    """The sample names Prometheus stores for the metric (histograms: bucket, sum, count)."""
    base = collector_metric_name(name, unit, kind=kind, monotonic=monotonic)
    if kind == "histogram":
        return {base + "_bucket", base + "_sum", base + "_count"}
    return {base}
