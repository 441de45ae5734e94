"""A sampled step's values may still be on their way from the device (CUDA: a non-blocking copy
into pinned memory behind an event). The finisher thread exports them once the copy has
completed, in the order they were sampled; events, flush and shutdown force what is in flight.
Always labelled with the step they were sampled at, none lost, none twice, and the training
thread never waits (not even at the next sampled step).

No GPU here: `HeldTransfer` stands in for the CUDA copy. It snapshots the values when the copy
is started (as the device copy does) with the real CPU path, and reports completion only when
the test says so; a forced wait completes it, as `event.synchronize()` does.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from otel_train.transfer import DeviceTransfer, PendingValues

torch = pytest.importorskip("torch")


class HeldPending:
    def __init__(self, inner: PendingValues, owner: HeldTransfer) -> None:
        self._inner, self._owner, self.done = inner, owner, False

    def ready(self) -> bool:
        return self.done

    def values(self) -> list[list[float]]:
        if not self.done:
            self._owner.forced += 1  # the real one: event.synchronize()
            self.done = True
        return self._inner.values()


class HeldTransfer:
    """A fake CUDA copy: values as of `start()`, complete only when `complete()` is called."""

    def __init__(self) -> None:
        self.started: list[HeldPending] = []
        self.forced = 0

    def start(self, requests: Any) -> HeldPending:
        pending = HeldPending(DeviceTransfer().start(requests), self)  # snapshot now
        self.started.append(pending)
        return pending

    def complete(self) -> None:
        for pending in self.started:
            pending.done = True


def _train(tel: Any, steps: range) -> None:
    for step in steps:
        tel.training.record(loss=torch.tensor(float(step)), tokens=10, grad_norm=1.0)
        tel.step(step)


def _delivered(tel: Any) -> None:
    """Wait for the finisher and the export threads, forcing nothing still in flight: a step
    whose copy has completed is exported within a few poll intervals."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.02)  # > several finisher polls
        if tel._finisher.in_flight() == 0 or not _head_ready(tel):
            break
    assert tel.reader.wait_idle(5_000)


def _head_ready(tel: Any) -> bool:
    jobs = list(tel._finisher._jobs)
    return bool(jobs) and jobs[0].ready()


def test_rows_wait_for_the_copy_and_carry_the_step_they_were_sampled_at(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 5, "perf": 1000})
    held = HeldTransfer()
    tel._registry.transfer = held  # the seam a CUDA copy goes through
    _train(tel, range(1, 6))
    _delivered(tel)
    assert capture.steps_with("train/loss") == []  # step 5's copy has not completed
    _train(tel, range(6, 8))
    _delivered(tel)
    assert capture.steps_with("train/loss") == []
    held.complete()  # no later step needed: the finisher sees it complete and exports it
    _delivered(tel)
    assert capture.steps_with("train/loss") == [5]
    assert capture.values_of("train/loss") == [3.0]  # mean of steps 1..5, not later ones
    assert capture.values_of("train/global_step") == [5.0]  # the sampled step, not step 7
    assert capture.values_of("train/num_input_tokens_seen") == [50.0]
    assert held.forced == 0  # nobody waited


def test_the_next_sampled_step_waits_for_nothing_events_and_shutdown_force_in_order(
    telemetry_factory, capture
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 5, "perf": 1000})
    held = HeldTransfer()
    tel._registry.transfer = held
    _train(tel, range(1, 11))  # steps 5 and 10 both in flight: step 10 did not force step 5
    _delivered(tel)
    assert held.forced == 0
    assert capture.steps_with("train/loss") == []
    tel.evaluate(loss=2.0)  # an event: exports steps 5 and 10 first, then itself
    assert held.started[0].done and held.started[1].done  # forced (event.synchronize())
    _train(tel, range(11, 14))  # step 15 never comes: shutdown exports the tail
    tel.shutdown()
    assert capture.steps_with("train/loss") == [5, 10, 13]  # each once, in order
    assert capture.values_of("train/loss") == [3.0, 8.0, 12.0]
    assert capture.values_of("train/num_input_tokens_seen") == [50.0, 100.0, 130.0]
    assert capture.steps_with("eval/loss") == [10]
    assert [row.step for row in capture.rows if "eval/loss" in row.values] == [10]
    eval_row = next(i for i, row in enumerate(capture.rows) if "eval/loss" in row.values)
    assert eval_row == 2  # after both sampled steps before it
    assert capture.values_of("final/total_tokens") == [130.0]


def test_a_later_step_completing_first_still_waits_its_turn(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 5, "perf": 1000})
    held = HeldTransfer()
    tel._registry.transfer = held
    _train(tel, range(1, 11))
    held.started[1].done = True  # step 10's copy completes, step 5's does not
    _delivered(tel)
    assert capture.steps_with("train/loss") == []  # histogram and counter deltas need order
    held.started[0].done = True
    _delivered(tel)
    assert capture.steps_with("train/loss") == [5, 10]


def test_flush_exports_a_sampled_step_still_in_flight(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 5, "perf": 1000})
    tel._registry.transfer = HeldTransfer()
    _train(tel, range(1, 6))
    tel.flush()
    assert capture.steps_with("train/loss") == [5]


def test_on_the_cpu_a_sampled_step_is_exported_without_a_later_step_or_flush(
    telemetry_factory, capture
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 5, "perf": 1000})
    _train(tel, range(1, 6))
    _delivered(tel)  # no flush, no later step: the finisher exported step 5 on its own
    assert capture.steps_with("train/loss") == [5]
    assert capture.values_of("train/loss") == [3.0]


def test_values_recorded_while_a_copy_is_in_flight_belong_to_the_next_interval(
    telemetry_factory, capture
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 2, "perf": 1000})
    held = HeldTransfer()
    tel._registry.transfer = held
    loss = torch.tensor(1.0)
    tel.training.record(loss=loss)
    tel.step(1)
    tel.training.record(loss=loss)
    tel.step(2)  # sampled: the copy of [1, 1] is started
    loss.fill_(100.0)  # later in-place changes do not reach the copy already made
    tel.training.record(loss=torch.tensor(5.0))
    tel.step(3)
    tel.training.record(loss=torch.tensor(7.0))
    tel.step(4)  # step 2 still in flight, step 4 queued behind it
    tel.flush()
    assert capture.values_of("train/loss") == [1.0, 6.0]
    assert capture.values_of("train/loss_max") == [1.0, 7.0]
