"""Figures: samples per path, their median and spread, ratios to the baselines, and the printed table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

PATHS = ("direct", "nginx", "gateway")
RATIOS = (("gateway/nginx", "nginx"), ("gateway/direct", "direct"))


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    #: "higher" or "lower" is better (for reading ratios)
    better: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: path -> why there is no value
    missing: dict[str, str] = field(default_factory=dict)
    #: shown in the table only when it has values
    optional: bool = False

    def add(self, path: str, value: float) -> None:
        self.samples.setdefault(path, []).append(value)

    def median(self, path: str) -> float | None:
        values = self.samples.get(path)
        return statistics.median(values) if values else None

    def ratio(self, numerator: str, denominator: str) -> float | None:
        top, bottom = self.median(numerator), self.median(denominator)
        if top is None or bottom is None or bottom == 0:
            return None
        return top / bottom

    @classmethod
    def from_json(cls, key: str, doc: dict[str, Any]) -> Figure:
        figure = cls(key, doc["label"], doc["unit"], doc["better"], optional=bool(doc.get("optional", False)))
        figure.samples = {path: list(values["samples"]) for path, values in doc["paths"].items()}
        figure.missing = dict(doc.get("missing", {}))
        return figure

    def to_json(self) -> dict[str, Any]:
        paths: dict[str, Any] = {}
        for path, values in self.samples.items():
            paths[path] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "n": len(values),
                "samples": values,
            }
        return {
            "label": self.label,
            "unit": self.unit,
            "better": self.better,
            "paths": paths,
            "missing": self.missing,
            "optional": self.optional,
            "ratios": {name: self.ratio("gateway", base) for name, base in RATIOS},
        }


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def cell(figure: Figure, path: str) -> str:
    values = figure.samples.get(path)
    if not values:
        reason = figure.missing.get(path)
        return "FAILED" if reason and reason != "n/a" else "-"
    median = fmt(statistics.median(values))
    if len(values) == 1 or min(values) == max(values):
        return median
    return f"{median} [{fmt(min(values))}-{fmt(max(values))}]"


def table(figures: list[Figure]) -> str:
    header = ["figure", "unit", *PATHS, *(name for name, _ in RATIOS)]
    rows = [header]
    for figure in figures:
        if figure.optional and not figure.samples:
            continue
        ratios = []
        for _, base in RATIOS:
            r = figure.ratio("gateway", base)
            ratios.append("-" if r is None else f"{r:.2f}")
        rows.append([figure.label, figure.unit, *(cell(figure, p) for p in PATHS), *ratios])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        left = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        right = [row[i].rjust(widths[i]) for i in range(2, len(row))]
        lines.append("  ".join(left + right).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(figures: list[Figure]) -> str:
    """The same table as Markdown (for docs/performance.md)."""
    header = ["figure", "unit", *PATHS, *(name for name, _ in RATIOS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for figure in figures:
        if figure.optional and not figure.samples:
            continue
        ratios = []
        for _, base in RATIOS:
            r = figure.ratio("gateway", base)
            ratios.append("-" if r is None else f"{r:.2f}")
        cells = [cell(figure, p) for p in PATHS]
        lines.append("| " + " | ".join([figure.label, figure.unit, *cells, *ratios]) + " |")
    return "\n".join(lines)
