"""The Prometheus endpoint serves what the step-sampled export pushed: scrapes never collect,
the exposition is rendered at most once per export, counters exist from the start, NaN shows
as NaN, and shutdown keeps serving until a scraper has read the final values (bounded)."""

from __future__ import annotations

import math
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest

import otel_train

pytest.importorskip("opentelemetry.exporter.prometheus")

from opentelemetry.metrics import CallbackOptions, Observation

from exporters.prometheus import GRACE_ENV, PrometheusExporter, PrometheusSettings


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample line of `name`."""
    found = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            found.append((labels[len(name) :], float(value)))
    return found


def _train(tel: otel_train.Telemetry, first: int, last: int, loss: float = 1.0) -> None:
    for step in range(first, last + 1):
        tel.training.record(loss=loss, learning_rate=0.1, tokens=10, samples=1)
        tel.step(step)


def test_scrapes_between_exports_never_collect_and_render_once_per_export(tmp_path: Path) -> None:
    exporter = PrometheusExporter(port=0, final_scrape_grace_millis=0)
    with otel_train.setup(
        run="cache", output_dir=tmp_path, exporters=(exporter,), intervals={"train": 5},
        gpu_metrics=False, handle_signals=False,
    ) as tel:  # fmt: skip
        collects = []

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            collects.append(threading.get_ident())  # runs once per collection of the SDK
            return [Observation(1.0)]

        tel.meter.create_observable_gauge(
            "train.observed", callbacks=[observe], description="Counts collections"
        )
        _train(tel, 1, 10)
        assert tel.flush()
        assert exporter.url is not None
        collected = len(collects)
        bodies = {_scrape(exporter.url) for _ in range(12)}
        assert len(collects) == collected  # 12 scrapes, no collect
        assert len(bodies) == 1 and exporter.renders == 1  # rendered once, served 12 times
        assert exporter.scrapes == 12
        (body,) = bodies
        assert _samples(body, "train_tokens_total")[0][1] == 100.0

        _train(tel, 11, 15)  # one more export: one more render, on the next scrape
        tel.evaluate(loss=0.5)  # an event batch: only eval.*; the train values stay
        assert tel.flush()
        after = [_scrape(exporter.url) for _ in range(3)]
        assert exporter.renders == 2 and len(set(after)) == 1
        assert _samples(after[0], "train_tokens_total")[0][1] == 150.0
        assert _samples(after[0], "eval_loss")[0][1] == 0.5
        assert _samples(after[0], "train_global_step")[0][1] == 15.0


def test_counters_are_exported_as_zero_before_the_first_event(tmp_path: Path) -> None:
    """`train_nonfinite_total` and the export health counters exist at 0 in a healthy run, so
    the dashboard's "Non-finite values" panel reads 0, not "No data"."""
    exporter = PrometheusExporter(port=0, final_scrape_grace_millis=0)
    with otel_train.setup(
        run="zeros", output_dir=tmp_path, exporters=(exporter,),
        intervals={"train": 5, "perf": 5}, gpu_metrics=False, handle_signals=False,
    ) as tel:  # fmt: skip
        _train(tel, 1, 5)
        assert tel.flush()
        assert exporter.url is not None
        text = _scrape(exporter.url)
    assert [value for _, value in _samples(text, "train_nonfinite_total")] == [0.0]
    for name in ("otel_train_export_dropped_total", "otel_train_export_failed_total"):
        samples = _samples(text, name)
        assert samples and all(value == 0.0 for _, value in samples), name
        assert any('exporter="PrometheusExporter"' in labels for labels, _ in samples)


def test_a_nan_loss_scrapes_as_nan_then_the_next_finite_value(tmp_path: Path) -> None:
    exporter = PrometheusExporter(port=0, final_scrape_grace_millis=0)
    with otel_train.setup(
        run="nan", output_dir=tmp_path, exporters=(exporter,), intervals={"train": 1},
        gpu_metrics=False, handle_signals=False,
    ) as tel:  # fmt: skip
        assert exporter.url is not None
        _train(tel, 1, 1, loss=2.0)
        _train(tel, 2, 2, loss=math.nan)
        assert tel.flush()
        text = _scrape(exporter.url)
        assert math.isnan(_samples(text, "train_loss")[0][1])  # not the last good 2.0
        assert _samples(text, "train_nonfinite_total")[0][1] == 3.0  # loss, max, perplexity
        _train(tel, 3, 3, loss=0.75)
        assert tel.flush()
        assert _samples(_scrape(exporter.url), "train_loss")[0][1] == 0.75


