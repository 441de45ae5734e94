"""Sampling intervals declared once, as views: which instruments are exported at which steps.

A `SamplingView` is an OTel view selector (instrument-name wildcard, optional aggregation and
attribute keys) plus `every_n_steps`. Sampling by step, not by time, means every rank reaches
the same sampled steps, so a cross-rank reduction there can never deadlock a healthy job.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry.sdk.metrics.view import Aggregation, View

from otel_train.errors import OtelTrainError
from otel_train.validation import check_positive_int, is_positive_int

# Defaults from the field: cheap scalars often, throughput less often, GPU probes rarely.
DEFAULT_INTERVALS: Mapping[str, int] = {"train": 10, "perf": 20, "gpu": 50}
GROUP_PATTERNS: Mapping[str, tuple[str, ...]] = {
    "train": ("train.*",),
    "perf": ("perf.*",),
    # hw.*: OTel hardware semconv (hw.gpu.*, hw.power, hw.energy); process.* / system.*: the
    # OTel system-metrics instrumentation (psutil), as rarely as the GPU probes.
    "gpu": ("gpu.*", "hw.*", "process.*", "system.*"),
    "health": ("otel_train.*",),
}
EVENT_GROUPS: tuple[str, ...] = ("eval", "epoch", "final")
# Instruments matching no view ride with this group (documented in the README).
FALLBACK_GROUP = "train"


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingView:
    """Instruments whose name matches `instrument_name` are exported every `every_n_steps`.

    `every_n_steps=None` makes the view an event group: exported only when the code says so
    (`evaluate()`, `end_epoch()`, shutdown). `aggregation` / `attribute_keys` are passed to an
    OTel `View` for the same instruments.
    """

    instrument_name: str
    every_n_steps: int | None
    group: str | None = None
    aggregation: Aggregation | None = None
    attribute_keys: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.instrument_name, str) or not self.instrument_name:
            raise OtelTrainError(
                "SamplingView.instrument_name must be a non-empty name or wildcard, e.g. 'train.*'"
            )
        if self.every_n_steps is not None:
            check_positive_int(
                f"every_n_steps for {self.instrument_name!r}",
                self.every_n_steps,
                qualifier=" (or None for an event group)",
            )

    @property
    def group_name(self) -> str:
        return self.group or self.instrument_name.split(".", 1)[0].rstrip("*") or "default"

    def matches(self, instrument_name: str) -> bool:
        return fnmatch.fnmatchcase(instrument_name, self.instrument_name)

    def to_otel_view(self) -> View | None:
        """Only views that change aggregation or attributes become OTel views (one stream each)."""
        if self.aggregation is None and self.attribute_keys is None:
            return None
        return View(
            instrument_name=self.instrument_name,
            aggregation=self.aggregation,
            attribute_keys=set(self.attribute_keys) if self.attribute_keys is not None else None,
        )


def _check_interval(group: str, interval: object) -> int | None:
    if interval is None:
        return None
    if not is_positive_int(interval):
        raise OtelTrainError(
            f"intervals[{group!r}] must be a positive int number of steps, got {interval!r}; "
            "e.g. intervals={'train': 10, 'perf': 20, 'gpu': 50}"
        )
    return interval


def views_from_intervals(intervals: Mapping[str, int | None] | None) -> list[SamplingView]:
    """The default views, with the given intervals replacing the defaults group by group."""
    merged: dict[str, int | None] = dict(DEFAULT_INTERVALS)
    merged.setdefault("health", merged["perf"])
    for group, interval in (intervals or {}).items():
        if group in EVENT_GROUPS:
            raise OtelTrainError(
                f"{group!r} is an event group (exported when it happens); it takes no interval"
            )
        if group not in GROUP_PATTERNS:
            raise OtelTrainError(
                f"intervals names an unknown sampling group {group!r}; the groups are "
                f"{', '.join(sorted(GROUP_PATTERNS))}. For instruments of your own prefix pass "
                "views instead, e.g. intervals=[SamplingView(instrument_name='dpo.*', "
                "every_n_steps=5), ...]"
            )
        merged[group] = _check_interval(group, interval)
    if intervals and "perf" in intervals and "health" not in intervals:
        merged["health"] = merged["perf"]
    views = []
    for group, interval in merged.items():
        for pattern in GROUP_PATTERNS.get(group, (f"{group}.*",)):
            views.append(SamplingView(instrument_name=pattern, every_n_steps=interval, group=group))
    for group in EVENT_GROUPS:
        views.append(SamplingView(instrument_name=f"{group}.*", every_n_steps=None, group=group))
    return views


def resolve_views(
    intervals: Mapping[str, int | None] | Sequence[SamplingView] | None,
    known_instruments: Iterable[str],
) -> list[SamplingView]:
    """Validate once, at setup: no two views may give one instrument different intervals."""
    if intervals is None or isinstance(intervals, Mapping):
        views = views_from_intervals(intervals)
    else:
        views = list(intervals)
        for view in views:
            if not isinstance(view, SamplingView):
                raise OtelTrainError(
                    f"intervals must be a mapping like {{'train': 10}} or a list of SamplingView, "
                    f"got an item of type {type(view).__name__}"
                )
        present = {v.group_name for v in views}
        for group in EVENT_GROUPS:
            if group not in present:
                views.append(
                    SamplingView(instrument_name=f"{group}.*", every_n_steps=None, group=group)
                )
    known = tuple(known_instruments)
    _reject_views_naming_nothing(views, known)
    _reject_conflicts(views, known)
    return views


def _reject_views_naming_nothing(views: Sequence[SamplingView], known: Sequence[str]) -> None:
    """An exact instrument name that is no standard instrument is a typo until proven
    otherwise; wildcards may name the user's own instruments, created after setup()."""
    for view in views:
        pattern = view.instrument_name
        if any(ch in pattern for ch in "*?[") or pattern in known:
            continue
        close = [name for name in known if name.split(".")[0] == pattern.split(".")[0]]
        raise OtelTrainError(
            f"view {pattern!r} names no standard instrument; valid names include "
            f"{', '.join(close or known[:8])}. For an instrument of your own use a wildcard "
            f"(e.g. {pattern + '*'!r})"
        )


