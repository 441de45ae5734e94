"""The finisher thread: sampled steps finished in order, off the training thread; a failing
one does not stop the later ones; a drain forces copies in flight; backpressure loses nothing."""

from __future__ import annotations

import logging
import threading
import time

from otel_train import finisher as finisher_module
from otel_train.finisher import SampledStepFinisher


class Job:
    def __init__(self, name: str, *, ready: bool = True, fails: bool = False) -> None:
        self.name, self.is_ready, self.fails = name, ready, fails

    def ready(self) -> bool:
        return self.is_ready


def _collecting() -> tuple[list[tuple[str, int]], object]:
    done: list[tuple[str, int]] = []

    def finish(job: Job) -> None:
        if job.fails:
            raise RuntimeError(f"broken {job.name}")
        done.append((job.name, threading.get_ident()))

    return done, finish


def test_jobs_are_finished_in_order_on_another_thread():
    done, finish = _collecting()
    fin = SampledStepFinisher(finish)
    for name in "abc":
        fin.submit(Job(name))
    assert fin.drain(5)
    assert [name for name, _ in done] == ["a", "b", "c"]
    assert {thread for _, thread in done} != {threading.get_ident()}


def test_a_job_not_ready_holds_back_the_later_ones_until_a_drain_forces_it():
    done, finish = _collecting()
    fin = SampledStepFinisher(finish)
    first = Job("first", ready=False)
    fin.submit(first)
    fin.submit(Job("second"))
    time.sleep(0.05)  # many polls
    assert done == []  # order first: counter and histogram deltas depend on it
    assert fin.drain(5)  # forced, as event.synchronize() would
    assert [name for name, _ in done] == ["first", "second"]


def test_a_failing_job_is_logged_once_and_later_jobs_still_finish(caplog):
    done, finish = _collecting()
    fin = SampledStepFinisher(finish)
    with caplog.at_level(logging.ERROR, logger="otel_train.finisher"):
        fin.submit(Job("bad", fails=True))
        fin.submit(Job("bad again", fails=True))
        fin.submit(Job("good"))
        assert fin.drain(5)
    assert [name for name, _ in done] == ["good"]
    assert fin.failed == 2 and fin.finished == 1
    assert len([r for r in caplog.records if "broken bad" in r.getMessage()]) == 1


def test_falling_behind_makes_submit_wait_for_room_never_drop(monkeypatch, caplog):
    monkeypatch.setattr(finisher_module, "MAX_IN_FLIGHT", 2)
    gate = threading.Event()
    done: list[str] = []

    def slow(job: Job) -> None:
        gate.wait(5)
        done.append(job.name)

    fin = SampledStepFinisher(slow)
    releaser = threading.Timer(0.2, gate.set)
    with caplog.at_level(logging.WARNING, logger="otel_train.finisher"):
        releaser.start()
        for index in range(6):
            fin.submit(Job(str(index)))
        assert fin.drain(5)
    assert done == [str(i) for i in range(6)]  # all of them, in order
    assert any("fell 2 steps behind" in r.getMessage() for r in caplog.records)


def test_drain_from_the_finisher_thread_itself_returns_at_once():
    results: list[bool] = []
    fin: SampledStepFinisher[Job]

    def finish(job: Job) -> None:  # e.g. an observable callback that calls tel.flush()
        results.append(fin.drain(5))

    fin = SampledStepFinisher(finish)
    fin.submit(Job("a"))
    assert fin.drain(5)
    assert results == [False]


def test_stop_drains_then_refuses_new_jobs():
    done, finish = _collecting()
    fin = SampledStepFinisher(finish)
    fin.submit(Job("a"))
    assert fin.stop(5)
    fin.submit(Job("late"))
    assert [name for name, _ in done] == ["a"]
    assert fin.in_flight() == 0
