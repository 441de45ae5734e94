"""The one rule turning a key a framework logs into an otel-train instrument name.

Catalogued keys take their catalog name (`rewards/margins` -> `train.rewards.margin`);
any other key keeps its own words: `completions/max_length` -> `train.completions.max_length`,
exported as `train/completions_max_length`. Train and eval use the same rule, so the
two key sets match (`eval.rewards.margin` -> `eval/rewards_margin`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from otel_train.catalog import STANDARD_INSTRUMENTS, instrument_names
from otel_train.naming import KeyNamer, default_key
from otel_train.stage_metrics import TRAINER_KEYS

_NOT_NAME_CHARS = re.compile(r"[^a-z0-9_]+")

# Standard instruments a logged key must not land on: `self.log("tokens", total)` is not a
# per-step increment of train.tokens, `perplexity` is derived by otel-train itself.
RESERVED_NAMES = frozenset(instrument_names(STANDARD_INSTRUMENTS))
# ... nor on one's exported key: `num_input_tokens_seen` is train.tokens' key.
_RESERVED_KEYS = frozenset(KeyNamer().key(name) for name in RESERVED_NAMES)


def instrument_name(key: str, group: str = "train") -> str:
    """`key` as logged (no stage prefix) -> the instrument name in `group`."""
    known = TRAINER_KEYS.get(key)
    if known is not None:
        return group + known[known.index(".") :]
    parts = [_NOT_NAME_CHARS.sub("_", part).strip("_") for part in re.split(r"[/.]", key.lower())]
    name = ".".join((group, *(part for part in parts if part)))
    if name in RESERVED_NAMES or name == group or default_key(name) in _RESERVED_KEYS:
        name = f"{group}.logged_{name[len(group) + 1 :] or 'value'}"
    return name


def strip_prefix(key: str, prefixes: Iterable[str]) -> str | None:
    """The key without the first matching prefix, or None when none matches."""
    for prefix in prefixes:
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix) :]
    return None


def is_number(value: Any) -> bool:
    """A host number a trainer logged (bools and strings are not metrics)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_items(values: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    """Numbers (as floats) and 0-dim tensors; strings, lists and None are skipped."""
    for key, value in values.items():
        if is_number(value):
            yield key, float(value)
        elif hasattr(value, "ndim") and getattr(value, "ndim", 1) == 0:
            yield key, value  # a 0-dim tensor: staged as is, never synced here
