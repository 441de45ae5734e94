"""FakeNvml: the pynvml functions otel-train calls, with pynvml's own return types.

Structures, constants and errors are the real ones from `pynvml` (nvidia-ml-py), so a value
of the wrong type or a wrong attribute name fails here as it would on a GPU host. Only the
driver behind them is fake: a list of devices whose readings the test sets.
"""

from __future__ import annotations

import ctypes
import uuid as uuid_module
from collections.abc import Sequence
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
    # Millijoules since the driver loaded (a counter: tests advance it). None: Kepler/Maxwell/
    # Pascal boards, where nvmlDeviceGetTotalEnergyConsumption is NVML_ERROR_NOT_SUPPORTED.
    energy_millijoules: int | None = 5_000_000_000
    # NVML's spelling, "GPU-" + the UUID; torch's device properties give it without the prefix.
    uuid: str = field(default_factory=lambda: f"GPU-{uuid_module.uuid4()}")


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

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: pynvml.c_nvmlDevice_t) -> int:
        device = self._device(handle)
        if device.energy_millijoules is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)  # -> NVMLError_NotSupported
        return ctypes.c_uint64(device.energy_millijoules).value  # pynvml: c_uint64().value

    def nvmlDeviceGetUUID(self, handle: pynvml.c_nvmlDevice_t) -> str:
        return self._device(handle).uuid  # pynvml decodes the C string (convertStrBytes)

    def nvmlDeviceGetTemperature(self, handle: pynvml.c_nvmlDevice_t, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._device(handle).temperature_c

    def nvmlDeviceGetClockInfo(self, handle: pynvml.c_nvmlDevice_t, clock_type: int) -> int:
        assert clock_type == pynvml.NVML_CLOCK_SM
        return self._device(handle).sm_clock_mhz


class FakeCUuuid:
    """torch's `_CUuuid` (device_properties.uuid): str() is the bare 8-4-4-4-12 hex form."""

    def __init__(self, text: str) -> None:
        self._text = text

    def __str__(self) -> str:
        return self._text


@dataclass
class FakeDeviceProperties:
    name: str
    uuid: FakeCUuuid


class FakeCuda:
    """The `torch.cuda` queries otel-train makes, for a host without CUDA.

    `nvml_devices`: the FakeDevices this process sees as cuda:0, cuda:1, ... (CUDA numbers
    devices its own way, e.g. under CUDA_VISIBLE_DEVICES), matched by UUID as on a real host.
    The allocator holds memory on the current device only, as a one-GPU-per-rank job does,
    unless `devices_in_use` says otherwise (one process spreading a model over several GPUs).
    """

    def __init__(
        self,
        allocated: int,
        reserved: int,
        peak: int,
        device: int = 0,
        nvml_devices: Sequence[FakeDevice] = (),
        devices_in_use: Sequence[int] | None = None,
    ) -> None:
        self.values = {"allocated": allocated, "reserved": reserved, "peak": peak}
        self.device = device
        self.nvml_devices = list(nvml_devices)
        self.devices_in_use = set(devices_in_use if devices_in_use is not None else [device])

    def current_device(self) -> int:
        return self.device

    def device_count(self) -> int:
        return max(len(self.nvml_devices), self.device + 1)

    def get_device_properties(self, device: int) -> FakeDeviceProperties:
        if not 0 <= device < self.device_count():
            raise AssertionError(f"Invalid device id {device}")  # torch's own message
        if device < len(self.nvml_devices):
            nvml = self.nvml_devices[device]
            return FakeDeviceProperties(nvml.name, FakeCUuuid(nvml.uuid.removeprefix("GPU-")))
        return FakeDeviceProperties("NVIDIA H100 80GB HBM3", FakeCUuuid(str(uuid_module.uuid4())))

    def memory_allocated(self, device: int) -> int:
        return self.values["allocated"] if device in self.devices_in_use else 0

    def memory_reserved(self, device: int) -> int:
        return self.values["reserved"] if device in self.devices_in_use else 0

    def max_memory_allocated(self, device: int) -> int:
        return self.values["peak"] if device in self.devices_in_use else 0
