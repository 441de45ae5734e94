"""GPU metrics as OTel observable instruments, read only when collected (never on the hot path).

NVML (`nvidia-ml-py`) per device, named after the OTel hardware semantic conventions where
they name the thing (`hw.gpu.utilization`, `hw.gpu.memory.usage` / `.limit` /
`.utilization`, `hw.power` and `hw.energy` with `hw.type=gpu`), `gpu.*` where they do not
(temperature, SM clock, torch's caching allocator). Every point carries `hw.id` = the device
index. The callbacks go through `reader.sampled_callback("gpu", ...)`: NVML is queried on
GPU-sampled steps and on pull scrapes only. No NVML / no CUDA: the instruments are simply not
created. `perf.joules_per_token` (otel_train/energy.py) uses the same NVML handles.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation

from otel_train.energy import JOULES_PER_TOKEN, bare_uuid, register_joules_per_token

if TYPE_CHECKING:
    from otel_train.telemetry import Telemetry

_logger = logging.getLogger(__name__)

Callback = Callable[[CallbackOptions], Iterable[Observation]]

# (instrument name, kind, unit, description): kind "gauge", "updown" or "counter" (semconv's).
NVML_INSTRUMENTS: tuple[tuple[str, str, str, str], ...] = (
    ("hw.gpu.utilization", "gauge", "1", "Fraction of time the GPU was busy (NVML)"),
    ("hw.gpu.memory.usage", "updown", "By", "GPU memory used, all processes (NVML)"),
    ("hw.gpu.memory.limit", "updown", "By", "GPU memory size (NVML)"),
    ("hw.gpu.memory.utilization", "gauge", "1", "Fraction of GPU memory used (NVML)"),
    ("hw.power", "gauge", "W", "GPU power draw (NVML)"),
    ("hw.energy", "counter", "J", "Energy the GPU used since setup (NVML)"),
    ("gpu.temperature", "gauge", "Cel", "GPU die temperature (NVML)"),
    ("gpu.clock.sm", "gauge", "Hz", "GPU SM clock (NVML)"),
)
# Semconv `hw.*` metrics other than hw.gpu.* need the component type (hw.type) on each point.
_HW_TYPE_GPU = frozenset({"hw.power", "hw.energy"})
TORCH_INSTRUMENTS: tuple[tuple[str, str, str], ...] = (
    ("gpu.memory.allocated", "By", "Memory held by tensors (torch caching allocator)"),
    ("gpu.memory.reserved", "By", "Memory reserved by torch's caching allocator"),
    ("gpu.memory.peak_allocated", "By", "Peak memory held by tensors since start or reset"),
)


class NvmlReader:
    """One NVML handle per device; each read returns {instrument name: value} for one device."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        nvml.nvmlInit()
        self.handles = [
            nvml.nvmlDeviceGetHandleByIndex(index) for index in range(nvml.nvmlDeviceGetCount())
        ]
        self._unsupported: set[tuple[int, str]] = set()
        # NVML counts millijoules since the driver loaded; we report joules since setup, the
        # start time OTel gives this cumulative counter.
        self._energy_at_setup = [self._millijoules(index) for index in range(len(self.handles))]

    def _millijoules(self, index: int) -> float | None:
        if (index, "hw.energy") in self._unsupported:
            return None
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handles[index]))
        except self._nvml.NVMLError as error:  # NotSupported before Volta
            self._unsupported.add((index, "hw.energy"))
            _logger.debug("otel-train: NVML energy of GPU %d unavailable: %s", index, error)
            return None

    def energy_joules(self, index: int) -> float | None:
        """Joules GPU `index` used since setup; None where NVML has no energy counter."""
        start, now = self._energy_at_setup[index], self._millijoules(index)
        if start is None or now is None:
            return None
        if now < start:  # the driver reloaded under us: the counter restarted
            self._unsupported.add((index, "hw.energy"))
            _logger.warning("otel-train: GPU %d energy counter went backwards; dropped", index)
            return None
        return (now - start) / 1000.0

    def uuid(self, index: int) -> str | None:
        try:
            uuid = self._nvml.nvmlDeviceGetUUID(self.handles[index])
        except self._nvml.NVMLError:
            return None
        return bare_uuid(uuid.decode() if isinstance(uuid, bytes) else str(uuid))

    def read(self, index: int, name: str) -> float | None:
        if name == "hw.energy":
            return self.energy_joules(index)
        if (index, name) in self._unsupported:
            return None
        nvml, handle = self._nvml, self.handles[index]
        try:
            if name == "hw.gpu.utilization":
                return nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            if name.startswith("hw.gpu.memory."):
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                if name.endswith("usage"):
                    return float(memory.used)
                if name.endswith("limit"):
                    return float(memory.total)
                return memory.used / memory.total if memory.total else None
            if name == "hw.power":
                return nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW -> W
            if name == "gpu.temperature":
                return float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            if name == "gpu.clock.sm":
                return nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM) * 1e6  # MHz
        except nvml.NVMLError as error:
            # Not supported on this board (e.g. power on some consumer cards): stop asking.
            self._unsupported.add((index, name))
            _logger.debug("otel-train: NVML %s on GPU %d unavailable: %s", name, index, error)
        return None


