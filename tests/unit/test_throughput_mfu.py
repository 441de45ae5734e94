"""Effective batch size on realistic DeepSpeed configs, FLOPs per token and MFU against
published figures, the peak FLOP/s table, and setup() deriving perf.mfu from its options."""

from __future__ import annotations

import json
import logging

import pytest

import otel_train
from otel_train import OtelTrainError, effective_batch_size, flops_per_token, mfu, peak_flops
from otel_train.testing import CapturingExporter

# DeepSpeed's own examples (DeepSpeedExamples / docs "ZeRO" tutorial), trimmed to the batch keys.
ZERO2_WITH_TRAIN_BATCH = {
    "train_batch_size": 256,
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 4,
    "fp16": {"enabled": True},
    "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True},
}
ZERO3_WITHOUT_TRAIN_BATCH = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 16,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e5},
}
HF_TRAINER_AUTO = {  # the Hugging Face integration's template: the Trainer fills "auto"
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 2},
}


def test_effective_batch_uses_train_batch_size_and_checks_it_against_the_product():
    assert effective_batch_size(ZERO2_WITH_TRAIN_BATCH, world_size=8) == 256
    with pytest.raises(OtelTrainError, match="256 != micro batch 8 x gradient accumulation 4"):
        effective_batch_size(ZERO2_WITH_TRAIN_BATCH, world_size=4)


def test_effective_batch_without_train_batch_size_is_micro_times_accumulation_times_world():
    assert effective_batch_size(ZERO3_WITHOUT_TRAIN_BATCH, world_size=64) == 4 * 16 * 64


def test_effective_batch_derives_the_missing_value_like_deepspeed():
    only_train = {"train_batch_size": 32}
    assert effective_batch_size(only_train, world_size=4) == 32  # micro 8, accumulation 1
    with pytest.raises(OtelTrainError, match="inconsistent"):
        effective_batch_size({"train_batch_size": 30}, world_size=4)  # 30 / 4 not whole
    assert effective_batch_size({"train_micro_batch_size_per_gpu": 2}, world_size=3) == 6


def test_effective_batch_reads_a_json_config_path(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ZERO3_WITHOUT_TRAIN_BATCH))
    assert effective_batch_size(path, world_size=2) == 128
    assert effective_batch_size(str(path), world_size=2) == 128


def test_auto_values_are_rejected_unless_resolvable():
    with pytest.raises(OtelTrainError, match='train_batch_size="auto"'):
        effective_batch_size(HF_TRAINER_AUTO, world_size=2)
    resolved = effective_batch_size(
        HF_TRAINER_AUTO,
        micro_batch_size=8,
        gradient_accumulation_steps=2,
        world_size=2,
        batch_size=32,
    )
    assert resolved == 32
    with pytest.raises(OtelTrainError, match="inconsistent"):
        effective_batch_size(
            HF_TRAINER_AUTO,
            micro_batch_size=8,
            gradient_accumulation_steps=2,
            world_size=2,
            batch_size=64,
        )


def test_keyword_values_that_contradict_the_config_are_rejected():
    with pytest.raises(OtelTrainError, match="disagrees"):
        effective_batch_size(ZERO2_WITH_TRAIN_BATCH, micro_batch_size=16, world_size=8)


def test_effective_batch_without_any_size_says_what_to_give():
    with pytest.raises(OtelTrainError, match="train_micro_batch_size_per_gpu"):
        effective_batch_size({"zero_optimization": {"stage": 2}}, world_size=1)


# PaLM (Chowdhery et al. 2022), Table 3 and appendix B "Computing MFU": model FLOPs per token
# = 6N + 12*L*H*Q*T. Rows reproduced: (params, layers, hidden = H*Q, seq len, tokens/s, chips,
# peak FLOP/s per chip, published MFU).
PALM_TABLE_3 = [
    # PaLM 540B: 118 layers, 48 heads x 256, T=2048, 238.3K tokens/s on 6144 TPU v4 (275 TF/s)
    ("PaLM 540B", 540.35e9, 118, 48 * 256, 2048, 238.3e3, 6144, 275e12, 0.462),
    # Megatron-Turing NLG 530B: 105 layers, hidden 20480, T=2048, 65.43K tokens/s on 2240 A100
    ("MT-NLG 530B", 530e9, 105, 20480, 2048, 65.43e3, 2240, 312e12, 0.302),
]


@pytest.mark.parametrize("row", PALM_TABLE_3, ids=[row[0] for row in PALM_TABLE_3])
def test_flops_per_token_and_mfu_reproduce_palm_table_3_within_2_percent(row):
    _, n_params, layers, hidden, seq_len, tokens_per_s, chips, peak, published = row
    fpt = flops_per_token(
        n_params=int(n_params), n_layers=layers, hidden_size=hidden, seq_len=seq_len
    )
    assert fpt == pytest.approx(6 * n_params + 12 * layers * hidden * seq_len)
    value = mfu(tokens_per_s, fpt, peak_flops=peak, devices=chips)
    assert value == pytest.approx(published, rel=0.02)


