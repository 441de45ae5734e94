"""Throughput and MFU are right or absent: no token count gives no tokens/s, FLOP/s, MFU or
final total (never 0.0), an MFU above 100% is never exported, a missing peak is warned."""

from __future__ import annotations

import logging
import math

import pytest

from otel_train.testing import CapturingExporter


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_no_token_count_exports_no_throughput_flops_mfu_or_total_and_warns_once(
    telemetry_factory, clock, caplog
):
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture],
        clock=clock,
        intervals={"train": 10, "perf": 10},
        flops_per_token=1e9,
        peak_flops=1e15,
        total_steps=100,
    )
    with caplog.at_level(logging.WARNING, logger="otel_train"):
        for step in range(1, 31):
            clock.advance(0.5)
            tel.training.record(loss=1.0)
            tel.step(step)
        tel.shutdown()
    for key in (
        "perf/tokens_per_second",
        "perf/samples_per_second",
        "perf/flops_per_second",
        "perf/mfu",
        "final/total_tokens",
        "final/total_samples",
    ):
        assert capture.values_of(key) == [], key
    assert capture.values_of("perf/steps_per_second") == pytest.approx([2.0] * 3)
    assert capture.values_of("final/total_steps") == [30.0]
    warned = _warnings(caplog, "no token count")
    assert len(warned) == 1
    assert "record(tokens=" in warned[0] and "seq_len=" in warned[0]
    assert "include_num_input_tokens_seen=True" in warned[0]


def test_recorded_samples_times_seq_len_give_tokens_flops_and_totals(telemetry_factory, clock):
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture],
        clock=clock,
        intervals={"perf": 10},
        seq_len=128,
        flops_per_token=1e6,
        peak_flops=1e12,
    )
    for step in range(1, 21):
        clock.advance(0.25)
        tel.training.record(samples=4)
        tel.step(step)
    tel.shutdown()
    assert capture.values_of("perf/tokens_per_second") == pytest.approx([4 * 128 / 0.25] * 2)
    assert capture.values_of("perf/flops_per_second") == pytest.approx([4 * 128 / 0.25 * 1e6] * 2)
    assert capture.values_of("final/total_tokens") == [20 * 4 * 128]
    assert capture.values_of("final/total_samples") == [80]


def test_effective_batch_gives_final_totals_when_the_loop_records_no_counts(
    telemetry_factory, clock
):
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture], clock=clock, intervals={"perf": 10}, batch_size=8, seq_len=64
    )
    for step in range(1, 26):  # 25 steps: the last 5 after the last perf sample
        clock.advance(0.1)
        tel.training.record(loss=0.5)
        tel.step(step)
    tel.shutdown()
    assert capture.values_of("final/total_samples") == [25 * 8]
    assert capture.values_of("final/total_tokens") == [25 * 8 * 64]


def test_mfu_above_one_is_not_exported_and_logged_once_with_both_numbers(
    telemetry_factory, clock, caplog
):
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture],
        clock=clock,
        intervals={"perf": 5},
        flops_per_token=1e9,
        peak_flops=1e12,  # 2000 tokens/s x 1e9 = 2e12 FLOP/s: 200% of this peak
    )
    with caplog.at_level(logging.ERROR, logger="otel_train"):
        for step in range(1, 21):
            clock.advance(0.5)
            tel.training.record(tokens=1000)
            tel.step(step)
        tel.flush()
    assert capture.values_of("perf/mfu") == []
    assert capture.values_of("perf/flops_per_second") == pytest.approx([2e12] * 4)
    errors = _warnings(caplog, "configuration error")
    assert len(errors) == 1
    assert "2e+12 FLOP/s" in errors[0] and "1e+12 FLOP/s" in errors[0] and "200%" in errors[0]
    assert "peak_flops=" in errors[0] and "flops_per_token=" in errors[0]


def test_an_mfu_above_one_turns_mfu_off_for_the_rest_of_the_run(telemetry_factory, clock):
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture],
        clock=clock,
        intervals={"perf": 5},
        flops_per_token=1e9,
        peak_flops=1e12,
    )
    for step in range(1, 21):
        clock.advance(0.5)
        tel.training.record(tokens=100 if step <= 5 else 1000)  # 20%, then 200%
        tel.step(step)
    tel.flush()
    # The first interval's 20% was exported; after the impossible 200% none is trusted, and
    # the gauge says so (NaN, JSON null) instead of repeating its last value.
    assert capture.steps_with("perf/mfu") == [5, 10, 15, 20]
    mfu = capture.values_of("perf/mfu")
    assert mfu[0] == pytest.approx(0.2) and all(math.isnan(v) for v in mfu[1:])


