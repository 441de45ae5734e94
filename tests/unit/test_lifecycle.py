"""Setup and shutdown: idempotent, bounded, at exit too; the `exporters` name clash guard."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import otel_train
from otel_train.errors import ExporterClashError
from tests.conftest import REPO_ROOT


def test_shutdown_is_idempotent_and_recording_after_it_is_harmless(tmp_path, capture):
    tel = otel_train.setup(run="x", output_dir=tmp_path, exporters=[capture])
    tel.step(1)
    tel.shutdown()
    tel.shutdown()
    tel.training.record(loss=1.0)
    tel.step(2)
    assert capture.shut_down
    assert len(capture.steps_with("final/total_steps")) == 1


def test_resource_carries_the_run_identity(tmp_path, capture):
    with otel_train.setup(
        run="r1", stage="dpo", output_dir=tmp_path, exporters=[capture], intervals={"train": 1}
    ) as tel:
        tel.step(1)
        tel.flush()
    attributes = capture.batches[0].resource_metrics[0].resource.attributes
    assert attributes["service.name"] == "otel-train"
    assert (attributes["run"], attributes["stage"], attributes["rank"]) == ("r1", "dpo", 0)
    assert attributes["world_size"] == 1 and attributes["host.name"]


def test_interpreter_exit_flushes_without_an_explicit_shutdown(tmp_path):
    script = textwrap.dedent(
        f"""
        import otel_train
        tel = otel_train.setup(run="atexit", output_dir={str(tmp_path)!r}, exporters=("jsonl",),
                               intervals={{"train": 100}})
        for step in range(1, 8):
            tel.training.record(loss=0.25, tokens=3)
            tel.step(step)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO_ROOT, timeout=60)
    rows = [json.loads(x) for x in (tmp_path / "atexit" / "rank0.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 7 and rows[0]["metrics"]["train/num_input_tokens_seen"] == 21
    assert rows[-1]["metrics"]["final/total_tokens"] == 21


def test_a_foreign_exporters_package_is_detected_and_named(tmp_path):
    fake = tmp_path / "exporters"
    fake.mkdir()
    (fake / "__init__.py").write_text("# somebody else's package\n")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import otel_train
        try:
            otel_train.setup(run="x", output_dir={str(tmp_path / "out")!r}, exporters=("jsonl",))
        except otel_train.OtelTrainError as error:
            print(type(error).__name__, error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert "ExporterClashError" in result.stdout
    assert str(fake) in result.stdout and "shadows" in result.stdout


def test_clash_error_is_an_import_error_too():
    assert issubclass(ExporterClashError, ImportError)


def test_exporter_objects_of_the_wrong_type_are_rejected(tmp_path):
    with pytest.raises(otel_train.OtelTrainError, match="expected an OTel MetricExporter"):
        otel_train.setup(run="x", output_dir=tmp_path, exporters=[object()])  # type: ignore[list-item]