def test_flops_per_token_counts_gpt2_matmul_weights_tied_embedding_once_no_positions():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    # Matmul weights: per layer c_attn 64x192, c_proj 64x64, c_fc 64x256, mlp c_proj 256x64;
    # the tied wte / lm_head 128x64 once. Not counted: wpe (a lookup), biases, layer norms.
    matmul = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64) + 128 * 64
    assert flops_per_token(model, seq_len=32) == 6 * matmul + 12 * 2 * 64 * 32
    # Frozen, the tied head still runs its forward and passes gradients down to the trained
    # blocks (4 per weight, no weight gradient). It used to be left out entirely, which is
    # what made LoRA runs read ~1% MFU (tests/unit/test_model_flops.py measures the rule).
    model.lm_head.weight.requires_grad_(False)
    assert flops_per_token(model, seq_len=32) == 6 * matmul - 2 * 128 * 64 + 12 * 2 * 64 * 32


def test_peak_flops_table_matches_driver_names_and_dtypes():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "fp8") == pytest.approx(1513e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == pytest.approx(312e12)
    assert peak_flops("NVIDIA A100 80GB PCIe", "tf32") == pytest.approx(156e12)
    assert peak_flops("NVIDIA GeForce RTX 4090", "float16") == pytest.approx(165.2e12)
    assert peak_flops("Tesla V100-SXM2-16GB", "fp16") == pytest.approx(125e12)
    torch = pytest.importorskip("torch")
    assert peak_flops("NVIDIA H200", torch.bfloat16) == pytest.approx(989.4e12)


def test_unknown_device_or_dtype_gives_none_and_one_warning_naming_the_option(caplog):
    with caplog.at_level(logging.WARNING, logger="otel_train.peak_table"):
        assert peak_flops("Imaginary Accelerator 9000", "bf16") is None
        assert peak_flops("Imaginary Accelerator 9000", "bf16") is None
        assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # V100 has no bf16 cores
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("Imaginary Accelerator 9000" in w for w in warnings) == 1
    assert all("peak_flops" in w and "OTEL_TRAIN_PEAK_FLOPS" in w for w in warnings)


def test_setup_derives_mfu_from_deepspeed_config_seq_len_and_peak(telemetry_factory, clock):
    # No tokens recorded: the effective batch (per rank) x seq_len stands in for them.
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture],
        clock=clock,
        intervals={"train": 10, "perf": 10},
        deepspeed_config=ZERO3_WITHOUT_TRAIN_BATCH,
        world_size=2,
        seq_len=1024,
        flops_per_token=1e9,
        peak_flops=200e12,  # was 100e12: an MFU of 131%, now refused as a configuration error
    )
    for step in range(1, 21):
        clock.advance(0.5)
        tel.training.record(loss=1.0)
        tel.step(step)
    tel.flush()
    per_rank_tokens_per_step = 4 * 16 * 1024  # micro x accumulation x seq_len
    tokens_per_second = capture.values_of("perf/tokens_per_second")
    assert tokens_per_second == pytest.approx([per_rank_tokens_per_step / 0.5] * 2)
    assert capture.values_of("perf/mfu") == pytest.approx(
        [per_rank_tokens_per_step / 0.5 * 1e9 / 200e12] * 2
    )


def test_setup_with_a_device_name_as_peak_and_recorded_tokens(telemetry_factory, clock):
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture],
        clock=clock,
        intervals={"perf": 5},
        flops_per_token=2e9,
        peak_flops="NVIDIA A100-SXM4-40GB",
        dtype="bf16",
    )
    for step in range(1, 6):
        clock.advance(0.25)
        tel.training.record(tokens=4096)
        tel.step(step)
    tel.flush()
    assert capture.values_of("perf/mfu") == pytest.approx([4096 / 0.25 * 2e9 / 312e12])


def test_setup_rejects_an_inconsistent_deepspeed_config_before_training(telemetry_factory):
    with pytest.raises(OtelTrainError, match="inconsistent"):
        telemetry_factory(deepspeed_config=ZERO2_WITH_TRAIN_BATCH, world_size=3)


def test_mfu_is_omitted_without_a_peak(telemetry_factory, clock):
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture], clock=clock, intervals={"perf": 2}, flops_per_token=1e9
    )
    for step in range(1, 5):
        clock.advance(1.0)
        tel.training.record(tokens=10)
        tel.step(step)
    tel.flush()
    assert capture.values_of("perf/flops_per_second") == pytest.approx([1e10, 1e10])
    assert capture.values_of("perf/mfu") == []


def test_public_helpers_are_exported():
    for name in ("effective_batch_size", "flops_per_token", "peak_flops", "mfu"):
        assert name in otel_train.__all__
