"""The one table of standard instruments: name, kind, unit, description, group, meaning.

Everything that needs to know the standard set reads it from here: instrument creation,
`record()` keywords and their validation, the cross-rank reducer's slots, the W&B summaries
and the README's metric table (`python -m otel_train.catalog` prints it). Adding a standard
metric is one entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Kinds. "mean": exported as the mean of every value recorded since the previous export,
# with a `<name>_max` companion (the interval maximum); accumulated on the device.
KINDS = ("counter", "up_down_counter", "histogram", "gauge", "mean")


@dataclass(frozen=True, slots=True, kw_only=True)
class InstrumentSpec:
    """One standard instrument. `stages=None`: every stage; `summary`: W&B run summary."""

    name: str
    kind: str
    description: str
    meaning: str
    unit: str = ""
    keyword: str | None = None  # the `record()` keyword that stages it, if any
    stages: frozenset[str] | None = None
    summary: str | None = None  # "min" | "max" | "last" for the W&B summary
    reduce: str | None = None  # "mean" | "sum" across ranks (reduce_across_ranks=True)

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]

    def applies_to(self, stage: str) -> bool:
        return self.stages is None or stage in self.stages


# Stages whose training loss is a token cross-entropy, so exp(loss) is a perplexity.
# DPO / PPO / GRPO losses are not: exp(0.61) of a DPO loss means nothing.
CROSS_ENTROPY_STAGES = frozenset({"train", "pretrain", "sft", "finetune", "cpt", "midtrain"})

STANDARD_INSTRUMENTS: tuple[InstrumentSpec, ...] = (
    InstrumentSpec(
        name="train.loss", kind="mean", keyword="loss", summary="min", reduce="mean",
        description="Training loss, mean over the interval",
        meaning="mean of every value recorded since the previous export (+ train/loss_max)",
    ),
    InstrumentSpec(
        name="train.learning_rate", kind="gauge", keyword="learning_rate", reduce="mean",
        description="Learning rate", meaning="last value recorded",
    ),
    InstrumentSpec(
        name="train.grad_norm", kind="mean", keyword="grad_norm", reduce="mean",
        description="Global gradient norm, mean over the interval",
        meaning="mean of every value recorded since the previous export (+ train/grad_norm_max)",
    ),
    InstrumentSpec(
        name="train.tokens", kind="counter", keyword="tokens", unit="{token}", reduce="sum",
        description="Tokens consumed by training (cumulative)",
        meaning="sum of every per-step amount (cumulative)",
    ),
    InstrumentSpec(
        name="train.samples", kind="counter", keyword="samples", unit="{sample}", reduce="sum",
        description="Samples consumed by training (cumulative)",
        meaning="sum of every per-step amount (cumulative)",
    ),
    InstrumentSpec(
        name="train.epoch", kind="gauge", keyword="epoch", reduce="mean",
        description="Epoch (fractional where known)", meaning="last value recorded",
    ),
    InstrumentSpec(
        name="train.nonfinite", kind="counter", unit="{value}",
        description="Recorded values that were NaN or inf (or dropped as unusable)",
        meaning="count over the run (cumulative)",
    ),
    InstrumentSpec(
        name="train.global_step", kind="gauge",
        description="Optimizer step; the x-axis of every backend",
        meaning="the step of the export",
    ),
    InstrumentSpec(
        name="train.perplexity", kind="gauge", stages=CROSS_ENTROPY_STAGES, summary="min",
        description="exp(interval mean training loss)",
        meaning="exp(train/loss); cross-entropy stages only",
    ),
    InstrumentSpec(
        name="perf.step_time", kind="histogram", unit="s",
        description="Wall time between consecutive steps",
        meaning="every step's duration (mean, p50, p95 of the interval)",
    ),
    InstrumentSpec(
        name="perf.tokens_per_second", kind="gauge", unit="{token}/s", summary="max",
        description="Tokens per second, all of this rank's",
        meaning="token delta / time since the previous perf export",
    ),
    InstrumentSpec(
        name="perf.samples_per_second", kind="gauge", unit="{sample}/s", summary="max",
        description="Samples per second", meaning="sample delta / time since previous export",
    ),
    InstrumentSpec(
        name="perf.steps_per_second", kind="gauge", unit="{step}/s", summary="max",
        description="Optimizer steps per second", meaning="step delta / time since previous",
    ),
    InstrumentSpec(
        name="perf.eta", kind="gauge", unit="s",
        description="Estimated time to total_steps", meaning="remaining steps / steps per second",
    ),
    InstrumentSpec(
        name="perf.flops_per_second", kind="gauge", unit="{flop}/s", summary="max",
        description="Achieved model FLOP/s", meaning="tokens per second x FLOPs per token",
    ),
    InstrumentSpec(
        name="perf.mfu", kind="gauge", unit="1", summary="max",
        description="Model FLOPs utilisation (achieved / peak)",
        meaning="achieved FLOP/s / peak FLOP/s of this rank's devices",
    ),
    InstrumentSpec(
        name="eval.loss", kind="gauge", summary="min",
        description="Evaluation loss", meaning="the value passed to evaluate()",
    ),
    InstrumentSpec(
        name="eval.perplexity", kind="gauge", stages=CROSS_ENTROPY_STAGES, summary="min",
        description="exp(evaluation loss)", meaning="exp(eval/loss); cross-entropy stages only",
    ),
    InstrumentSpec(
        name="eval.best_perplexity", kind="gauge", stages=CROSS_ENTROPY_STAGES, summary="min",
        description="Lowest evaluation perplexity so far", meaning="running minimum",
    ),
)  # fmt: skip

# Event-time values (epoch / final summaries): gauges created on first use, described here.
EVENT_DESCRIPTIONS: Mapping[str, str] = {
    "epoch.number": "Epoch that just ended",
    "epoch.steps": "Optimizer steps in the epoch",
    "epoch.tokens": "Tokens in the epoch",
    "epoch.samples": "Samples in the epoch",
    "epoch.duration": "Wall time of the epoch",
    "epoch.tokens_per_second": "Mean tokens per second over the epoch",
    "epoch.train_loss_mean": "Mean of every training loss recorded in the epoch",
    "final.total_steps": "Steps at the end of the run",
    "final.total_tokens": "Tokens over the run",
    "final.total_samples": "Samples over the run",
    "final.wall_time": "Wall time from setup to shutdown",
    "final.best_perplexity": "Lowest evaluation perplexity of the run",
    "final.best_eval_loss": "Lowest evaluation loss of the run",
    "final.train_loss": "Last training loss recorded (NaN if the run diverged)",
}

BY_NAME: Mapping[str, InstrumentSpec] = {spec.name: spec for spec in STANDARD_INSTRUMENTS}
BY_KEYWORD: Mapping[str, InstrumentSpec] = {
    spec.keyword: spec for spec in STANDARD_INSTRUMENTS if spec.keyword
}
RECORD_KEYWORDS: tuple[str, ...] = tuple(BY_KEYWORD)


def max_companion(name: str) -> str:
    """`train.loss` -> `train.loss_max`: the interval maximum beside a mean instrument."""
    return f"{name}_max"


def instrument_names(specs: Iterable[InstrumentSpec] = STANDARD_INSTRUMENTS) -> tuple[str, ...]:
    names: list[str] = []
    for spec in specs:
        names.append(spec.name)
        if spec.kind == "mean":
            names.append(max_companion(spec.name))
    return tuple(names)


def describe(name: str) -> str:
    spec = BY_NAME.get(name)
    if spec is not None:
        return spec.description
    return EVENT_DESCRIPTIONS.get(name) or f"{name} (recorded by otel-train)"


def markdown_table(specs: Iterable[InstrumentSpec] = STANDARD_INSTRUMENTS) -> str:
    """The README's metric table, generated so it cannot drift from the code."""
    from otel_train.naming import KeyNamer

    namer = KeyNamer()
    lines = [
        "| instrument | kind | unit | W&B / JSON key | exported value |",
        "| --- | --- | --- | --- | --- |",
    ]
    for spec in specs:
        keys = ", ".join(f"`{k.key}`" for k in namer.keys_for(spec.name))
        if spec.kind == "mean":
            keys += f", `{namer.key(max_companion(spec.name))}`"
        unit = f"`{spec.unit}`" if spec.unit else ""
        lines.append(f"| `{spec.name}` | {spec.kind} | {unit} | {keys} | {spec.meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - documentation helper
    import sys

    sys.stdout.write(markdown_table() + "\n")
