"""Keep secrets out of every backend: hyperparameters often carry API keys and tokens."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***REDACTED***"
_SECRET_KEY = re.compile(r"api[_-]?key|token|secret|password|passwd|credential|auth", re.IGNORECASE)
# Counting words that contain "token" but are not secrets (num_tokens, max_tokens, ...).
_NOT_SECRET = re.compile(
    r"(num|max|min|total|n)_?tokens?$|tokens?_(per|count|seen)|tokenizer", re.IGNORECASE
)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key)) and not _NOT_SECRET.search(key)


def redact(config: Any) -> Any:
    """A copy with secret-named values replaced, through nested mappings and lists."""
    if isinstance(config, Mapping):
        return {
            str(key): (REDACTED if is_secret_key(str(key)) else redact(value))
            for key, value in config.items()
        }
    if isinstance(config, (list, tuple)):
        return [redact(item) for item in config]
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return redact(dataclasses.asdict(config))
    if isinstance(config, argparse.Namespace):
        return redact(vars(config))
    if config is None or isinstance(config, (bool, int, float, str)):
        return config
    return str(config)  # anything else is shown, not serialised by reference
