"""The demo's MFU is believable: a real `otel-train demo` run's exported MFU is below 100% and
within 20% of the MFU from torch's FlopCounterMode count of one step of the same model; and a
real Hugging Face Trainer without a token count exports no 0.0 throughput."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from otel_train.cli import tiny_gpt  # noqa: E402
from otel_train.flop_counter import flop_counter_mode  # noqa: E402
from otel_train.testing import CapturingExporter  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _flop_counter_flops_per_token() -> float:
    """One training step of the demo's model (its default config), counted by torch."""
    model, _, sampler = tiny_gpt.build(tiny_gpt.TinyGptConfig(), torch.device("cpu"))
    with flop_counter_mode() as mode:
        model(*sampler.batch()).backward()
    return mode.get_total_flops() / sampler.tokens_per_batch


def test_demo_mfu_is_below_100_percent_and_within_20_percent_of_flop_counter_mfu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("OTEL_TRAIN_PROMETHEUS_PORT", None)
    result = subprocess.run(
        [sys.executable, "-m", "otel_train.cli", "demo", "--steps", "60", "--exporters", "jsonl",
         "--intervals", "train=10,perf=20", "--run", "mfu", "--output-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "mfu" / "rank0.jsonl").open()]
    perf = [row["metrics"] for row in rows if "perf/mfu" in row["metrics"]]
    assert len(perf) == 3  # steps 20, 40, 60
    counted = _flop_counter_flops_per_token()
    for metrics in perf:
        mfu = metrics["perf/mfu"]
        peak = metrics["perf/flops_per_second"] / mfu  # the demo's denominator
        counter_mfu = metrics["perf/tokens_per_second"] * counted / peak
        assert 0 < mfu < 1, metrics
        assert mfu == pytest.approx(counter_mfu, rel=0.2)
    assert "configuration error" not in result.stderr


def test_hf_trainer_without_token_count_exports_no_zero_throughput(telemetry_factory, tmp_path):
    transformers = pytest.importorskip("transformers")
    from otel_train.integrations.hf import OtelTrainCallback

    seq_len, vocab = 16, 64
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab)
    ids = torch.randint(0, vocab, (16, seq_len), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": row, "labels": row.clone()} for row in ids]
    captures = {}
    for name, options in {"plain": {}, "seq_len": {"seq_len": seq_len}}.items():
        model = transformers.GPT2LMHeadModel(config)
        capture = captures[name] = CapturingExporter()
        tel = telemetry_factory(
            run=name, exporters=[capture], intervals={"train": 2, "perf": 4},
            model=model, peak_flops=1e15, **options,
        )  # fmt: skip
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=8,
            logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, include_num_input_tokens_seen=False, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=train, callbacks=[OtelTrainCallback(tel)]
        )
        trainer.train()
        tel.shutdown()
    plain, derived = captures["plain"], captures["seq_len"]
    for key in ("perf/tokens_per_second", "perf/flops_per_second", "perf/mfu"):
        assert plain.values_of(key) == [], key  # unknown: absent, not 0.0
    assert plain.values_of("final/total_tokens") == []
    assert plain.values_of("perf/steps_per_second")  # what is known still comes
    # With seq_len= the Trainer's samples x seq_len give tokens, so FLOP/s and MFU appear.
    assert derived.values_of("perf/tokens_per_second") and all(
        v > 0 for v in derived.values_of("perf/mfu")
    )
    assert derived.values_of("final/total_tokens") == [8 * 2 * seq_len]
