"""The Prometheus endpoint in-process: ports, labels, a taken port, several setups, shutdown."""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.utils import floatToGoString

import otel_train
from otel_train.ranks import RankInfo
from otel_train.testing import CapturingExporter

pytest.importorskip("opentelemetry.exporter.prometheus")

from exporters.prometheus import (
    DEFAULT_ADDRESS,
    DEFAULT_PORT,
    GRACE_ENV,
    PORT_ENV,
    PrometheusExporter,
    PrometheusSettings,
)


@pytest.fixture(autouse=True)
def _no_final_scrape_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests scrape once and exit: shutdown must not wait for a scraper's next visit
    (the grace has its own tests, in tests/unit/test_prometheus_scrape_cache.py)."""
    monkeypatch.setenv(GRACE_ENV, "0")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _train(tel: otel_train.Telemetry, steps: int, tokens: int = 10) -> None:
    for step in range(1, steps + 1):
        tel.training.record(loss=1.0 / step, learning_rate=0.1, tokens=tokens, samples=1)
        tel.step(step)


def _rank(local_rank: int) -> RankInfo:
    return RankInfo(rank=local_rank, local_rank=local_rank, world_size=2)


def test_defaults_are_loopback_and_9464_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PrometheusSettings.resolve(env={}) == PrometheusSettings(
        port=DEFAULT_PORT, address=DEFAULT_ADDRESS
    )
    assert DEFAULT_ADDRESS == "127.0.0.1" and DEFAULT_PORT == 9464
    env = {PORT_ENV: "9500", "OTEL_TRAIN_PROMETHEUS_ADDRESS": "0.0.0.0"}
    settings = PrometheusSettings.resolve(env=env)
    assert (settings.port, settings.address) == (9500, "0.0.0.0")
    assert settings.port_for(3) == 9503
    assert PrometheusSettings.resolve(port=9600, env=env).port == 9600
    with pytest.raises(otel_train.OtelTrainError, match=PORT_ENV):
        PrometheusSettings.resolve(env={PORT_ENV: "nine"})
    with pytest.raises(otel_train.OtelTrainError):
        PrometheusSettings(port=70000)


def test_series_carry_run_stage_rank_labels_and_last_sampled_values(tmp_path: Path) -> None:
    exporter = PrometheusExporter(port=0)
    with otel_train.setup(
        run="labels",
        stage="dpo",
        output_dir=tmp_path,
        exporters=(exporter,),
        intervals={"train": 5},
        ranks=_rank(1),
    ) as tel:
        assert exporter.url is not None and exporter.url.startswith("http://127.0.0.1:")
        _train(tel, 7)  # sampled at 5; steps 6-7 are staged, not yet exported
        assert tel.flush()  # the export thread has handed step 5 to the endpoint
        text = _scrape(exporter.url)
    labels = 'rank="1",run="labels",stage="dpo"'
    reduced = 'rank="1",run="labels",scope="rank",stage="dpo"'  # this rank's own values
    assert f"train_tokens_total{{{reduced}}} 50.0" in text
    mean_loss = sum(1.0 / step for step in range(1, 6)) / 5  # the interval mean, steps 1-5
    assert f"train_loss{{{reduced}}} {floatToGoString(mean_loss)}" in text
    assert f"train_loss_max{{{labels}}} 1.0" in text  # the interval max is not reduced
    assert f"train_global_step{{{labels}}} 5.0" in text


def test_a_scrape_never_resolves_staged_values(tmp_path: Path) -> None:
    """A scrape between sampled steps reads the SDK's values, never the staged ones."""

    torch = pytest.importorskip("torch")

    class Staged(torch.Tensor):
        """A tensor that counts every copy of its value to the host."""

        conversions = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in {"item", "tolist", "__float__", "cpu", "numpy"}:
                Staged.conversions += 1
            return super().__torch_function__(func, types, args, kwargs or {})

    exporter = PrometheusExporter(port=0)
    with otel_train.setup(
        run="nosync", output_dir=tmp_path, exporters=(exporter,), intervals={"train": 10}
    ) as tel:
        assert exporter.url is not None
        tel.training.record(loss=torch.tensor(3.0).as_subclass(Staged))
        tel.step(1)
        for _ in range(3):
            _scrape(exporter.url)
        assert Staged.conversions == 0


