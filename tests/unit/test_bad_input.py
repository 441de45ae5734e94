"""Bad input: a clear error naming the problem and the fix; nothing recorded is lost."""

from __future__ import annotations

import json
import math
import os

import pytest

import otel_train
from otel_train import OtelTrainError, SamplingView, StepOrderError, UnknownMetricError


def test_unknown_exporter_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(OtelTrainError, match=r"unknown exporter.*'jsonl'.*'prometheus'"):
        otel_train.setup(run="x", output_dir=tmp_path, exporters=("jsnol",))


@pytest.mark.parametrize("bad", [0, -5, 2.5, "10", True])
def test_interval_must_be_a_positive_int(tmp_path, bad):
    with pytest.raises(OtelTrainError, match=r"intervals\['train'\] must be a positive int"):
        otel_train.setup(run="x", output_dir=tmp_path, exporters=(), intervals={"train": bad})


def test_sampling_view_rejects_a_bad_interval():
    with pytest.raises(OtelTrainError, match="positive int"):
        SamplingView(instrument_name="train.*", every_n_steps=0)


def test_two_views_claiming_one_instrument_with_different_intervals(tmp_path):
    views = [
        SamplingView(instrument_name="train.*", every_n_steps=10),
        SamplingView(instrument_name="train.loss", every_n_steps=5),
    ]
    with pytest.raises(OtelTrainError, match=r"'train\.\*'.*'train\.loss'.*different intervals"):
        otel_train.setup(run="x", output_dir=tmp_path, exporters=(), intervals=views)


def test_overlapping_views_with_the_same_interval_are_fine(tmp_path):
    views = [
        SamplingView(instrument_name="train.*", every_n_steps=10),
        SamplingView(instrument_name="train.loss", every_n_steps=10),
    ]
    otel_train.setup(run="x", output_dir=tmp_path, exporters=(), intervals=views).shutdown()


def test_step_going_backwards_names_both_steps(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 1})
    tel.training.record(loss=1.0)
    tel.step(5)
    with pytest.raises(StepOrderError, match=r"3 after 5"):
        tel.step(3)
    tel.training.record(loss=2.0)
    tel.step(6)
    tel.flush()
    assert capture.steps_with("train/loss") == [5, 6]


def test_resume_from_allows_the_axis_to_continue_from_a_checkpoint(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 1})
    for step in (1, 2, 3):
        tel.training.record(loss=float(step))
        tel.step(step)
    tel.resume_from(1)
    tel.training.record(loss=9.0)
    tel.step(2)
    tel.flush()
    assert capture.steps_with("train/loss") == [1, 2, 3, 2]


def test_step_must_be_an_int(telemetry_factory):
    tel = telemetry_factory(exporters=())
    with pytest.raises(OtelTrainError, match="int step number"):
        tel.step("7")  # type: ignore[arg-type]
    with pytest.raises(OtelTrainError, match="int step number"):
        tel.step(3.5)  # type: ignore[arg-type]


def test_negative_counter_increment_is_rejected_and_earlier_counts_kept(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 2})
    tel.training.record(tokens=10)
    tel.step(1)
    with pytest.raises(OtelTrainError, match=r"train\.tokens is a counter and cannot decrease"):
        tel.training.record(tokens=-3)
    tel.training.record(tokens=5)
    tel.step(2)
    tel.flush()
    assert capture.values_of("train/num_input_tokens_seen") == [15]


def test_unknown_record_keyword_lists_the_valid_ones(telemetry_factory):
    tel = telemetry_factory(exporters=())
    with pytest.raises(UnknownMetricError, match=r"'los'.*loss, learning_rate, grad_norm"):
        tel.training.record(los=1.0)
    with pytest.raises(TypeError):  # also what Python users expect for a bad keyword
        tel.training.record(lr=1.0)


def test_non_finite_host_values_are_recorded_flagged_and_do_not_crash(telemetry_factory):
    tel = telemetry_factory(exporters=("jsonl",), intervals={"train": 1})
    tel.training.record(loss=float("inf"), grad_norm=float("nan"), learning_rate=1e-4)
    tel.step(1)
    tel.training.record(loss=1.0, grad_norm=2.0)
    tel.step(2)
    tel.shutdown()
    lines = (tel.context.run_dir / "rank0.jsonl").read_text().splitlines()
    first = json.loads(lines[0])  # strict JSON: bare NaN / Infinity would not parse here
    assert first["metrics"]["train/loss"] is None and first["metrics"]["train/grad_norm"] is None
    assert first["nonfinite"] == {
        "train/loss": "inf",
        "train/loss_max": "inf",
        "train/grad_norm": "nan",
        "train/grad_norm_max": "nan",
        "train/perplexity": "inf",
    }
    assert first["metrics"]["train/learning_rate"] == 1e-4
    second = json.loads(lines[1])
    assert second["metrics"]["train/loss"] == 1.0 and "nonfinite" not in second
    assert math.isclose(second["metrics"]["train/perplexity"], math.e)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; chmod cannot block it")
def test_unwritable_output_dir_fails_at_setup_with_the_option_to_change(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(OtelTrainError, match=r"cannot write JSON lines.*output_dir="):
        otel_train.setup(run="x", output_dir=locked, exporters=("jsonl",))


def test_output_dir_that_is_a_file_fails_at_setup_with_the_option_to_change(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(OtelTrainError, match=r"cannot write JSON lines.*output_dir="):
        otel_train.setup(run="x", output_dir=not_a_dir, exporters=("jsonl",))


@pytest.mark.parametrize(
    ("run", "folder"),
    # A name that had to change gets a hash of the original: `a/b` never shares `a_b`'s folder.
    [("team/exp-1", "team_exp-1-"), ("../../etc", "_._.._etc-"), ("a..b", "a..b")],
)
def test_run_name_is_made_file_safe_and_kept_verbatim_in_the_data(tmp_path, run, folder):
    tel = otel_train.setup(
        run=run, output_dir=tmp_path, exporters=("jsonl",), intervals={"train": 1}
    )
    tel.training.record(loss=1.0)
    tel.step(1)
    tel.shutdown()
    (path,) = tmp_path.glob("*/rank0.jsonl")
    assert path.parent.name.startswith(folder) and path.parent.name.count("/") == 0
    assert path.parent.resolve().parent == tmp_path.resolve()
    assert json.loads(path.read_text().splitlines()[0])["run"] == run


def test_bad_max_queue_and_total_steps(tmp_path):
    with pytest.raises(OtelTrainError, match="max_queue_batches"):
        otel_train.setup(run="x", output_dir=tmp_path, exporters=(), max_queue_batches=0)
    with pytest.raises(OtelTrainError, match="total_steps"):
        otel_train.setup(run="x", output_dir=tmp_path, exporters=(), total_steps=-1)


def test_a_non_finite_gauge_is_never_shown_as_the_last_good_value(telemetry_factory, capture):
    """The SDK drops NaN and would keep exporting the last good loss: we must not. A step
    that recorded no loss exports none (absent), neither the NaN nor the last good one."""
    tel = telemetry_factory(exporters=[capture], intervals={"train": 1})
    for step, loss in ((1, 1.0), (2, float("nan")), (3, None), (4, 0.5)):
        tel.training.record(loss=loss, tokens=1)
        tel.step(step)
    tel.flush()
    losses = capture.values_of("train/loss")
    assert capture.steps_with("train/loss") == [1, 2, 4]
    assert losses[0] == 1.0 and math.isnan(losses[1]) and losses[2] == 0.5
