"""One line naming the machine a benchmark ran on (CPU model, cores, torch), for the results files."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_info() -> tuple[str, int]:
    cpu = platform.processor() or platform.machine() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu, os.cpu_count() or 1


def describe_machine() -> str:
    cpu, cores = machine_info()
    capability = torch.backends.cpu.get_cpu_capability()  # the widest vector ISA torch uses here (AVX2, AVX512, ...)
    return f"{cpu} ({capability}), {cores} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