def _reject_conflicts(views: Sequence[SamplingView], known_instruments: Iterable[str]) -> None:
    for index, first in enumerate(views):
        for second in views[index + 1 :]:
            if first.every_n_steps == second.every_n_steps:
                continue
            overlap = (
                first.instrument_name == second.instrument_name
                or second.matches(first.instrument_name)
                or first.matches(second.instrument_name)
            )
            if overlap:
                raise OtelTrainError(
                    f"views {first.instrument_name!r} (every {first.every_n_steps}) and "
                    f"{second.instrument_name!r} (every {second.every_n_steps}) both claim the "
                    "same instruments with different intervals; give them one interval or make "
                    "the wildcards disjoint"
                )
    for name in known_instruments:
        claimed = {v.every_n_steps for v in views if v.matches(name)}
        if len(claimed) > 1:
            raise OtelTrainError(
                f"instrument {name!r} is claimed by views with different intervals {claimed}; "
                "give them one interval or make the wildcards disjoint"
            )


class GroupIndex:
    """Which group an instrument belongs to, cached by name (collect asks on every export)."""

    def __init__(self, views: Sequence[SamplingView]) -> None:
        self.views = tuple(views)
        self.intervals: dict[str, int | None] = {}
        for view in self.views:
            self.intervals.setdefault(view.group_name, view.every_n_steps)
        if FALLBACK_GROUP not in self.intervals:
            self.intervals[FALLBACK_GROUP] = DEFAULT_INTERVALS[FALLBACK_GROUP]
        self._by_name: dict[str, str] = {}

    def group_of(self, instrument_name: str) -> str:
        group = self._by_name.get(instrument_name)
        if group is None:
            group = next(
                (v.group_name for v in self.views if v.matches(instrument_name)), FALLBACK_GROUP
            )
            self._by_name[instrument_name] = group
        return group

    def periodic_groups(self) -> dict[str, int]:
        return {g: n for g, n in self.intervals.items() if n is not None}

    def groups_due(self, previous_step: int, step: int) -> frozenset[str]:
        """Groups whose interval boundary lies in (previous_step, step]: exact multiples when
        steps are consecutive, the first step past a multiple when the loop skips steps."""
        return frozenset(
            group
            for group, every in self.periodic_groups().items()
            if step // every > previous_step // every
        )

    def next_due_step(self, step: int) -> int:
        """The first step after `step` at which some group is due (the hot path's one compare)."""
        periodic = self.periodic_groups().values()
        if not periodic:
            return 2**62
        return min((step // every + 1) * every for every in periodic)


def parse_intervals(text: str, *, source: str) -> dict[str, int]:
    """`"train=10,perf=20"` -> `{"train": 10, "perf": 20}`; `source` names where the text came
    from (an env var, a CLI flag) in the error."""
    intervals: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        group, _, value = part.partition("=")
        try:
            intervals[group.strip()] = int(value)
        except ValueError:
            raise OtelTrainError(
                f"{source} {text!r}: {part!r} is not group=steps; e.g. 'train=10,perf=20'"
            ) from None
    return intervals
