"""Analytic FLOPs per token, by training stage: which parameters do matmuls, which passes run.

One forward pass costs F = 2N + 4*L*H*T per token (PaLM, Chowdhery et al. 2022, appendix B):
2N for the matmul weights (one multiply-add per weight), 4LHT for the attention score (QK^T)
and value (AV) matmuls, not halved for causal masks. Backward costs two forwards (gradients
with respect to activations and to weights), so a trained token costs 3F = 6N + 12LHT, which
is PaLM's MFU formula and Megatron-LM's (Narayanan et al. 2021, eq. 3) without recomputation.
A frozen weight (LoRA's base model) costs no weight gradient: 4 per token, or 2 when nothing
registered before it learns (`MatmulParameters`).
Stages add passes (see `STAGE_PASSES`): DPO a reference-model forward per trained token,
PPO / GRPO a forward-only generation phase counted per generated token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otel_train.errors import OtelTrainError
from otel_train.validation import is_positive_int

_logger = logging.getLogger(__name__)

_LAYER_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN_ATTRS = ("hidden_size", "n_embd", "d_model")


@dataclass(frozen=True, slots=True, kw_only=True)
class StagePasses:
    """What one stage runs, in forward passes of the policy's size."""

    reference_model: bool = False  # default: a same-size reference forward per trained token
    generation: bool = False  # a rollout phase whose tokens cost one forward each
    sequences_per_sample: int = 1  # sequences per sample of the effective batch


# Stage label (setup(stage=...)) -> passes. Sources for the defaults:
# - DPO (Rafailov et al. 2023): the loss needs log-probs of a frozen reference model on the
#   chosen and rejected sequences (TRL's DPOTrainer runs it each step unless
#   precompute_ref_log_probs=True or a reference-free loss is used); a sample is one pair.
# - PPO (Ouyang et al. 2022): rollouts are generated, then the policy is updated with a KL
#   penalty to the reference model, whose forward runs on every trained token.
# - GRPO (Shao et al. 2024): rollouts, then the update; TRL's GRPOConfig defaults to beta=0.0,
#   which loads no reference model, so none is counted unless reference_model=True.
STAGE_PASSES: Mapping[str, StagePasses] = {
    "train": StagePasses(),
    "pretrain": StagePasses(),
    "sft": StagePasses(),
    "dpo": StagePasses(reference_model=True, sequences_per_sample=2),
    "ppo": StagePasses(reference_model=True, generation=True),
    "grpo": StagePasses(generation=True),
}


@dataclass(frozen=True, slots=True)
class StageFlops:
    """FLOPs per trained token (what `record(tokens=)` counts) and, for stages with a
    rollout, per generated token (what the `train.generation_tokens` counter counts)."""

    trained: float
    generated: float | None


def stage_passes(stage: str) -> StagePasses:
    """The passes of a known stage; an unknown label is rejected with the known ones."""
    passes = STAGE_PASSES.get(stage.lower())
    if passes is None:
        raise OtelTrainError(
            f"no FLOPs rule for stage {stage!r}; known: {', '.join(STAGE_PASSES)}. Pass "
            "flops_per_token=<your count> for other stages."
        )
    return passes


def _ndim(parameter: Any) -> int:
    shape = getattr(parameter, "ds_shape", None)  # ZeRO-3 keeps the full shape here
    return len(shape) if shape is not None else int(parameter.dim())


def _numel(parameter: Any) -> int:
    return int(getattr(parameter, "ds_numel", 0) or parameter.numel())


@dataclass(frozen=True, slots=True)
class MatmulParameters:
    """A model's matmul weights by what one training step does with them, per token.

    - `trained` (requires_grad): forward, input gradients and weight gradients, 6 FLOPs each;
    - `frozen_through`: frozen, with a trainable parameter registered before them, so the
      gradients of that parameter flow back through them: forward and input gradients, 4;
    - `frozen_below`: frozen and registered before every trainable parameter (nothing below
      them learns, autograd computes no gradient there): forward only, 2.
    LoRA / PEFT: the base weights are frozen_through (frozen_below up to the first adapter),
    the adapters trained. Counting the trained weights alone read such a run's MFU several
    times too low (3.2x on the LoRA test model).
    Registration order stands for the forward order, as in every Hugging Face model.
    """

    trained: int = 0
    frozen_through: int = 0
    frozen_below: int = 0

    @property
    def total(self) -> int:
        return self.trained + self.frozen_through + self.frozen_below

    @property
    def backward_savings(self) -> int:
        """FLOPs per token that 3 forwards (6 per weight) count but a step does not run."""
        return 2 * self.frozen_through + 4 * self.frozen_below


def matmul_parameters(model: Any) -> MatmulParameters:
    """The parameters that multiply activations: weights of 2 or more dimensions, each tensor
    once (tied weights, ZeRO-3 partitions in full), split as `MatmulParameters` says.

    Left out: embedding lookups (`nn.Embedding` / `nn.EmbeddingBag`: learned positions such
    as GPT-2's `wpe`, an untied input embedding), which index rows instead of multiplying;
    a lookup table that is also a layer's weight (input and output embeddings tied) is
    counted once, as that output projection. Also left out: 1-D parameters (biases, norm
    scales and shifts), whose work is elementwise, as torch's FlopCounterMode counts it.
    """
    modules = getattr(model, "modules", None)
    # In registration order, each tensor once: (parameter, counts as a matmul weight).
    ordered: dict[int, tuple[Any, bool]] = {}
    if modules is None:  # not a torch module: every >= 2-D parameter
        for parameter in model.parameters():
            ordered.setdefault(id(parameter), (parameter, _ndim(parameter) >= 2))
    else:
        from torch import nn

        lookups = (nn.Embedding, nn.EmbeddingBag)
        for module in modules():
            lookup = isinstance(module, lookups)
            for parameter in module.parameters(recurse=False):
                counts = not lookup and _ndim(parameter) >= 2
                seen = ordered.get(id(parameter))
                if seen is None or (counts and not seen[1]):
                    # A lookup tied to a layer's weight counts as that layer, in its place.
                    ordered.pop(id(parameter), None)
                    ordered[id(parameter)] = (parameter, counts)
    trained = through = below = 0
    anything_trained = False  # in registration order: has a trainable parameter come yet?
    for parameter, counts in ordered.values():
        learns = bool(getattr(parameter, "requires_grad", True))
        if counts:
            size = _numel(parameter)
            if learns:
                trained += size
            elif anything_trained:
                through += size
            else:
                below += size
        anything_trained = anything_trained or learns
    return MatmulParameters(trained=trained, frozen_through=through, frozen_below=below)


