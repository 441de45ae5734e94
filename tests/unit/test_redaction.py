"""Secrets are redacted by key name and by value shape, through every kind of container."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from otel_train.redaction import CYCLE, MAX_DEPTH, REDACTED, TOO_DEEP, is_secret_key, redact
from tests.secrets_corpus import KEPT, SECRETS, corpus


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_every_secret_of_the_corpus_is_redacted(name: str) -> None:
    text = json.dumps(redact(corpus()))
    assert SECRETS[name] not in text


def test_innocent_values_are_kept_author_included() -> None:
    redacted = redact(corpus())
    for key, value in KEPT.items():
        assert redacted[key] == value, key


def test_redaction_keeps_the_context_around_a_secret_value() -> None:
    redacted = redact(corpus())
    assert redacted["database"] == f"postgres://trainer:{REDACTED}@db.internal:5432/runs"
    assert redacted["launcher"] == ["train.py", "--api-key", REDACTED, "--lr", "3e-4"]
    assert redacted["launcher_eq"] == ["train.py", f"--api-key={REDACTED}"]
    assert redacted["service"] == {"api_key": REDACTED, "region": "eu"}
    assert redacted["args"] == {"api_key": REDACTED, "epochs": 3}
    assert redacted["hub"] == {"repo": "org/model", "api_key": REDACTED}
    assert redacted["proxy"] == f"Basic {REDACTED}"


@pytest.mark.parametrize(
    "key",
    ["api_key", "apiKey", "X-Api-Key", "hf_token", "HF_TOKEN", "access_token", "token",
     "session_token", "private_key_path", "client_secret", "db_password", "passwd",
     "Authorization", "oauth", "credentials", "aws_access_key_id", "ssh_key"],
)  # fmt: skip
def test_secret_key_names(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["author", "authors", "authority", "num_tokens", "max_new_tokens", "tokens_per_second",
     "tokenizer", "tokenizer_name", "pad_token", "pad_token_id", "token_ids", "bos_token",
     "num_input_tokens_seen", "sort_key", "primary_key", "key", "monkey", "learning_rate"],
)  # fmt: skip
def test_ordinary_key_names(key: str) -> None:
    assert not is_secret_key(key)


@pytest.mark.parametrize(
    "text",
    [
        "run with --hf-token hf_abcdefghijklmnopqrstuvwx and --lr 3",
        "curl -H 'Authorization: Bearer abc123def456' https://api",
        "https://oauth2:glpat-abcdefghijklmnopqrstu@gitlab.example/x.git",
        "https://host/path?api_key=q1w2e3r4&page=2",
        "Config(api_key='s3cr3t-value', lr=0.1)",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----",
        "token: eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl",
    ],
)
def test_secret_shapes_in_free_text(text: str) -> None:
    redacted = redact({"note": text})["note"]
    assert REDACTED in redacted
    for secret in ("hf_abc", "abc123def456", "glpat-", "q1w2e3r4", "s3cr3t", "b3BlbnNz", "eyJ"):
        assert secret not in redacted


@pytest.mark.parametrize(
    "text",
    ["Basic configuration with Bearer authentication", "tokens per second: 51234",
     "see https://example.org/a:b@c", "max_tokens=512", "sk-short"],
)  # fmt: skip
def test_prose_and_numbers_are_not_redacted(text: str) -> None:
    assert redact({"note": text})["note"] == text


def test_cycles_and_deep_nesting_are_cut_not_crashed() -> None:
    loop: dict[str, object] = {"lr": 0.1}
    loop["self"] = loop
    ns = SimpleNamespace(api_key="x")
    ns.me = ns
    deep: dict[str, object] = {}
    node = deep
    for _ in range(10_000):  # deeper than Python's recursion limit
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    redacted = redact({"loop": loop, "ns": ns, "deep": deep})
    assert redacted["loop"] == {"lr": 0.1, "self": CYCLE}
    assert redacted["ns"] == {"api_key": REDACTED, "me": CYCLE}
    level = redacted["deep"]
    for _ in range(MAX_DEPTH - 2):
        level = level["x"]
    assert level == {"x": TOO_DEEP}
    json.dumps(redacted)  # JSON-friendly all the way down


def test_shared_references_are_not_mistaken_for_cycles() -> None:
    shared = {"beta": 0.9}
    assert redact({"a": shared, "b": shared}) == {"a": shared, "b": shared}
