"""A short description of the machine a benchmark ran on."""

from __future__ import annotations

import os
import platform


def describe_machine() -> dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{memory_gib:.0f} GiB",
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
