"""`perf.joules_per_token`: the energy this rank's GPUs used over a perf interval / its tokens.

NVML's energy counter (`nvmlDeviceGetTotalEnergyConsumption`, Volta and newer) read at each
perf sample; the token count is the one `perf.tokens_per_second` uses (the rate tracker hands
it over as the interval ends), so the two never disagree about what an interval was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation

if TYPE_CHECKING:
    from otel_train.gpu import NvmlReader
    from otel_train.telemetry import Telemetry

_logger = logging.getLogger(__name__)

JOULES_PER_TOKEN = "perf.joules_per_token"


def bare_uuid(uuid: str) -> str:
    """NVML says `GPU-<uuid>`, torch's device properties `<uuid>`: compare the bare form."""
    uuid = uuid.strip().lower()
    return uuid[4:] if uuid.startswith("gpu-") else uuid


class EnergyPerToken:
    """`perf.joules_per_token` = energy this rank's GPUs used over a perf interval / the
    tokens of that interval (the same token count as `perf.tokens_per_second`).

    This rank's GPUs: the CUDA devices where its torch allocator holds memory, matched to NVML
    by UUID (CUDA and NVML number devices differently). Absent, never 0, when the interval has
    no tokens, no energy was counted, or a GPU in use has no energy counter.
    """

    def __init__(self, nvml: NvmlReader, cuda: Any, devices: list[tuple[int, int]]) -> None:
        self._nvml, self._cuda, self._devices = nvml, cuda, devices  # (CUDA, NVML index)
        self._last = self._read()
        self.value: float | None = None

    def _read(self, indices: Iterable[int] | None = None) -> dict[int, float | None]:
        indices = [n for _, n in self._devices] if indices is None else indices
        return {index: self._nvml.energy_joules(index) for index in indices}

    def interval_ended(self, tokens: float) -> None:
        try:
            in_use = [nvml for cuda, nvml in self._devices if self._cuda.memory_reserved(cuda) > 0]
            # One NVML call per GPU in use (not per GPU visible); a GPU that comes into use
            # has no reading from the interval's start, so that interval is left out.
            readings = self._read(in_use)
        except Exception as error:  # never into the training loop
            _logger.debug("otel-train: %s not computed: %r", JOULES_PER_TOKEN, error)
            self.value = None
            return
        last, self._last = self._last, readings
        pairs = [(readings[index], last.get(index)) for index in in_use]
        deltas = [now - before for now, before in pairs if now is not None and before is not None]
        energy = sum(deltas)
        complete = bool(in_use) and len(deltas) == len(in_use)
        self.value = energy / tokens if complete and tokens > 0 and energy > 0 else None

    def interval_restarted(self) -> None:
        self._last = self._read()
        self.value = None

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        return () if self.value is None else (Observation(self.value),)


def _cuda_to_nvml(nvml: NvmlReader, cuda: Any) -> list[tuple[int, int]]:
    by_uuid = {nvml.uuid(index): index for index in range(len(nvml.handles))}
    pairs = []
    for device in range(int(cuda.device_count())):
        uuid = bare_uuid(str(cuda.get_device_properties(device).uuid))
        if uuid in by_uuid:
            pairs.append((device, by_uuid[uuid]))
    return pairs


def register_joules_per_token(telemetry: Telemetry, nvml: NvmlReader, cuda: Any) -> bool:
    """Create `perf.joules_per_token` if this process's GPUs have energy counters; False (and
    one info line saying why) if not."""
    try:
        devices = _cuda_to_nvml(nvml, cuda)
    except Exception as error:  # e.g. MIG instances, whose UUIDs NVML lists elsewhere
        _logger.info(
            "otel-train: no %s: CUDA devices not found in NVML (%r)", JOULES_PER_TOKEN, error
        )
        return False
    devices = [(c, n) for c, n in devices if nvml.energy_joules(n) is not None]
    if not devices:
        _logger.info(
            "otel-train: no %s: no GPU of this process has an NVML energy counter "
            "(Volta or newer has one)",
            JOULES_PER_TOKEN,
        )
        return False
    source = EnergyPerToken(nvml, cuda, devices)
    # The rate tracker tells the source each perf interval's tokens, right before the perf
    # group is collected; the gauge then shows that interval's value (scrapes: the last one).
    telemetry.add_interval_listener(source)
    telemetry.meter.create_observable_gauge(
        JOULES_PER_TOKEN,
        callbacks=[telemetry.reader.sampled_callback("perf", source.observe)],
        unit="{joule}/{token}",  # "J/{token}" would become perf_joules_per_token_J in Prometheus
        description="GPU energy per token over the perf interval (NVML energy counter)",
    )
    return True
