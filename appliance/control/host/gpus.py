"""GPUs through NVML: the inventory, read with blocking calls off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from appliance.domain.placement import GpuInfo, GpuProcess
from appliance.errors import ApplianceError


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Nvml:
    """NVML, initialised once. Every method blocks: call it in an executor."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._failure: str | None = None

    def _init(self) -> Any:
        import pynvml

        with self._lock:
            if not self._ready and self._failure is None:
                try:
                    pynvml.nvmlInit()
                    self._ready = True
                except pynvml.NVMLError as exc:
                    self._failure = f"NVML could not start ({exc}); no NVIDIA driver or GPU on this machine?"
                except OSError as exc:  # pragma: no cover - library missing entirely
                    self._failure = f"NVML library not found ({exc})"
        if self._failure:
            raise ApplianceError(f"no GPU available: {self._failure}", status=503, code="no_gpu")
        return pynvml

    def inventory(self) -> list[GpuInfo]:
        nv = self._init()
        gpus = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    util = nv.nvmlDeviceGetUtilizationRates(h)
                    ugpu, umem = int(util.gpu), int(util.memory)
                except nv.NVMLError:
                    ugpu = umem = None
                try:
                    current, _pending = nv.nvmlDeviceGetMigMode(h)
                    mig: Literal["enabled", "disabled", "unsupported"] = "enabled" if current else "disabled"
                except nv.NVMLError:
                    mig = "unsupported"
                try:
                    procs = tuple(GpuProcess(int(p.pid), p.usedGpuMemory) for p in nv.nvmlDeviceGetComputeRunningProcesses(h))
                except nv.NVMLError:
                    procs = ()
                gpus.append(
                    GpuInfo(
                        index=i,
                        uuid=_text(nv.nvmlDeviceGetUUID(h)),
                        name=_text(nv.nvmlDeviceGetName(h)),
                        memory_total=int(mem.total),
                        memory_used=int(mem.used),
                        utilization_gpu=ugpu,
                        utilization_memory=umem,
                        mig_mode=mig,
                        processes=procs,
                    )
                )
        except nv.NVMLError as exc:
            raise ApplianceError(f"no GPU available: NVML failed while reading devices ({exc})", status=503, code="no_gpu") from None
        return gpus



class GpuMonitor:
    """The async face of NVML: samples off the event loop, at most once per `ttl` seconds."""

    def __init__(self, nvml: Nvml | None = None, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml or Nvml()
        self._ttl = ttl
        self._clock = clock
        self._cached: tuple[float, list[GpuInfo]] | None = None
        self._lock = asyncio.Lock()

    async def inventory(self) -> list[GpuInfo]:
        async with self._lock:
            if self._cached is None or self._clock() - self._cached[0] >= self._ttl:
                gpus = await asyncio.to_thread(self._nvml.inventory)
                self._cached = (self._clock(), gpus)
            return list(self._cached[1])
