"""Sampling by step: exact steps per group, exact counters, rates from deltas of an injected clock."""

from __future__ import annotations

import json

import pytest

import otel_train
from otel_train import SamplingView


def _read_jsonl(tel: otel_train.Telemetry) -> list[dict]:
    path = tel.context.run_dir / "rank0.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_thousand_steps_export_train_and_perf_at_exact_multiples(telemetry_factory, clock):
    tel = telemetry_factory(exporters=("jsonl",), intervals={"train": 10, "perf": 20}, clock=clock)
    recorded_tokens = 0
    for step in range(1, 1001):
        tokens = 100 + step % 7
        recorded_tokens += tokens
        tel.training.record(loss=1.0 / step, learning_rate=3e-4, tokens=tokens, samples=2)
        clock.advance(0.25)
        tel.step(step)
    tel.shutdown()
    rows = [r for r in _read_jsonl(tel) if "train/loss" in r["metrics"]]
    assert [r["step"] for r in rows] == list(range(10, 1001, 10))
    perf_rows = [r for r in _read_jsonl(tel) if "perf/tokens_per_second" in r["metrics"]]
    assert [r["step"] for r in perf_rows] == list(range(20, 1001, 20))
    assert rows[-1]["metrics"]["train/num_input_tokens_seen"] == recorded_tokens
    assert rows[-1]["metrics"]["train/samples"] == 2000


def test_tokens_per_second_is_token_delta_over_clock_delta(telemetry_factory, clock, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 10, "perf": 20}, clock=clock)
    for step in range(1, 101):
        tel.training.record(tokens=50 if step <= 40 else 80, samples=1)
        clock.advance(0.5 if step <= 40 else 0.1)
        tel.step(step)
    tel.flush()
    tokens = dict(
        zip(
            capture.steps_with("train/num_input_tokens_seen"),
            capture.values_of("train/num_input_tokens_seen"),
            strict=True,
        )
    )
    rates = dict(
        zip(
            capture.steps_with("perf/tokens_per_second"),
            capture.values_of("perf/tokens_per_second"),
            strict=True,
        )
    )
    assert sorted(rates) == [20, 40, 60, 80, 100]
    # Between perf steps 40 and 60: 20 steps of 80 tokens in 20 x 0.1 s.
    assert rates[60] == pytest.approx((tokens[60] - tokens[40]) / 2.0)
    assert rates[60] == pytest.approx(800.0)
    assert rates[40] == pytest.approx((tokens[40] - tokens[20]) / 10.0)
    steps_per_second = capture.values_of("perf/steps_per_second")
    assert steps_per_second[-1] == pytest.approx(20 / 2.0)


def test_eta_uses_total_steps_and_current_speed(telemetry_factory, clock, capture):
    tel = telemetry_factory(
        exporters=[capture], intervals={"perf": 10}, clock=clock, total_steps=110
    )
    for step in range(1, 11):
        clock.advance(2.0)
        tel.step(step)
    tel.flush()
    # 100 steps left at 0.5 steps/s = 200 s = 3.33 minutes.
    assert capture.values_of("perf/eta_minutes") == [pytest.approx(200 / 60)]


def test_custom_instrument_on_meter_is_exported_with_its_group(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 5, "perf": 7})
    my_metric = tel.meter.create_gauge("train.my_metric", description="a user metric")
    my_perf = tel.meter.create_counter("perf.my_counter", description="a user counter")
    for step in range(1, 22):
        my_metric.set(step * 2)
        my_perf.add(1)
        tel.step(step)
    tel.flush()
    assert capture.steps_with("train/my_metric") == [5, 10, 15, 20]
    assert capture.values_of("train/my_metric") == [10, 20, 30, 40]
    assert capture.steps_with("perf/my_counter") == [7, 14, 21]


def test_sampling_views_list_gives_full_control(telemetry_factory, capture):
    views = [
        SamplingView(instrument_name="train.*", every_n_steps=3),
        SamplingView(instrument_name="perf.*", every_n_steps=6),
    ]
    tel = telemetry_factory(exporters=[capture], intervals=views)
    for step in range(1, 13):
        tel.training.record(loss=0.5, tokens=1)
        tel.step(step)
    tel.flush()
    assert capture.steps_with("train/loss") == [3, 6, 9, 12]
    assert capture.steps_with("perf/steps_per_second") == [6, 12]


def test_skipped_steps_export_at_first_step_past_a_multiple(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 10, "perf": 1000})
    for step in (4, 8, 12, 16, 20, 24, 28, 32):
        tel.training.record(loss=1.0)
        tel.step(step)
    tel.flush()
    assert capture.steps_with("train/loss") == [12, 20, 32]


def test_eval_and_epoch_events_land_on_the_current_step(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 10})
    for step in range(1, 31):
        tel.training.record(loss=2.0, tokens=10, samples=1)
        tel.step(step)
        if step == 15:
            tel.evaluate(loss=1.0)
        if step == 25:
            tel.evaluate(loss=2.0, metrics={"accuracy": 0.75})
    tel.end_epoch(0)
    tel.shutdown()
    assert capture.steps_with("eval/loss") == [15, 25]
    assert capture.values_of("eval/best_perplexity") == pytest.approx([2.718281828, 2.718281828])
    assert capture.values_of("eval/perplexity")[1] == pytest.approx(7.389056099)
    assert capture.values_of("eval/accuracy") == [0.75]
    assert capture.steps_with("epoch/tokens") == [30]
    assert capture.values_of("epoch/tokens") == [300]
    assert capture.values_of("final/total_tokens") == [300]
    assert capture.values_of("final/best_perplexity") == pytest.approx([2.718281828])
    assert capture.values_of("final/total_steps") == [30]
    eval_row = next(r for r in capture.rows if "eval/loss" in r.values)
    assert not any(key.startswith("train/loss") for key in eval_row.values)


def test_shutdown_exports_values_recorded_after_the_last_sampled_step(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 10})
    for step in range(1, 16):
        tel.training.record(tokens=7)
        tel.step(step)
    tel.shutdown()
    assert capture.steps_with("train/num_input_tokens_seen") == [10, 15]
    assert capture.values_of("train/num_input_tokens_seen")[-1] == 105
    assert capture.shut_down