def test_dtype_without_a_cuda_device_warns_once_naming_peak_flops(telemetry_factory, clock, caplog):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    capture = CapturingExporter()
    with caplog.at_level(logging.WARNING, logger="otel_train"):
        tel = telemetry_factory(
            exporters=[capture],
            clock=clock,
            intervals={"perf": 5},
            flops_per_token=1e9,
            dtype="bf16",
        )
        for step in range(1, 11):
            clock.advance(1.0)
            tel.training.record(tokens=10)
            tel.step(step)
        tel.flush()
    assert capture.values_of("perf/mfu") == []
    assert capture.values_of("perf/flops_per_second") == pytest.approx([1e10, 1e10])
    warned = _warnings(caplog, "perf.mfu omitted")
    assert len(warned) == 1
    assert "dtype='bf16'" in warned[0] and "peak_flops=" in warned[0]


def test_a_peak_without_flops_per_token_warns_that_mfu_needs_the_model(
    telemetry_factory, clock, caplog
):
    with caplog.at_level(logging.WARNING, logger="otel_train"):
        telemetry_factory(clock=clock, peak_flops=1e12)
    warned = _warnings(caplog, "no FLOPs per token")
    assert len(warned) == 1 and "model=" in warned[0] and "flops_per_token=" in warned[0]


def test_grpo_counts_generated_tokens_forward_only_and_update_tokens_at_6n(
    telemetry_factory, clock
):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(32, 32, bias=False))  # N = 1024, no attention
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture], clock=clock, intervals={"perf": 5}, stage="grpo", model=model
    )
    generated = tel.meter.create_counter("train.generation_tokens", unit="{token}")
    for step in range(1, 11):
        clock.advance(1.0)
        tel.training.record(tokens=300)
        generated.add(torch.tensor(200))  # staged on the device like any counter
        tel.step(step)
    tel.flush()
    assert capture.values_of("perf/tokens_per_second") == pytest.approx([300.0, 300.0])
    achieved = 300 * 6 * 1024 + 200 * 2 * 1024
    assert capture.values_of("perf/flops_per_second") == pytest.approx([achieved] * 2)
    assert capture.values_of("train/generation_tokens") == [2000]  # cumulative, train group


def test_grpo_without_generation_tokens_warns_that_the_rollout_is_not_counted(
    telemetry_factory, clock, caplog
):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(8, 8, bias=False)
    capture = CapturingExporter()
    with caplog.at_level(logging.WARNING, logger="otel_train"):
        tel = telemetry_factory(
            exporters=[capture], clock=clock, intervals={"perf": 5}, stage="GRPO", model=model
        )
        for step in range(1, 11):
            clock.advance(1.0)
            tel.training.record(tokens=10)
            tel.step(step)
        tel.flush()
    assert capture.values_of("perf/flops_per_second") == pytest.approx([10 * 6 * 64] * 2)
    warned = _warnings(caplog, "generated tokens are not counted")
    assert len(warned) == 1 and "train.generation_tokens" in warned[0]


def test_dpo_stage_adds_the_reference_forward_and_counts_both_sequences_of_a_pair(
    telemetry_factory, clock
):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(16, 16, bias=False)  # N = 256
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture],
        clock=clock,
        intervals={"perf": 5},
        stage="dpo",
        model=model,
        seq_len=32,
        batch_size=4,  # 4 pairs per step: chosen + rejected, 2 x 32 tokens each
    )
    for step in range(1, 6):
        clock.advance(1.0)
        tel.training.record(loss=0.6)
        tel.step(step)
    tel.flush()
    assert capture.values_of("perf/tokens_per_second") == pytest.approx([4 * 2 * 32])
    # Policy forward + backward (6N) and the reference forward (2N) per token.
    assert capture.values_of("perf/flops_per_second") == pytest.approx([4 * 2 * 32 * 8 * 256])
