"""Stage instrument sets: the metrics SFT, DPO and PPO/GRPO add to the standard set.

One name per quantity for every framework: TRL's `rewards/margins`, a Lightning
`self.log("rewards_margin")` and a plain loop all land on `train.rewards.margin`. Each
entry says in which stages it has a meaning (`stages=None`: every stage). `TRAINER_KEYS`
maps the keys trainers log onto these names; any other key keeps its own name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Stand-in until otel_train/catalog.py lands (same fields, same meaning).


@dataclass(frozen=True, slots=True)
class InstrumentSpec:
    name: str
    kind: str
    unit: str
    description: str
    group: str
    meaning: str
    keyword: str | None = None
    stages: tuple[str, ...] | None = None
    summary: str | None = None


_MEAN = "mean of every value recorded in the interval"
_SUM = "sum over the interval (exported cumulative)"
# Stages whose loss is a token cross-entropy (perplexity has a meaning there).
TOKEN_CROSS_ENTROPY_STAGES: tuple[str, ...] = ("pretrain", "sft")
PREFERENCE_STAGES: tuple[str, ...] = ("dpo",)
RL_STAGES: tuple[str, ...] = ("ppo", "grpo", "rloo")


def _mean(name: str, description: str, stages: tuple[str, ...] | None, unit: str = "1") -> InstrumentSpec:
    return InstrumentSpec(name, "mean", unit, description, "train", _MEAN, stages=stages)


STAGE_INSTRUMENTS: tuple[InstrumentSpec, ...] = (
    # Token-level, wherever the trainer computes them (TRL: SFT, DPO; entropy in GRPO too).
    _mean(
        "train.token_accuracy",
        "Fraction of next-token predictions equal to the label",
        (*TOKEN_CROSS_ENTROPY_STAGES, *PREFERENCE_STAGES),
    ),
    _mean("train.entropy", "Mean per-token entropy of the predicted distribution (nats)", None),
    # Preference optimisation (DPO and its relatives).
    _mean("train.rewards.chosen", "Implicit reward of the chosen responses", PREFERENCE_STAGES),
    _mean("train.rewards.rejected", "Implicit reward of the rejected responses", PREFERENCE_STAGES),
    _mean("train.rewards.margin", "Chosen minus rejected implicit reward", PREFERENCE_STAGES),
    _mean(
        "train.rewards.accuracy",
        "Fraction of pairs whose chosen reward beats the rejected one",
        PREFERENCE_STAGES,
    ),
    _mean("train.logps.chosen", "Log-probability of the chosen responses", PREFERENCE_STAGES),
    _mean("train.logps.rejected", "Log-probability of the rejected responses", PREFERENCE_STAGES),
    _mean("train.logits.chosen", "Mean logit over the chosen responses", PREFERENCE_STAGES),
    _mean("train.logits.rejected", "Mean logit over the rejected responses", PREFERENCE_STAGES),
    # Reinforcement learning from generated completions (PPO, GRPO, RLOO).
    _mean("train.reward", "Mean reward of the generated completions", RL_STAGES),
    _mean("train.reward_std", "Standard deviation of the rewards", RL_STAGES),
    _mean("train.kl", "KL divergence of the policy from the reference model", RL_STAGES),
    _mean("train.clip_ratio", "Fraction of tokens whose probability ratio was clipped", RL_STAGES),
    _mean(
        "train.completion_length",
        "Mean length of the generated completions",
        RL_STAGES,
        unit="{token}",
    ),
    InstrumentSpec(
        "train.generation_tokens",
        "counter",
        "{token}",
        "Tokens generated for rollouts (completions), this rank's share",
        "train",
        _SUM,
        stages=RL_STAGES,
    ),
)

# Keys trainers log -> instrument names above (TRL 1.x SFT/DPO/GRPO/RLOO spellings).
TRAINER_KEYS: Mapping[str, str] = {
    "mean_token_accuracy": "train.token_accuracy",
    "entropy": "train.entropy",
    "rewards/chosen": "train.rewards.chosen",
    "rewards/rejected": "train.rewards.rejected",
    "rewards/margins": "train.rewards.margin",
    "rewards/accuracies": "train.rewards.accuracy",
    "logps/chosen": "train.logps.chosen",
    "logps/rejected": "train.logps.rejected",
    "logits/chosen": "train.logits.chosen",
    "logits/rejected": "train.logits.rejected",
    "reward": "train.reward",
    "reward_std": "train.reward_std",
    "kl": "train.kl",
    "clip_ratio/region_mean": "train.clip_ratio",
    "completions/mean_length": "train.completion_length",
}
