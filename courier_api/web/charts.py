"""Bar charts drawn on the server: geometry here, SVG markup in ``web/_charts.html``.

No script and no inline style (the pages' Content-Security-Policy allows neither):
bars are ``<rect>`` elements whose colour comes from a CSS class per series, and
each chart sits next to a table with the same numbers for screen readers and for
anyone who wants the figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# (key, legend) in drawing order; the key is also the bar's CSS class suffix.
COURIER_SERIES = (
    ("delivered", "Delivered in person"),
    ("unattended", "Locker / pickup point"),
    ("returned", "Returned"),
    ("missing", "Missing"),
    ("discrepancies", "Discrepancies"),
)
DAY_SERIES = COURIER_SERIES[:4]


def outcome_values(metrics: Mapping[str, Any]) -> dict[str, int]:
    """A report row's outcomes as charted: with and without proof or consent together
    (the tables beside the charts keep them apart)."""
    return {
        "delivered": metrics["delivered"] + metrics["delivered_without_pod"],
        "unattended": metrics["unattended"] + metrics["unattended_without_consent"],
        "returned": metrics["returned"],
        "missing": metrics["missing"],
    }


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: str
    tip: str  # the bar's <title>: shown on hover, read by screen readers


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "start"  # SVG text-anchor
    css: str = "label"


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class Chart:
    title: str
    description: str
    width: int
    height: int
    bars: list[Bar] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    grid: list[Line] = field(default_factory=list)
    series: Sequence[tuple[str, str]] = ()


def _ticks(top: int) -> list[int]:
    """0, a middle and the top of an axis that reaches at least ``top`` (whole numbers)."""
    top = max(top, 1)
    if top <= 4:
        return list(range(top + 1))
    step = -(-top // 4)
    return [step * n for n in range(5)]


def courier_chart(rows: Sequence[tuple[str, Mapping[str, int]]]) -> Chart:
    """Horizontal grouped bars: one group per courier, one bar per series."""
    label_width, plot_width, right = 160, 600, 40
    bar, gap, group_gap, top_margin = 12, 2, 18, 30
    group = len(COURIER_SERIES) * (bar + gap) - gap
    height = top_margin + max(len(rows), 1) * (group + group_gap) + 8
    ticks = _ticks(max((v for _, values in rows for v in values.values()), default=0))
    scale = plot_width / ticks[-1]
    chart = Chart(
        title="Outcomes per courier",
        description="For each courier: parcels delivered in person, left in a locker or at "
        "a pickup point, returned, missing, and the discrepancies of their shifts.",
        width=label_width + plot_width + right,
        height=height,
        series=COURIER_SERIES,
    )
    for tick in ticks:
        x = label_width + tick * scale
        chart.grid.append(Line(x, top_margin - 6, x, height - 8))
        chart.labels.append(Label(x, top_margin - 10, str(tick), "middle", "axis"))
    for n, (name, values) in enumerate(rows):
        y0 = top_margin + n * (group + group_gap)
        chart.labels.append(Label(label_width - 8, y0 + group / 2 + 4, name, "end"))
        for k, (key, legend) in enumerate(COURIER_SERIES):
            value = values.get(key, 0)
            y = y0 + k * (bar + gap)
            width = value * scale
            chart.bars.append(Bar(label_width, y, width, bar, key, f"{name}: {legend} {value}"))
            chart.labels.append(
                Label(label_width + width + 4, y + bar - 2, str(value), css="value")
            )
    return chart


def week_chart(days: Sequence[tuple[str, Mapping[str, int]]]) -> Chart:
    """Vertical stacked bars: one per day, its outcomes stacked (the day's check-outs)."""
    left, bottom, top_margin, plot_height = 48, 30, 24, 200
    slot, bar = 100, 52
    width = left + max(len(days), 1) * slot + 10
    height = top_margin + plot_height + bottom
    ticks = _ticks(max((sum(v.values()) for _, v in days), default=0))
    scale = plot_height / ticks[-1]
    base = top_margin + plot_height
    chart = Chart(
        title="The last 7 days",
        description="For each of the last seven days: the parcels checked out, split into "
        "delivered in person, left unattended, returned and missing.",
        width=width,
        height=height,
        series=DAY_SERIES,
    )
    for tick in ticks:
        y = base - tick * scale
        chart.grid.append(Line(left, y, width - 10, y))
        chart.labels.append(Label(left - 6, y + 4, str(tick), "end", "axis"))
    for n, (day, values) in enumerate(days):
        x = left + n * slot + (slot - bar) / 2
        y = base
        for key, legend in DAY_SERIES:
            value = values.get(key, 0)
            if value:
                y -= value * scale
                chart.bars.append(Bar(x, y, bar, value * scale, key, f"{day}: {legend} {value}"))
        total = sum(values.values())
        chart.labels.append(Label(x + bar / 2, y - 4, str(total), "middle", "value"))
        chart.labels.append(Label(x + bar / 2, base + 18, day[5:], "middle", "axis"))
    return chart
