"""Stage instrument sets: the metrics SFT, DPO and PPO/GRPO add to the standard set.

One name per quantity for every framework: TRL's `rewards/margins`, a Lightning
`self.log("rewards_margin")` and a plain loop all land on `train.rewards.margin`. Each
entry says in which stages it has a meaning (`stages=None`: every stage). `TRAINER_KEYS`
maps the keys trainers log onto these names; any other key keeps its own name.
"""

from __future__ import annotations

from collections.abc import Mapping

from otel_train.catalog import CROSS_ENTROPY_STAGES, InstrumentSpec

_MEAN = "mean of every value recorded since the previous export (+ <key>_max)"
PREFERENCE_STAGES = frozenset({"dpo"})
RL_STAGES = frozenset({"ppo", "grpo", "rloo"})


def _mean(
    name: str, description: str, stages: frozenset[str] | None, unit: str = "1"
) -> InstrumentSpec:
    return InstrumentSpec(
        name=name, kind="mean", unit=unit, description=description, meaning=_MEAN, stages=stages
    )


STAGE_INSTRUMENTS: tuple[InstrumentSpec, ...] = (
    # Token-level, wherever the trainer computes them (TRL: SFT, DPO; entropy in GRPO too).
    _mean(
        "train.token_accuracy",
        "Fraction of next-token predictions equal to the label",
        CROSS_ENTROPY_STAGES | PREFERENCE_STAGES,
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
        name="train.generation_tokens",
        kind="counter",
        unit="{token}",
        description="Tokens generated for rollouts (completions), this rank's share",
        meaning="sum of every per-step amount (cumulative)",
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
