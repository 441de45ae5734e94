"""FakeNvml: the pynvml functions otel-train calls, with pynvml's own return types.

Structures, constants and errors are the real ones from `pynvml` (nvidia-ml-py), so a value
of the wrong type or a wrong attribute name fails here as it would on a GPU host. Only the
driver behind them is fake: a list of devices whose readings the test sets.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import pynvml


@dataclass
class FakeDevice:
    name: str = "NVIDIA H100 80GB HBM3"
    gpu_util_percent: int = 87
    mem_util_percent: int = 40
    memory_total: int = 80 * 1024**3
    memory_used: int = 30 * 1024**3
    power_milliwatts: int | None = 350_000  # None: NVML_ERROR_NOT_SUPPORTED, like some boards
    temperature_c: int = 61
    sm_clock_mhz: int = 1980


@dataclass
class FakeNvml:
    """Pass as `register_gpu_metrics(tel, nvml=FakeNvml([...]))`. Counts every query."""

    devices: list[FakeDevice] = field(default_factory=lambda: [FakeDevice()])
    calls: int = 0
    initialised: bool = False

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM

    def _device(self, handle: pynvml.c_nvmlDevice_t) -> FakeDevice:
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self.calls += 1
        return self.devices[ctypes.cast(handle, ctypes.c_void_p).value - 1]  # type: ignore[operator]

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> pynvml.c_nvmlDevice_t:
        if not 0 <= index < len(self.devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return ctypes.cast(ctypes.c_void_p(index + 1), pynvml.c_nvmlDevice_t)

    def nvmlDeviceGetName(self, handle: pynvml.c_nvmlDevice_t) -> str:
        return self._device(handle).name

    def nvmlDeviceGetUtilizationRates(
        self, handle: pynvml.c_nvmlDevice_t
    ) -> pynvml.c_nvmlUtilization_t:
        device = self._device(handle)
        return pynvml.c_nvmlUtilization_t(
            gpu=device.gpu_util_percent, memory=device.mem_util_percent
        )

    def nvmlDeviceGetMemoryInfo(self, handle: pynvml.c_nvmlDevice_t) -> pynvml.c_nvmlMemory_t:
        device = self._device(handle)
        return pynvml.c_nvmlMemory_t(
            total=device.memory_total,
            free=device.memory_total - device.memory_used,
            used=device.memory_used,
        )

    def nvmlDeviceGetPowerUsage(self, handle: pynvml.c_nvmlDevice_t) -> int:
        device = self._device(handle)
        if device.power_milliwatts is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return device.power_milliwatts

    def nvmlDeviceGetTemperature(self, handle: pynvml.c_nvmlDevice_t, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._device(handle).temperature_c

    def nvmlDeviceGetClockInfo(self, handle: pynvml.c_nvmlDevice_t, clock_type: int) -> int:
        assert clock_type == pynvml.NVML_CLOCK_SM
        return self._device(handle).sm_clock_mhz


class FakeCuda:
    """The `torch.cuda` allocator queries otel-train makes, for a host without CUDA."""

    def __init__(self, allocated: int, reserved: int, peak: int, device: int = 0) -> None:
        self.values = {"allocated": allocated, "reserved": reserved, "peak": peak}
        self.device = device

    def current_device(self) -> int:
        return self.device

    def memory_allocated(self, device: int) -> int:
        return self.values["allocated"]

    def memory_reserved(self, device: int) -> int:
        return self.values["reserved"]

    def max_memory_allocated(self, device: int) -> int:
        return self.values["peak"]
