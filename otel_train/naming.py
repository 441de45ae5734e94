"""The one naming rule: OTel instrument name -> the flat key W&B and JSON lines use.

`train.learning_rate` -> `train/learning_rate`: the first segment is the panel group, the rest
joins with `_`. A few keys follow the Hugging Face Trainer's spelling users already chart
(`train/num_input_tokens_seen`), and some instruments fan out to more than one key with a scale
(`perf.mfu` -> `perf/mfu` and `perf/mfu_percent`). Presets reproduce a team's legacy keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_NOT_KEY_CHARS = re.compile(r"[^A-Za-z0-9_]+")


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One output key of an instrument and the factor its value is multiplied by."""

    key: str
    scale: float = 1.0


# Group renames: the OTel semantic conventions spell GPU metrics `hw.gpu.*`; people chart `gpu/*`.
_GROUP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("hw.gpu.", "gpu."),
    ("hw.power", "gpu.power"),
    ("hw.energy", "gpu.energy"),
)

DEFAULT_KEY_OVERRIDES: Mapping[str, tuple[KeySpec, ...]] = {
    "train.tokens": (KeySpec("train/num_input_tokens_seen"),),
    "perf.mfu": (KeySpec("perf/mfu"), KeySpec("perf/mfu_percent", 100.0)),
    "perf.eta": (KeySpec("perf/eta_minutes", 1.0 / 60.0),),
}

# Legacy spellings some teams' dashboards were built on (training/lr style).
PRESETS: Mapping[str, Mapping[str, tuple[KeySpec, ...]]] = {
    "default": {},
    "legacy_training": {
        "train.loss": (KeySpec("training/loss"),),
        "train.learning_rate": (KeySpec("training/lr"),),
        "train.grad_norm": (KeySpec("training/grad_norm"),),
        "train.epoch": (KeySpec("training/epoch"),),
        "train.global_step": (KeySpec("training/global_step"),),
        "train.tokens": (KeySpec("training/tokens"),),
        "train.samples": (KeySpec("training/samples"),),
        "perf.tokens_per_second": (KeySpec("training/tokens_per_second"),),
        "perf.mfu": (KeySpec("training/mfu_percent", 100.0),),
    },
}


def sanitize_key_part(text: str) -> str:
    """W&B keys: `/` makes sections; everything else must be `[A-Za-z0-9_]`."""
    return _NOT_KEY_CHARS.sub("_", text).strip("_") or "_"


def default_key(instrument_name: str) -> str:
    """`train.learning_rate` -> `train/learning_rate`; a name without a dot stays one segment."""
    name = instrument_name.lower()
    for prefix, replacement in _GROUP_PREFIXES:
        if name.startswith(prefix):
            name = replacement + name[len(prefix) :]
            break
    group, _, rest = name.partition(".")
    if not rest:
        return sanitize_key_part(group)
    return f"{sanitize_key_part(group)}/{sanitize_key_part(rest.replace('.', '_'))}"


def attribute_suffix(attributes: Mapping[str, object] | None) -> str:
    """Data points with attributes get their own keys: `{hw.id: 0}` -> `/hw_id_0`."""
    if not attributes:
        return ""
    parts = (
        f"{sanitize_key_part(str(k))}_{sanitize_key_part(str(v))}"
        for k, v in sorted(attributes.items())
    )
    return "/" + "_".join(parts)


# Attribute values whose `str()` is fixed by value and type: the only ones a suffix is cached for
# (1, 1.0 and True are equal keys of a dict but spell "1", "1.0" and "True").
_CACHEABLE_VALUE_TYPES = frozenset((str, int, float, bool))
_MAX_CACHED_SUFFIXES = 4096


class AttributeSuffixes:
    """`attribute_suffix`, remembered per attribute set: rows ask for the same few sets on every
    export, and the sort and two regex substitutions per attribute cost microseconds each."""

    def __init__(self) -> None:
        self._cache: dict[tuple[tuple[tuple[str, object], ...], tuple[type, ...]], str] = {}

    def of(self, attributes: Mapping[str, object] | None) -> str:
        if not attributes:
            return ""
        kinds = (*map(type, attributes), *map(type, attributes.values()))
        if not _CACHEABLE_VALUE_TYPES.issuperset(kinds):
            return attribute_suffix(attributes)  # sequences and the like: spelled every time
        cache_key = (tuple(attributes.items()), kinds)
        suffix = self._cache.get(cache_key)
        if suffix is None:
            suffix = attribute_suffix(attributes)
            if len(self._cache) >= _MAX_CACHED_SUFFIXES:
                self._cache.clear()  # bounded: a NaN attribute value never hits, for one
            self._cache[cache_key] = suffix
        return suffix


class KeyNamer:
    """Maps instrument names to output keys; caches, because exporters ask on every row."""

    def __init__(
        self,
        overrides: Mapping[str, str | KeySpec | tuple[KeySpec, ...]] | None = None,
        *,
        preset: str = "default",
    ) -> None:
        if preset not in PRESETS:
            from otel_train.errors import OtelTrainError

            raise OtelTrainError(
                f"unknown key preset {preset!r}; choose one of {sorted(PRESETS)} or pass "
                "overrides={'instrument.name': 'group/key'}"
            )
        table: dict[str, tuple[KeySpec, ...]] = dict(DEFAULT_KEY_OVERRIDES)
        table.update(PRESETS[preset])
        for name, spec in (overrides or {}).items():
            if isinstance(spec, str):
                table[name] = (KeySpec(spec),)
            elif isinstance(spec, KeySpec):
                table[name] = (spec,)
            else:
                table[name] = tuple(spec)
        self._table = table
        self._cache: dict[str, tuple[KeySpec, ...]] = {}

    def keys_for(self, instrument_name: str) -> tuple[KeySpec, ...]:
        specs = self._cache.get(instrument_name)
        if specs is None:
            specs = self._table.get(instrument_name) or (KeySpec(default_key(instrument_name)),)
            self._cache[instrument_name] = specs
        return specs

    def key(self, instrument_name: str) -> str:
        """The primary key of an instrument (its first spelling)."""
        return self.keys_for(instrument_name)[0].key
