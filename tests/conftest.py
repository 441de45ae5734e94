"""Shared fixtures: a manual clock, and setup() wired to capture what is exported."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import otel_train
from otel_train.testing import CapturingExporter

REPO_ROOT = Path(__file__).resolve().parent.parent


class ManualClock:
    """An injectable clock the test moves by hand: rates become exact arithmetic."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def capture() -> CapturingExporter:
    return CapturingExporter()


@pytest.fixture
def telemetry_factory(tmp_path: Path) -> Iterator:
    """setup() with a temp output dir; every Telemetry made is shut down after the test."""
    made: list[otel_train.Telemetry] = []

    def make(**options: object) -> otel_train.Telemetry:
        options.setdefault("output_dir", tmp_path / "runs")
        options.setdefault("run", "test-run")
        tel = otel_train.setup(**options)  # type: ignore[arg-type]
        made.append(tel)
        return tel

    yield make
    for tel in made:
        tel.shutdown(timeout_millis=2_000)
