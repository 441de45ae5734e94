"""Analytic FLOPs per token against torch's FlopCounterMode on the demo's tiny GPT, the
parameters that count (matmul weights only), integral floats, and the stage rules."""

from __future__ import annotations

import pytest

from otel_train import OtelTrainError, flops_per_generated_token, flops_per_token
from otel_train.model_flops import STAGE_PASSES, count_matmul_parameters
from otel_train.testing import CapturingExporter

torch = pytest.importorskip("torch")

from otel_train.cli import tiny_gpt  # noqa: E402
from otel_train.flop_counter import flop_counter_mode  # noqa: E402

CONFIG = tiny_gpt.TinyGptConfig()
L, H, T = CONFIG.num_layers, CONFIG.hidden_size, CONFIG.seq_len
# Matmul weights of the tiny GPT: per layer attention in/out projections (4 H x H) and the MLP
# (2 x H x 4H); the output head H x 256. Not matmuls: token and position lookups, biases, norms.
MATMUL_PARAMS = L * (4 * H * H + 8 * H * H) + H * tiny_gpt.VOCAB_SIZE


def _tiny_gpt():
    model, _, sampler = tiny_gpt.build(CONFIG, torch.device("cpu"))
    return model, sampler


def _counted_step(model, sampler, mode) -> float:
    """FLOPs per token of one training step (forward + backward) as `mode` counts them."""
    with mode:
        model(*sampler.batch()).backward()
    return mode.get_total_flops() / sampler.tokens_per_batch


def test_tiny_gpt_flops_per_token_counts_only_its_matmul_weights():
    model, _ = _tiny_gpt()
    assert count_matmul_parameters(model) == MATMUL_PARAMS == 67_584
    assert flops_per_token(model, seq_len=T) == 6 * MATMUL_PARAMS + 12 * L * H * T == 479_232
    # Before: 6 x every parameter (lookups, biases, norms too) + 12LHT.
    assert 6 * tiny_gpt.parameter_count(model) + 12 * L * H * T == 579_456


def test_tiny_gpt_analytic_flops_match_torch_flop_counter_within_3_percent():
    model, sampler = _tiny_gpt()
    measured = _counted_step(model, sampler, flop_counter_mode())
    # torch's SDPA backward formula adds the flash-attention score recomputation (2LHT), a
    # hardware FLOP that the MFU convention leaves out: 6N + 14LHT against 6N + 12LHT.
    assert measured == 6 * MATMUL_PARAMS + 14 * L * H * T
    assert flops_per_token(model, seq_len=T) == pytest.approx(measured, rel=0.03)
    # torch 2.13's own counter sees no CPU attention at all (pytorch/pytorch#195460).
    from torch.utils.flop_counter import FlopCounterMode

    stock = _counted_step(model, sampler, FlopCounterMode(display=False))
    assert 6 * MATMUL_PARAMS <= stock <= measured


def test_measure_flops_counts_cpu_attention_in_the_first_step(telemetry_factory):
    model, sampler = _tiny_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture], intervals={"perf": 2}, model=model, seq_len=T, measure_flops=True
    )
    for step in range(1, 5):
        tiny_gpt.train_step(model, optimizer, sampler.batch())
        tel.training.record(tokens=sampler.tokens_per_batch)
        tel.step(step)
    tel.flush()
    per_step = (6 * MATMUL_PARAMS + 14 * L * H * T) * sampler.tokens_per_batch
    assert capture.values_of("perf/actual_flops") == [per_step, per_step]


def test_flops_per_token_accepts_integral_floats_and_rejects_fractions():
    assert flops_per_token(n_params=7e9) == 6 * 7e9
    assert flops_per_token(n_params=7e9, n_layers=32.0, hidden_size=4096, seq_len=4096.0) == (
        6 * 7e9 + 12 * 32 * 4096 * 4096
    )
    with pytest.raises(OtelTrainError, match="n_params must be a positive whole number"):
        flops_per_token(n_params=7.5)
    with pytest.raises(OtelTrainError, match="seq_len"):
        flops_per_token(n_params=100, seq_len=True)


def test_stage_rules_add_the_reference_forward_and_split_generation():
    args = {"n_params": 1000, "n_layers": 2, "hidden_size": 8, "seq_len": 16}
    forward = 2 * 1000 + 4 * 2 * 8 * 16  # 2N + 4LHT
    assert flops_per_token(**args) == 3 * forward  # 6N + 12LHT
    assert flops_per_token(**args, stage="sft") == 3 * forward
    assert flops_per_token(**args, stage="dpo") == 4 * forward  # + reference forward
    assert flops_per_token(**args, stage="dpo", reference_model=False) == 3 * forward
    assert flops_per_token(**args, stage="ppo") == 4 * forward  # KL to the reference
    assert flops_per_token(**args, stage="grpo") == 3 * forward  # TRL default beta=0.0
    assert flops_per_token(**args, stage="grpo", reference_model=True) == 4 * forward
    assert flops_per_generated_token(**args) == forward
    assert STAGE_PASSES["grpo"].generation and not STAGE_PASSES["dpo"].generation
    with pytest.raises(OtelTrainError, match=r"no FLOPs rule for stage 'kto'.*dpo"):
        flops_per_token(**args, stage="kto")


def test_an_untied_input_embedding_is_a_lookup_and_not_counted():
    embed = torch.nn.Embedding(100, 8)
    head = torch.nn.Linear(8, 100, bias=True)
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    assert count_matmul_parameters(model) == 800  # the head's weight; no lookup, no bias
    head.weight = embed.weight  # tied: counted once, as the output projection
    assert count_matmul_parameters(model) == 800
