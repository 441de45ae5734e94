"""Real TRL SFT, DPO and GRPO runs (tiny Llama from a config, word-level tokenizer built
locally, CPU, no downloads) with OtelTrainCallback: the JSON lines hold every metric the
trainer logged, at the step it logged it, under one name per quantity, and no perplexity
where the loss is not a token cross-entropy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

import otel_train  # noqa: E402
from otel_train.integrations.hf import OtelTrainCallback  # noqa: E402
from tests.integration import tiny_lm  # noqa: E402

pytestmark = pytest.mark.integration

INTERVAL, MAX_STEPS = 2, 4
# Trainer log key -> exported key, for the keys with a standard or catalog name. Any other
# key is exported as train/<key with "/" -> "_">.
CATALOGUED = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "num_tokens": "train/num_input_tokens_seen",
    "mean_token_accuracy": "train/token_accuracy",
    "entropy": "train/entropy",
    "rewards/chosen": "train/rewards_chosen",
    "rewards/rejected": "train/rewards_rejected",
    "rewards/margins": "train/rewards_margin",
    "rewards/accuracies": "train/rewards_accuracy",
    "logps/chosen": "train/logps_chosen",
    "logps/rejected": "train/logps_rejected",
    "logits/chosen": "train/logits_chosen",
    "logits/rejected": "train/logits_rejected",
    "reward": "train/reward",
    "reward_std": "train/reward_std",
    "clip_ratio/region_mean": "train/clip_ratio",
    "completions/mean_length": "train/completion_length",
}
SHARED = {
    "train/loss",
    "train/learning_rate",
    "train/grad_norm",
    "train/epoch",
    "train/entropy",
    "train/num_input_tokens_seen",
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")


def _common_args(tmp_path: Path, **overrides) -> dict:
    args = dict(
        output_dir=str(tmp_path / "trainer"),
        max_steps=MAX_STEPS,
        logging_steps=INTERVAL,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    args.update(overrides)
    return args


def _telemetry(tmp_path: Path, stage: str):
    return otel_train.setup(
        run=stage,
        stage=stage,
        output_dir=tmp_path / "runs",
        exporters=["jsonl"],
        intervals={"train": INTERVAL, "perf": INTERVAL},
        gpu_metrics=False,
    )


def _rows(tmp_path: Path, stage: str) -> list[dict]:
    lines = (tmp_path / "runs" / stage / "rank0.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _train_rows(rows: list[dict]) -> dict[int, dict]:
    return {row["step"]: row["metrics"] for row in rows if "train/loss" in row["metrics"]}


def _eval_rows(rows: list[dict]) -> dict[int, dict]:
    return {row["step"]: row["metrics"] for row in rows if "eval/loss" in row["metrics"]}


def _exported_key(trainer_key: str, group: str = "train") -> str:
    key = CATALOGUED.get(trainer_key) or f"train/{trainer_key.replace('/', '_')}"
    return group + key[key.index("/") :]


def _train_logs(trainer) -> list[dict]:
    return [
        entry
        for entry in trainer.state.log_history
        if "loss" in entry and not any(k.endswith("_runtime") for k in entry)
    ]


def _assert_every_train_log_exported(trainer, rows: list[dict]) -> set[str]:
    """Step by step: each logged value is in the row of the step it was logged at."""
    exported = _train_rows(rows)
    logs = _train_logs(trainer)
    assert sorted(exported) == [entry["step"] for entry in logs] == [2, 4]
    keys: set[str] = set()
    for entry in logs:
        row = exported[entry["step"]]
        for key, value in entry.items():
            if key == "step" or value is None:
                continue
            name = _exported_key(key)
            assert name in row, f"{key} logged at step {entry['step']} but not exported"
            assert row[name] == pytest.approx(value, rel=1e-6, abs=1e-9), key
            keys.add(name)
    return keys


def _assert_eval_matches_train_keys(trainer, rows: list[dict], train_keys: set[str]) -> None:
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    exported = _eval_rows(rows)
    assert sorted(exported) == [e["step"] for e in evals] == [2, 4]
    for entry in evals:
        row = exported[entry["step"]]
        for key, value in entry.items():
            name = key.removeprefix("eval_")
            if name in ("runtime", "samples_per_second", "steps_per_second", "num_tokens"):
                continue
            if name in ("epoch", "step"):
                continue
            assert row[_exported_key(name, "eval")] == pytest.approx(value, rel=1e-6, abs=1e-9)
    # One naming rule for train and eval: the trainer's own metrics carry the same names.
    standard = {"loss", "learning_rate", "grad_norm", "epoch", "num_input_tokens_seen"}
    train_names = {k.removeprefix("train/") for k in train_keys} - standard
    eval_names = {
        k.removeprefix("eval/") for row in exported.values() for k in row if k.startswith("eval/")
    }
    assert eval_names - {"loss", "perplexity", "best_perplexity"} == train_names


def _all_keys(rows: list[dict]) -> set[str]:
    return {key for row in rows for key in row["metrics"]}


def test_sft_trainer_metrics_exported_at_their_steps_with_perplexity(tmp_path):
    texts = tiny_lm.sentences(16, 8, seed=1)
    data = datasets.Dataset.from_list([{"text": t} for t in texts])
    tel = _telemetry(tmp_path, "sft")
    args = trl.SFTConfig(
        **_common_args(tmp_path, eval_strategy="steps", eval_steps=INTERVAL), max_length=16
    )
    trainer = trl.SFTTrainer(
        model=tiny_lm.llama(),
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(4)),
        processing_class=tiny_lm.tokenizer(),
        callbacks=[OtelTrainCallback(tel)],
    )
    trainer.train()
    tel.shutdown()
    rows = _rows(tmp_path, "sft")

    keys = _assert_every_train_log_exported(trainer, rows)
    assert {"train/token_accuracy", "train/entropy"} <= keys
    _assert_eval_matches_train_keys(trainer, rows, keys)
    # A token cross-entropy: perplexity is meaningful and derived.
    assert {"train/perplexity", "eval/perplexity"} <= _all_keys(rows)
    # TRL counts tokens even without include_num_input_tokens_seen: throughput has them.
    assert (
        _train_rows(rows)[4]["train/num_input_tokens_seen"]
        == _train_logs(trainer)[-1]["num_tokens"]
    )
    # The epoch stays fractional: 4 steps of an 8-step epoch end at 0.5, not round(0.5) = 0.
    epochs = [row["metrics"]["epoch/number"] for row in rows if "epoch/number" in row["metrics"]]
    assert epochs == [pytest.approx(trainer.state.epoch)] == [pytest.approx(0.5)]


def _preference_data():
    prompts = tiny_lm.sentences(16, 3, seed=2)
    chosen, rejected = tiny_lm.sentences(16, 3, seed=3), tiny_lm.sentences(16, 3, seed=4)
    return datasets.Dataset.from_list(
        [
            {"prompt": p, "chosen": c, "rejected": r}
            for p, c, r in zip(prompts, chosen, rejected, strict=True)
        ]
    )


def test_dpo_trainer_keeps_rewards_logps_logits_and_derives_no_perplexity(tmp_path):
    data = _preference_data()
    tel = _telemetry(tmp_path, "dpo")
    args = trl.DPOConfig(
        **_common_args(tmp_path, eval_strategy="steps", eval_steps=INTERVAL), max_length=16
    )
    trainer = trl.DPOTrainer(
        model=tiny_lm.llama(),
        ref_model=tiny_lm.llama(),
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(4)),
        processing_class=tiny_lm.tokenizer(),
        callbacks=[OtelTrainCallback(tel)],
    )
    trainer.train()
    tel.shutdown()
    rows = _rows(tmp_path, "dpo")

    keys = _assert_every_train_log_exported(trainer, rows)
    preference = {
        "train/rewards_chosen",
        "train/rewards_rejected",
        "train/rewards_margin",
        "train/rewards_accuracy",
        "train/logps_chosen",
        "train/logps_rejected",
        "train/logits_chosen",
        "train/logits_rejected",
    }
    assert preference | SHARED | {"train/token_accuracy"} <= keys
    _assert_eval_matches_train_keys(trainer, rows, keys)
    assert not [key for key in _all_keys(rows) if "perplexity" in key]


def test_grpo_trainer_keeps_rollout_metrics_counts_generated_tokens_no_perplexity(tmp_path):
    generated: list[int] = []

    def reward_length(completions, completion_ids, **kwargs):
        generated.extend(len(ids) for ids in completion_ids)
        return [float(len(ids)) for ids in completion_ids]

    data = datasets.Dataset.from_list([{"prompt": p} for p in tiny_lm.sentences(16, 3, seed=5)])
    tel = _telemetry(tmp_path, "grpo")
    args = trl.GRPOConfig(**_common_args(tmp_path), max_completion_length=4, num_generations=2)
    trainer = trl.GRPOTrainer(
        model=tiny_lm.llama(),
        reward_funcs=reward_length,
        args=args,
        train_dataset=data,
        processing_class=tiny_lm.tokenizer(),
        callbacks=[OtelTrainCallback(tel)],
    )
    trainer.train()
    tel.shutdown()
    rows = _rows(tmp_path, "grpo")

    keys = _assert_every_train_log_exported(trainer, rows)
    rollout = {"train/reward", "train/reward_std", "train/clip_ratio", "train/completion_length"}
    assert rollout | SHARED | {"train/completions_max_length"} <= keys
    assert not [key for key in _all_keys(rows) if "perplexity" in key]
    # Generated tokens: the completions' lengths the reward function saw, summed.
    assert _train_rows(rows)[MAX_STEPS]["train/generation_tokens"] == pytest.approx(sum(generated))


def test_shared_metrics_have_one_name_in_every_trl_trainer():
    """The names the three runs above assert come from one table, not three."""
    from otel_train.integrations._keys import instrument_name
    from otel_train.naming import default_key

    for trainer_key in ("entropy", "mean_token_accuracy", "rewards/margins", "reward"):
        assert default_key(instrument_name(trainer_key)) == CATALOGUED[trainer_key]
        assert default_key(instrument_name(trainer_key, "eval")) == _exported_key(
            trainer_key, "eval"
        )


def test_logging_steps_off_the_train_interval_warns_once_and_exports_means(tmp_path, caplog):
    texts = tiny_lm.sentences(16, 8, seed=1)
    data = datasets.Dataset.from_list([{"text": t} for t in texts])
    tel = _telemetry(tmp_path, "sft")
    args = trl.SFTConfig(**_common_args(tmp_path, logging_steps=1), max_length=16)
    trainer = trl.SFTTrainer(
        model=tiny_lm.llama(),
        args=args,
        train_dataset=data,
        processing_class=tiny_lm.tokenizer(),
        callbacks=[OtelTrainCallback(tel)],
    )
    with caplog.at_level(logging.WARNING, logger="otel_train.integrations.hf"):
        trainer.train()
    tel.shutdown()
    warnings = [r for r in caplog.records if "logging_steps=1" in r.getMessage()]
    assert len(warnings) == 1 and "logging_steps=2" in warnings[0].getMessage()
    # Logged every step, sampled every 2: the sampled step holds the mean of its two logs.
    logs = {entry["step"]: entry for entry in _train_logs(trainer)}
    exported = _train_rows(_rows(tmp_path, "sft"))
    for step in (2, 4):
        for key in ("loss", "mean_token_accuracy", "entropy"):
            mean = (logs[step - 1][key] + logs[step][key]) / 2
            assert exported[step][CATALOGUED[key]] == pytest.approx(mean, rel=1e-6), key
        assert exported[step]["train/num_input_tokens_seen"] == logs[step]["num_tokens"]


def test_dpo_trainer_under_the_default_stage_warns_and_still_derives_no_perplexity(
    tmp_path, caplog
):
    tel = otel_train.setup(
        run="dpo-default-stage",
        output_dir=tmp_path / "runs",
        exporters=["jsonl"],
        intervals={"train": INTERVAL},
        gpu_metrics=False,
    )  # stage="train": a cross-entropy stage by default
    args = trl.DPOConfig(
        **_common_args(tmp_path, eval_strategy="steps", eval_steps=INTERVAL), max_length=16
    )
    data = _preference_data()
    trainer = trl.DPOTrainer(
        model=tiny_lm.llama(),
        ref_model=tiny_lm.llama(),
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(4)),
        processing_class=tiny_lm.tokenizer(),
        callbacks=[OtelTrainCallback(tel)],
    )
    with caplog.at_level(logging.WARNING, logger="otel_train.integrations.hf"):
        trainer.train()
    tel.shutdown()
    warned = [r.getMessage() for r in caplog.records if "'dpo'" in r.getMessage()]
    assert len(warned) == 1 and "setup(stage='dpo')" in warned[0]
    rows = _rows(tmp_path, "dpo-default-stage")
    assert "train/rewards_margin" in _train_rows(rows)[MAX_STEPS]
    assert not [key for key in _all_keys(rows) if "perplexity" in key]
