"""A config holding every kind of secret otel-train must redact, and the values it must keep.

Each secret is a unique string, so a test can grep every file a run wrote for it.
"""

from __future__ import annotations

import argparse
import dataclasses
from types import SimpleNamespace
from typing import Any


@dataclasses.dataclass
class HubConfig:
    repo: str
    api_key: str


# name -> the secret string that must appear in no file
SECRETS: dict[str, str] = {
    "session_token": "sess-tok-7d1e0a",
    "admin_token": "adm-tok-93be1c",
    "private_key": "pk-material-4c7f22",
    "ssh_key": "ssh-material-5a8d31",
    "aws_access_key_id": "aws-key-id-60f3e9",
    "aws_secret_access_key": "aws-secret-1b72aa",
    "passphrase": "correct-horse-battery-84c1",
    "dsn_password": "dsnPass9931x",
    "bearer_under_innocent_key": "bearerTok41a9c7e2f",
    "openai_under_innocent_key": "sk-proj-Zq81mXw2Lr5Tn0Yb7Vc3",
    "argv_api_key": "argv-key-2f90d4",
    "argv_api_key_equals": "argv-eq-key-51c3b8",
    "namespace_api_key": "ns-key-c04a71",
    "argparse_api_key": "argparse-key-e5d209",
    "dataclass_api_key": "dataclass-key-7a16f0",
    "github": "ghp_R4nd0mGitHubT0kenValue99aa11",
    "slack": "xoxb-2048-4096-Sl4ckB0tT0ken77",
    "aws_id_under_innocent_key": "AKIAQ3EGRANDOMX7K2PZ",
    "hugging_face": "hf_HuggingFaceTokenValue8812zzQ",
    "basic_auth": "dXNlcjpiYXNpY1Bhc3M3Nw==",  # base64("user:basicPass77")
    "cookie": "cookie-val-3e8b91",
    "wandb_api_key": "wb-key-0a9f8e7d6c",
}

KEPT: dict[str, Any] = {
    "author": "Ada Lovelace",
    "authors": ["Grace Hopper", "Alan Turing"],
    "num_tokens": 2048,
    "max_tokens": 512,
    "tokenizer": "gpt2",
    "pad_token": "<pad>",
    "tokens_per_step": 4096,
    "learning_rate": 0.0003,
    "sort_key": "loss",
    "dataset_url": "https://example.org/data/train.jsonl",
}


def corpus() -> dict[str, Any]:
    """The config a user might pass as `config=`: every secret, nested the way real ones are."""
    s = SECRETS
    return {
        **KEPT,
        "auth": {"session_token": s["session_token"], "admin_token": s["admin_token"]},
        "deploy": {
            "private_key": s["private_key"],
            "ssh_key": s["ssh_key"],
            "aws_access_key_id": s["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": s["aws_secret_access_key"],
            "passphrase": s["passphrase"],
        },
        "database": f"postgres://trainer:{s['dsn_password']}@db.internal:5432/runs",
        "request_header": f"Authorization: Bearer {s['bearer_under_innocent_key']}",
        "llm_backend": s["openai_under_innocent_key"],
        "launcher": ["train.py", "--api-key", s["argv_api_key"], "--lr", "3e-4"],
        "launcher_eq": ["train.py", f"--api-key={s['argv_api_key_equals']}"],
        "service": SimpleNamespace(api_key=s["namespace_api_key"], region="eu"),
        "args": argparse.Namespace(api_key=s["argparse_api_key"], epochs=3),
        "hub": HubConfig(repo="org/model", api_key=s["dataclass_api_key"]),
        "remotes": [s["github"], s["slack"]],
        "cloud": {"identity": s["aws_id_under_innocent_key"]},
        "hf_repo_access": s["hugging_face"],
        "proxy": f"Basic {s['basic_auth']}",
        "browser": {"Cookie": s["cookie"]},
        "WANDB_API_KEY": s["wandb_api_key"],
    }