def count_matmul_parameters(model: Any) -> int:
    """Every matmul weight of `model`, trainable or frozen (`matmul_parameters(model).total`):
    the N of a forward pass, 2N FLOPs per token."""
    return matmul_parameters(model).total


def _as_count(name: str, value: Any) -> int | None:
    """A positive whole number; integral floats (`n_params=7e9`) are accepted."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_positive_int(value):
        raise OtelTrainError(f"{name} must be a positive whole number, got {value!r}")
    return value


def _first_attr(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def forward_flops_terms(
    model: Any = None,
    *,
    seq_len: Any = None,
    n_params: Any = None,
    n_layers: Any = None,
    hidden_size: Any = None,
) -> tuple[float, float]:
    """(2N, 4LHT): one forward's matmul-weight and attention FLOPs per token.

    N from `n_params` or `count_matmul_parameters(model)`; L and H from the arguments or a
    Hugging Face style `model.config`. Without L, H or T the attention term is 0 and a
    warning says so.
    """
    n = _as_count("n_params", n_params)
    if n is None:
        if model is None:
            raise OtelTrainError("flops_per_token needs model= or n_params=")
        n = count_matmul_parameters(model)
    layers = _as_count("n_layers", n_layers)
    hidden = _as_count("hidden_size", hidden_size)
    tokens = _as_count("seq_len", seq_len)
    config = getattr(model, "config", None)
    if config is not None:
        layers = layers if layers is not None else _first_attr(config, _LAYER_ATTRS)
        hidden = hidden if hidden is not None else _first_attr(config, _HIDDEN_ATTRS)
    if not (layers and hidden and tokens):
        _logger.warning(
            "otel-train: FLOPs per token without the attention term (need seq_len=, and layers "
            "and hidden size from model.config or n_layers= / hidden_size=); MFU reads low "
            "for long sequences"
        )
        return 2.0 * n, 0.0
    return 2.0 * n, 4.0 * layers * hidden * tokens


def stage_flops_per_token(
    model: Any = None,
    *,
    stage: str = "train",
    reference_model: bool | None = None,
    seq_len: Any = None,
    n_params: Any = None,
    n_layers: Any = None,
    hidden_size: Any = None,
) -> StageFlops:
    """Both counts of a stage, from one look at the model (see the module docstring)."""
    passes = stage_passes(stage)
    # One walk over the model gives N and what frozen weights (LoRA) skip: their weight
    # gradients, and below every trainable one their input gradients too. With n_params=
    # given, every weight counts as trained.
    matmul = matmul_parameters(model) if n_params is None and model is not None else None
    weights, attention = forward_flops_terms(
        model,
        seq_len=seq_len,
        n_params=n_params if matmul is None else matmul.total,
        n_layers=n_layers,
        hidden_size=hidden_size,
    )
    forward = weights + attention
    with_reference = passes.reference_model if reference_model is None else reference_model
    savings = 0 if matmul is None else matmul.backward_savings
    trained = 3.0 * forward - savings + (forward if with_reference else 0.0)
    return StageFlops(trained=trained, generated=forward if passes.generation else None)


def flops_per_token(
    model: Any = None,
    *,
    seq_len: Any = None,
    n_params: Any = None,
    n_layers: Any = None,
    hidden_size: Any = None,
    stage: str = "train",
    reference_model: bool | None = None,
) -> float:
    """Training FLOPs per trained token: 6N + 12*L*H*T (PaLM appendix B), N the matmul
    parameters (`count_matmul_parameters`); frozen weights (LoRA) count 4 or 2 instead of 6
    (`MatmulParameters`).

    `stage="dpo"` (or `reference_model=True` in any stage) adds a same-size reference
    model's forward, 2N + 4LHT. For "ppo" / "grpo" this is the policy update only; their
    generated tokens cost `flops_per_generated_token()` each.
    """
    return stage_flops_per_token(
        model,
        stage=stage,
        reference_model=reference_model,
        seq_len=seq_len,
        n_params=n_params,
        n_layers=n_layers,
        hidden_size=hidden_size,
    ).trained


def flops_per_generated_token(
    model: Any = None,
    *,
    seq_len: Any = None,
    n_params: Any = None,
    n_layers: Any = None,
    hidden_size: Any = None,
) -> float:
    """One forward per token, 2N + 4LHT: a token sampled in a PPO / GRPO rollout, no
    backward. T is the full sequence length: with a KV cache a sampled token attends to the
    context so far, so for short prompts this is an upper bound."""
    weights, attention = forward_flops_terms(
        model, seq_len=seq_len, n_params=n_params, n_layers=n_layers, hidden_size=hidden_size
    )
    return weights + attention
