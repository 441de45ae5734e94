"""The optimised row builder gives the same rows and JSON lines as the verbatim reference."""

from __future__ import annotations

import math

import torch

import otel_train
from exporters.jsonl import row_to_json
from otel_train.naming import AttributeSuffixes, KeyNamer, attribute_suffix
from otel_train.rows import RowBuilder, bucket_quantile
from otel_train.testing import CapturingExporter
from tests.reference_export import ReferenceRowBuilder, reference_row_to_json
from tests.reference_export import bucket_quantile as reference_bucket_quantile


def _batches(tmp_path):  # a real run: standard set, histograms, attributes, NaN and inf
    cap = CapturingExporter()
    tel = otel_train.setup(
        run="eq", output_dir=tmp_path, exporters=[cap], intervals={"train": 1, "perf": 2},
        handle_signals=False, gpu_metrics=False, system_metrics=False,
    )  # fmt: skip
    latency = tel.meter.create_histogram("user.latency", unit="s")
    reward = tel.meter.create_gauge("user.reward")
    for n in range(1, 25):
        loss = float("nan") if n == 7 else (float("inf") if n == 9 else 3.0 / n)
        tel.training.record(loss=torch.tensor(loss), learning_rate=1e-4 * n, grad_norm=0.5 + n,
                            tokens=1000 + n, samples=4, epoch=n // 10)  # fmt: skip
        latency.record(0.01 * (n % 5 + 1), {"kind": "io", "rank": n % 2})
        reward.set(-1.0 / 3 * n, {"policy": "a b/c", "flag": n % 2 == 0})
        reward.set(1.0, {"policy": 1.0})
        tel.step(n)
    tel.evaluate(loss=float("nan"))
    tel.shutdown()
    return cap.batches


def test_rows_and_json_lines_match_the_reference_byte_for_byte(tmp_path):
    batches = _batches(tmp_path)
    namer = KeyNamer()
    new, old = RowBuilder(namer), ReferenceRowBuilder(namer)
    lines, nonfinite_seen, histogram_keys = 0, False, set()
    for batch in batches:
        row, expected = new.build(batch), old.build(batch)
        assert row.step == expected.step and row.time == expected.time
        assert list(row.values) == list(expected.values)  # same keys, same order
        for key, value in expected.values.items():
            got = row.values[key]
            assert (math.isnan(got) and math.isnan(value)) or got == value, key
        assert row.nonfinite == expected.nonfinite
        nonfinite_seen = nonfinite_seen or bool(row.nonfinite)
        histogram_keys |= {k for k in row.values if k.endswith("_p95")}
        line = row_to_json(row, run="eq", stage="sft", rank=0)
        assert line == reference_row_to_json(expected, run="eq", stage="sft", rank=0)
        lines += 1
    assert lines > 20 and nonfinite_seen
    assert {"perf/step_time_p95"} < histogram_keys  # explicit and exponential histograms
    assert any(k.startswith("user/latency/kind_io") for k in histogram_keys)


def test_cached_attribute_suffixes_keep_equal_but_differently_spelled_values_apart():
    suffixes = AttributeSuffixes()
    for attributes in ({"a": 1}, {"a": 1.0}, {"a": True}, {"a": 1}, {1: "x"}, {True: "x"},
                       {"b": (1, 2)}, {"b": (True, 2)}, {"z": 1, "a": "q"}):  # fmt: skip
        assert suffixes.of(attributes) == attribute_suffix(attributes)


def test_two_quantiles_in_one_walk_equal_one_call_each():
    bounds = (0.1, 0.2, 0.5, 1.0)
    for counts in ((0.0, 3.0, 0.0, 1.0, 2.0), (5.0, 0, 0, 0, 0), (0.0, 0, 0, 0, 7.0), (0.0,) * 5):
        for q in (0.0, 0.5, 0.95, 1.0):
            for low, high in ((0.0, None), (0.05, 1.7), (0.15, 0.3)):
                got = bucket_quantile(q, bounds, counts, low=low, high=high)
                assert got == reference_bucket_quantile(q, bounds, counts, low=low, high=high)