def _scrape_until(url: str, needle: str, stop: threading.Event) -> str | None:
    while not stop.is_set():
        try:
            text = _scrape(url)
        except (urllib.error.URLError, ConnectionError):
            return None  # the server closed before the final values were read
        if needle in text:
            return text
    return None


def test_shutdown_keeps_serving_until_the_final_values_are_scraped(tmp_path: Path) -> None:
    exporter = PrometheusExporter(port=0, final_scrape_grace_millis=60_000)
    tel = otel_train.setup(
        run="tail", output_dir=tmp_path, exporters=(exporter,), intervals={"train": 5},
        gpu_metrics=False, handle_signals=False,
    )  # fmt: skip
    _train(tel, 1, 7)  # sampled at 5; steps 6 and 7 are the tail
    assert tel.flush() and exporter.url is not None
    url = exporter.url
    for _ in range(2):  # a scraper with a rhythm (here a fast one) is there
        assert _samples(_scrape(url), "train_global_step")[0][1] == 5.0
    closer = threading.Thread(target=tel.shutdown, kwargs={"timeout_millis": 60_000})
    closer.start()
    stop = threading.Event()
    try:
        final = _scrape_until(url, "final_total_tokens", stop)
    finally:
        stop.set()
    closer.join(30)  # far below the 60 s grace: the final scrape ended the wait
    assert not closer.is_alive()
    assert final is not None, "the endpoint closed before the final values were scraped"
    assert _samples(final, "train_global_step")[0][1] == 7.0
    assert _samples(final, "train_tokens_total")[0][1] == 70.0  # every step, the tail too
    assert _samples(final, "final_total_tokens")[0][1] == 70.0
    with pytest.raises(urllib.error.URLError):
        _scrape(url)


@pytest.mark.parametrize("looks", [0, 1])  # nobody, or a one-off look (the demo's own)
def test_shutdown_does_not_wait_without_a_scraper(tmp_path: Path, looks: int) -> None:
    exporter = PrometheusExporter(port=0, final_scrape_grace_millis=600_000)
    tel = otel_train.setup(
        run="alone", output_dir=tmp_path, exporters=(exporter,), gpu_metrics=False,
        handle_signals=False,
    )  # fmt: skip
    _train(tel, 1, 12)
    assert tel.flush() and exporter.url is not None
    for _ in range(looks):
        _scrape(exporter.url)
    closer = threading.Thread(target=tel.shutdown, kwargs={"timeout_millis": 600_000})
    closer.start()
    closer.join(60)  # the grace is 10 minutes: only "no scraper, no wait" ends it sooner
    assert not closer.is_alive()
    assert exporter.port is None


def test_a_scraper_that_went_away_is_not_waited_for(tmp_path: Path) -> None:
    exporter = PrometheusExporter(port=0, final_scrape_grace_millis=600_000)
    tel = otel_train.setup(
        run="gone", output_dir=tmp_path, exporters=(exporter,), intervals={"train": 5},
        gpu_metrics=False, handle_signals=False,
    )  # fmt: skip
    _train(tel, 1, 5)
    assert tel.flush() and exporter.url is not None
    for _ in range(3):  # a scraper with a fast rhythm, that then goes away
        _scrape(exporter.url)
    closer = threading.Thread(target=tel.shutdown, kwargs={"timeout_millis": 600_000})
    closer.start()
    closer.join(60)  # its rhythm says the next scrape is long overdue: not the 10-minute grace
    assert not closer.is_alive() and exporter.port is None


def test_grace_setting_from_argument_env_and_rejected_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert PrometheusSettings.resolve(env={}).final_scrape_grace_millis == 5_000
    assert PrometheusSettings.resolve(env={GRACE_ENV: "250"}).final_scrape_grace_millis == 250
    resolved = PrometheusSettings.resolve(final_scrape_grace_millis=0, env={GRACE_ENV: "250"})
    assert resolved.final_scrape_grace_millis == 0
    with pytest.raises(otel_train.OtelTrainError, match=GRACE_ENV):
        PrometheusSettings.resolve(env={GRACE_ENV: "soon"})
    with pytest.raises(otel_train.OtelTrainError, match="final_scrape_grace_millis"):
        PrometheusExporter(port=0, final_scrape_grace_millis=-1)
