"""Argument checks shared by every option: one wording, so every error reads the same."""

from __future__ import annotations

from typing import TypeGuard

from otel_train.errors import OtelTrainError


def is_positive_int(value: object) -> TypeGuard[int]:
    """An int > 0; `True` is not a count."""
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


def check_positive_int(name: str, value: object, *, qualifier: str = "") -> int:
    """`value`, or an OtelTrainError "<name> must be a positive int<qualifier>, got <value>"."""
    if not is_positive_int(value):
        raise OtelTrainError(f"{name} must be a positive int{qualifier}, got {value!r}")
    return value
