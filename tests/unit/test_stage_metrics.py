"""The stage instrument sets and the one rule mapping a framework's keys onto them."""

from __future__ import annotations

import re

from otel_train.catalog import KINDS, STANDARD_INSTRUMENTS, instrument_names
from otel_train.integrations._keys import instrument_name
from otel_train.naming import default_key
from otel_train.stage_metrics import STAGE_INSTRUMENTS, TRAINER_KEYS
from tests.conftest import REPO_ROOT


def test_stage_instruments_are_train_group_well_formed_and_collide_with_nothing():
    names = [spec.name for spec in STAGE_INSTRUMENTS]
    assert len(names) == len(set(names))
    standard = set(instrument_names(STANDARD_INSTRUMENTS))
    flat = {re.sub(r"[^a-z0-9_]", "_", n) for n in standard}
    for spec in STAGE_INSTRUMENTS:
        assert spec.group == "train" and spec.kind in KINDS and spec.description
        assert spec.name not in standard
        assert re.sub(r"[^a-z0-9_]", "_", spec.name) not in flat  # one Prometheus name each
    stages = {stage for spec in STAGE_INSTRUMENTS for stage in spec.stages or ()}
    assert {"sft", "dpo", "ppo", "grpo"} <= stages


def test_every_trainer_key_maps_onto_a_declared_stage_instrument():
    declared = {spec.name for spec in STAGE_INSTRUMENTS}
    assert set(TRAINER_KEYS.values()) <= declared


def test_one_rule_for_train_and_eval_and_for_keys_outside_the_catalog():
    assert instrument_name("rewards/margins") == "train.rewards.margin"
    assert instrument_name("rewards/margins", "eval") == "eval.rewards.margin"
    assert default_key(instrument_name("completions/max_length")) == "train/completions_max_length"
    assert default_key(instrument_name("Rewards/My Func/mean")) == "train/rewards_my_func_mean"
    # A logged key never lands on a standard instrument (nor on its exported key).
    assert instrument_name("tokens") == "train.logged_tokens"
    assert instrument_name("num_input_tokens_seen") == "train.logged_num_input_tokens_seen"
    assert instrument_name("perplexity", "eval") == "eval.logged_perplexity"


def test_readme_names_every_stage_instrument_with_its_key():
    readme = (REPO_ROOT / "README.md").read_text()
    for spec in STAGE_INSTRUMENTS:
        assert f"`{default_key(spec.name)}`" in readme, spec.name