def test_two_setups_in_one_process_serve_separately_and_free_their_port(tmp_path: Path) -> None:
    first, second = PrometheusExporter(port=0), PrometheusExporter(port=0)
    tel_a = otel_train.setup(run="a", output_dir=tmp_path, exporters=(first,))
    tel_b = otel_train.setup(run="b", output_dir=tmp_path, exporters=(second,))
    try:
        _train(tel_a, 10)
        _train(tel_b, 10, tokens=3)
        assert tel_a.flush() and tel_b.flush()
        assert first.url and second.url and first.port != second.port
        text_a, text_b = _scrape(first.url), _scrape(second.url)
        assert 'run="a"' in text_a and 'run="b"' not in text_a
        assert 'train_tokens_total{rank="0",run="b",scope="rank",stage="train"} 30.0' in text_b
    finally:
        port = first.port
        tel_a.shutdown()
        tel_b.shutdown()
    assert first.url is None
    with pytest.raises(urllib.error.URLError):
        _scrape(f"http://127.0.0.1:{port}/metrics")


def test_port_is_base_plus_local_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1] - 3 if probe.getsockname()[1] > 1030 else 20000
    monkeypatch.setenv(PORT_ENV, str(base))
    tel = otel_train.setup(
        run="ports", output_dir=tmp_path, exporters=("prometheus",), ranks=_rank(3)
    )
    try:
        _train(tel, 10)
        assert tel.flush()
        assert 'train_tokens_total{rank="3",run="ports"' in _scrape(
            f"http://127.0.0.1:{base + 3}/metrics"
        )
    finally:
        tel.shutdown()


def test_a_taken_port_logs_one_clear_line_and_training_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv(PORT_ENV, str(port))
        capture = CapturingExporter()
        with caplog.at_level(logging.ERROR, logger="otel_train"):
            tel = otel_train.setup(
                run="taken", output_dir=tmp_path, exporters=("prometheus", capture)
            )
        with tel:
            _train(tel, 10)
            tel.flush()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert f"127.0.0.1:{port}" in errors[0] and PORT_ENV in errors[0]
    assert "continues" in errors[0]
    samples = [row.values["train/samples"] for row in capture.rows if "train/samples" in row.values]
    assert samples and samples[-1] == 10.0  # 1 sample per step: the JSON-side keeps exporting


def test_a_collect_without_a_scrape_does_not_duplicate_families(tmp_path: Path) -> None:
    """The SDK collector queues each collect until a scrape; a flush between scrapes would
    otherwise expose every family twice (promtool and Prometheus reject the whole scrape)."""
    exporter = PrometheusExporter(port=0)
    with otel_train.setup(run="dup", output_dir=tmp_path, exporters=(exporter,)) as tel:
        _train(tel, 10)
        tel.provider.force_flush()
        tel.provider.force_flush()
        assert tel.flush()
        assert exporter.url is not None
        text = _scrape(exporter.url)
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert "# TYPE train_loss gauge" in type_lines
    assert len(type_lines) == len(set(type_lines))


def test_a_setup_rejected_after_the_server_started_frees_the_port(tmp_path, monkeypatch):
    import socket

    import otel_train

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OTEL_TRAIN_PROMETHEUS_PORT", str(port))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(otel_train.OtelTrainError, match="cannot write JSON lines"):
        otel_train.setup(run="x", output_dir=not_a_dir, exporters=("prometheus", "jsonl"))
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # raises EADDRINUSE if the server was left running
