"""Run summaries (otel_train/summaries.py) through `tel.evaluate`, `tel.end_epoch` and shutdown:
bests ignore non-finite results, epoch means count every recorded loss, totals split by epoch."""

from __future__ import annotations

import math

import pytest


def test_a_nan_eval_loss_never_becomes_the_best(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 10})
    for step, loss in ((1, 1.0), (2, math.nan), (3, 2.0)):
        tel.step(step)
        tel.evaluate(loss=loss)
    tel.shutdown()
    assert capture.values_of("eval/best_perplexity") == pytest.approx([math.e] * 3)
    assert capture.values_of("final/best_eval_loss") == [1.0]


def test_epoch_train_loss_mean_counts_every_recorded_loss_not_only_sampled_ones(
    telemetry_factory, capture
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 10})
    for step in range(1, 11):
        tel.training.record(loss=float(step), tokens=4, samples=1)
        tel.step(step)
    tel.end_epoch(0)
    for step in range(11, 16):  # a second epoch, ended before its losses were ever sampled
        tel.training.record(loss=1.0, tokens=2, samples=1)
        tel.step(step)
    tel.end_epoch(1)
    tel.shutdown()
    assert capture.values_of("epoch/train_loss_mean") == pytest.approx([5.5, 1.0])
    assert capture.values_of("epoch/tokens") == [40, 10]
    assert capture.values_of("epoch/steps") == [10, 5]
    assert capture.values_of("final/total_tokens") == [50]
    assert capture.values_of("final/train_loss") == [1.0]