def _nvml_callback(reader: NvmlReader, name: str) -> Callback:
    extra = {"hw.type": "gpu"} if name in _HW_TYPE_GPU else {}

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for index in range(len(reader.handles)):
            value = reader.read(index, name)
            if value is not None:
                observations.append(Observation(value, {"hw.id": str(index), **extra}))
        return observations

    return observe


def _torch_callback(cuda: Any, name: str, device: int) -> Callback:
    read = {
        "gpu.memory.allocated": cuda.memory_allocated,
        "gpu.memory.reserved": cuda.memory_reserved,
        "gpu.memory.peak_allocated": cuda.max_memory_allocated,
    }[name]

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return (Observation(float(read(device)), {"hw.id": str(device)}),)

    return observe


def _load_nvml() -> Any:
    try:
        import pynvml  # the nvidia-ml-py distribution
    except ImportError:
        _logger.debug('otel-train: no GPU gauges from NVML: pip install "otel-train[nvml]"')
        return None
    return pynvml


def _load_cuda() -> Any:
    torch = sys.modules.get("torch")  # only a program that uses torch has its allocator
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda


def register_gpu_metrics(
    telemetry: Telemetry,
    *,
    nvml: Any = None,
    cuda: Any = None,
    use_nvml: bool = True,
    joules_per_token: bool = True,
) -> list[str]:
    """Create the GPU instruments that can be read here; returns their names.

    `nvml` (a module with pynvml's API) and `cuda` (`torch.cuda`-like) are seams for tests
    and unusual setups; by default `pynvml` and `torch.cuda` are used when they work. Local
    rank 0 reports every GPU NVML sees (NVML is node-wide); each rank reports its own
    device's allocator and, with `joules_per_token`, its own GPUs' energy per token.
    """
    meter, reader = telemetry.meter, telemetry.reader
    created: list[str] = []
    cuda = cuda if cuda is not None else _load_cuda()
    node_wide = telemetry.context.local_rank == 0
    nvml = nvml if nvml is not None else (_load_nvml() if use_nvml else None)
    nvml_reader: NvmlReader | None = None
    if nvml is not None and (node_wide or (joules_per_token and cuda is not None)):
        try:
            nvml_reader = NvmlReader(nvml)
        except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            _logger.debug("otel-train: no GPU gauges from NVML: %s", error)
    if nvml_reader is not None and nvml_reader.handles and node_wide:
        for name, kind, unit, description in NVML_INSTRUMENTS:
            create = {
                "updown": meter.create_observable_up_down_counter,
                "counter": meter.create_observable_counter,
            }.get(kind, meter.create_observable_gauge)
            callback = reader.sampled_callback("gpu", _nvml_callback(nvml_reader, name))
            create(name, callbacks=[callback], unit=unit, description=description)
            created.append(name)
    if cuda is not None:
        device = int(cuda.current_device())
        for name, unit, description in TORCH_INSTRUMENTS:
            callback = reader.sampled_callback("gpu", _torch_callback(cuda, name, device))
            meter.create_observable_gauge(
                name, callbacks=[callback], unit=unit, description=description
            )
            created.append(name)
    else:
        _logger.debug("otel-train: no torch allocator gauges (no CUDA device)")
    if (
        joules_per_token
        and cuda is not None
        and nvml_reader is not None
        and register_joules_per_token(telemetry, nvml_reader, cuda)
    ):
        created.append(JOULES_PER_TOKEN)
    return created
