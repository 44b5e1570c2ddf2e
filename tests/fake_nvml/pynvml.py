"""A stand-in for nvidia-ml-py's pynvml on a box with no NVIDIA driver, for the GPU kit's dry run
(tests/test_gpu_kit.py): NVML starts and lists no GPU, as on a GPU server whose cards are all taken away."""

from __future__ import annotations


class NVMLError(Exception):
    pass


def nvmlInit() -> None:
    return None


def nvmlShutdown() -> None:
    return None


def nvmlDeviceGetCount() -> int:
    return 0


def nvmlSystemGetDriverVersion() -> str:
    return "fake"


def nvmlDeviceGetHandleByIndex(index: int) -> object:
    raise NVMLError(f"no GPU {index}: this NVML is a stand-in with none")
