"""What a run or a measurement actually ran on: precision, torch, CPU model and the flags that change numerics and
speed (AVX512-BF16, AMX), threads, device. Runs record it per training session (rundir.py), `eval` beside
its numbers, and benchmarks in their results files, so a comparison can say which machine and precision it rests on.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(device: torch.device | str = "cpu") -> dict:
    """The machine as it affects results: torch, CPU, vector ISA torch uses, bf16/AMX support, threads, device."""
    device = torch.device(device)
    probes = {}
    for name, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported")):
        try:
            probes[name] = bool(getattr(torch.cpu, probe)())
        except AttributeError:  # a torch without the probe
            probes[name] = None
    return {"torch": torch.__version__, "cpu": cpu_model(), "cpu_cores": os.cpu_count() or 1,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), **probes,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}


def native_bf16(device_type: str) -> bool:
    """Does this device compute bf16 matmuls natively? On a CPU without AVX512-BF16 or AMX, bf16 autocast is
    emulated and much slower than fp32 (benchmarks/results/bf16_vs_fp32.md)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without these probes: assume the slow, emulated path
        return False


def precision(config, device_type: str = "cpu") -> str:
    """The precision forward passes of `config` run in on this device: train.dtype resolved ("auto" decided)."""
    bf16 = config.train.dtype == "bf16" or (config.train.dtype == "auto" and native_bf16(device_type))
    return "bf16" if bf16 else "fp32"


def autocast(config, device_type: str = "cpu"):
    """The precision context for forward passes of `config`: bf16 autocast, or nothing for fp32."""
    if precision(config, device_type) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(info: dict | None = None) -> str:
    """One line for a results file."""
    info = info or machine()
    return (f"{info['cpu']} ({info['cpu_capability']}), {info['cpu_cores']} cores, {info['threads']} torch threads, "
            f"torch {info['torch']}")
