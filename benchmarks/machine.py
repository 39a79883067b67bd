"""One line naming the machine a benchmark ran on (CPU model, cores, torch), for the results files."""

from __future__ import annotations

from ponderlm.machine import cpu_model, describe, machine


def machine_info() -> tuple[str, int]:
    info = machine()
    return info["cpu"], info["cpu_cores"]


def describe_machine() -> str:
    return describe()


__all__ = ["cpu_model", "describe_machine", "machine_info"]
