"""The standard instrument set every stage shares (pretrain, SFT, DPO, PPO), and `record()`.

Same names everywhere is the point: a DPO run and a pretrain run chart on the same panels.
The instruments come from the one catalog (`otel_train.catalog`); `record()` is the hot path:
it type-checks, keeps references and appends to short lists, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.metrics import Meter

from otel_train.catalog import BY_KEYWORD, RECORD_KEYWORDS, STANDARD_INSTRUMENTS
from otel_train.errors import UnknownMetricError
from otel_train.stage_metrics import TRAINER_KEYS
from otel_train.staged_instruments import StagedInstrument, negative_increment
from otel_train.staging import stage_value
from otel_train.staging_registry import StagingRegistry

# Step-time buckets, seconds: a 1-1.5-2-3-5-7.5 ladder from 1 ms to 60 s (p50/p95 from these
# interpolate within ~25%; the SDK default 0..10000 would put every step in one bucket).
STEP_TIME_BUCKETS_SECONDS: tuple[float, ...] = (
    *(
        round(mantissa * 10.0**exponent, 6)
        for exponent in range(-3, 1)
        for mantissa in (1.0, 1.5, 2.0, 3.0, 5.0, 7.5)
    ),
    *(10.0, 15.0, 20.0, 30.0, 45.0, 60.0),
)

RECORDABLE = RECORD_KEYWORDS

# Derived or host-side instruments the telemetry records into directly (not staged).
_DIRECT = ("train.global_step", "perf.step_time")


def instrument_name_for(key: str) -> str:
    """`record()` mapping keys -> instrument names. A key trainers log (TRL's
    `rewards/margins`) names its stage instrument (`train.rewards.margin`), so a plain loop
    and TRL chart it under one name; otherwise `a/b` -> `a.b`, and a bare name joins the
    train group (`reward` -> `train.reward`, `loss` -> `train.loss`)."""
    known = TRAINER_KEYS.get(key)
    if known is not None:
        return known
    name = key.replace("/", ".")
    return name if "." in name else f"train.{name}"


class TrainingInstruments:
    """`tel.training`: the standard instruments plus the staging `record()` writes into."""

    def __init__(self, meter: Meter, registry: StagingRegistry, *, perplexity: bool = True) -> None:
        self.meter = meter
        self.registry = registry
        self.standard: dict[str, StagedInstrument] = {}
        for spec in STANDARD_INSTRUMENTS:
            if spec.name in _DIRECT or (spec.stages is not None and not perplexity):
                continue
            if spec.group in ("eval",):
                continue  # created by evaluate() on first use
            self.standard[spec.name] = registry.create(
                spec.kind, spec.name, spec.unit, spec.description
            )
        direct = registry.sdk_meter  # host values the telemetry itself records: not staged
        self.global_step: Any = registry.output(
            direct, "gauge", "train.global_step", "", "Optimizer step; the x-axis of every backend"
        )
        # The output behind the staged counter: the telemetry adds resolved counts.
        self.nonfinite = self.standard["train.nonfinite"].sdk
        # Exported as 0 until the first NaN (Prometheus practice: a counter that does not
        # exist yet reads "No data", not "none so far").
        self.nonfinite.add(0)
        self.step_time: Any = registry.output(
            direct,
            "histogram",
            "perf.step_time",
            "s",
            "Wall time between consecutive steps",
            buckets=STEP_TIME_BUCKETS_SECONDS,
        )
        # Hot-path shortcuts: keyword -> (instrument name, slot), looked up once.
        self._slots = {
            keyword: (spec.name, self.standard[spec.name].plain_slot())
            for keyword, spec in BY_KEYWORD.items()
        }
        self._by_key: dict[str, Any] = {}

    @property
    def enabled(self) -> bool:
        return self.registry.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.registry.enabled = value

    def record(
        self,
        values: Mapping[str, Any] | None = None,
        /,
        *,
        loss: Any = None,
        learning_rate: Any = None,
        grad_norm: Any = None,
        tokens: Any = None,
        samples: Any = None,
        epoch: Any = None,
        **unknown: Any,
    ) -> None:
        """Stage this step's values: numbers or 0-dim tensors on any device, never synced here.

        Standard keywords go to the catalog's instruments (`loss` / `grad_norm`: interval mean
        and max; `tokens` / `samples`: per-step amounts, summed; the rest: last value).
        `values` maps any other name to a value: `{"rewards/margins": m}` stages the
        instrument `rewards.margins`, created on first use (a gauge unless it was declared on
        `tel.meter` or in the catalog with another kind).
        """
        if unknown:
            raise UnknownMetricError(
                f"record() got unknown keyword(s) {sorted(unknown)}; "
                f"valid: {', '.join(RECORDABLE)}. For any other value pass a mapping, e.g. "
                "tel.record({'train.reward': r}), or create an instrument on tel.meter."
            )
        if not self.registry.enabled:
            return
        # Unrolled on purpose: this runs every step, a loop would allocate its tuples.
        slots = self._slots
        if loss is not None:
            name, slot = slots["loss"]
            slot.add(stage_value(name, loss))
        if learning_rate is not None:
            name, slot = slots["learning_rate"]
            slot.add(stage_value(name, learning_rate))
        if grad_norm is not None:
            name, slot = slots["grad_norm"]
            slot.add(stage_value(name, grad_norm))
        if tokens is not None:
            self._add_count("tokens", tokens)
        if samples is not None:
            self._add_count("samples", samples)
        if epoch is not None:
            name, slot = slots["epoch"]
            slot.add(stage_value(name, epoch))
        if values:
            self._record_mapping(values)

    def _add_count(self, keyword: str, amount: Any) -> None:
        name, slot = self._slots[keyword]
        staged = stage_value(name, amount)
        if type(staged) is float and staged < 0:
            raise negative_increment(name, amount)
        slot.add(staged)

    def _record_mapping(self, values: Mapping[str, Any]) -> None:
        if not isinstance(values, Mapping):
            raise UnknownMetricError(
                f"record() takes a mapping of name -> value, got {type(values).__name__}"
            )
        by_key = self._by_key
        for key, value in values.items():
            if value is None:
                continue
            record = by_key.get(key)
            if record is None:
                if not isinstance(key, str):
                    raise UnknownMetricError(f"record() keys are names, got {key!r}")
                instrument = self.registry.instrument_for(instrument_name_for(key))
                record = by_key[key] = instrument.put
            record(value)
