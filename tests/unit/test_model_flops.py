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


class LoRALinear(torch.nn.Module):
    """LoRA (Hu et al. 2021) as PEFT builds it: the frozen base layer, then the trainable
    low-rank pair, y = base(x) + B(A(x))."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


def _lora_tiny_gpt():
    model, sampler = _tiny_gpt()
    model.requires_grad_(False)
    for block in model.blocks:
        block.mlp[0], block.mlp[2] = LoRALinear(block.mlp[0]), LoRALinear(block.mlp[2])
    return model, sampler


def test_lora_counts_frozen_weights_forward_and_input_gradients_as_torch_runs_them():
    from otel_train.model_flops import matmul_parameters

    model, sampler = _lora_tiny_gpt()
    parts = matmul_parameters(model)
    # Before block 0's first adapter nothing learns (attention, the MLP's first base layer);
    # every later base weight passes gradients down to an adapter; the adapters learn.
    assert parts.frozen_below == 4 * H * H + 4 * H * H  # in_proj + out_proj + mlp.0's base
    assert parts.trained == L * 2 * (H * 4 + 4 * 4 * H)  # rank-4 A and B at mlp.0 and mlp.2
    assert parts.total == count_matmul_parameters(model) == MATMUL_PARAMS + parts.trained
    mode = flop_counter_mode()
    with mode:
        model(*sampler.batch()).backward()
    by_op = {str(op): flops for op, flops in mode.get_flop_counts()["Global"].items()}
    weight_matmuls = sum(f for op, f in by_op.items() if "scaled_dot_product" not in op)
    measured = weight_matmuls / sampler.tokens_per_batch
    analytic = 6 * parts.trained + 4 * parts.frozen_through + 2 * parts.frozen_below
    # Exact but for block 0's first A matrix: its input needs no gradient either (2 x 4H).
    assert analytic - measured == 2 * 4 * H
    total = mode.get_total_flops() / sampler.tokens_per_batch
    # The attention term assumes a backward in every layer; block 0's runs none here.
    assert flops_per_token(model, seq_len=T) == pytest.approx(total, rel=0.07)
    # Counting the trained weights alone (what MFU did before) read 3.2x low here (about
    # 9x for rank-8 adapters on a 7B Llama at 2,048 tokens).
    assert 6 * parts.trained + 12 * L * H * T < total / 3


def test_a_frozen_model_without_trainable_weights_costs_its_forward_and_a_full_one_six_n():
    from otel_train.model_flops import matmul_parameters

    model, _ = _tiny_gpt()
    assert matmul_parameters(model).trained == MATMUL_PARAMS  # all trainable: 6N as before
    model.requires_grad_(False)
    frozen = matmul_parameters(model)
    assert frozen.frozen_below == MATMUL_PARAMS and frozen.backward_savings == 4 * MATMUL_PARAMS
    # The forward (generation, a reference model) counts every weight, frozen or not.
    assert flops_per_generated_token(model, seq_len=T) == 2 * MATMUL_PARAMS + 4 * L * H * T
