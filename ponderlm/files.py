"""File helpers shared by every writer and reader: content hashes, atomic replacement, JSON lines."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ponderlm.errors import PonderError

LOCK_FILE = ".lock"  # holds the pid of the process writing into the directory


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` once the block succeeds.

    Readers see the old file or the new one, never a torn one; a failed block leaves the old file untouched.
    The temporary name keeps the suffix, for writers that pick a format from it (matplotlib).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_jsonl(path: str | Path) -> list[dict]:
    """One object per non-empty line (metrics.jsonl and the like)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def lock_directory(directory: Path, what: str) -> IO:
    """An exclusive OS lock on a directory that a command writes (a run, a data directory), held while the returned
    file stays open. The kernel drops it when its process ends, however it ends, so a killed writer never blocks."""
    handle = open(Path(directory) / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise PonderError(f"{what} {directory} is in use by another ponderlm process (pid {holder}); wait for it to "
                          "finish or stop it first") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@contextlib.contextmanager
def directory_built_aside(target: Path) -> Iterator[Path]:
    """A fresh directory beside `target` to build into; once the block succeeds it replaces `target` (a directory
    already there is removed after the swap). A failed block leaves `target` as it was and nothing beside it."""
    target = Path(target)
    building, old = target.with_name(f".{target.name}.building"), target.with_name(f".{target.name}.old")
    shutil.rmtree(building, ignore_errors=True)  # a killed build's
    building.mkdir(parents=True)
    try:
        yield building
        if target.exists():
            os.replace(target, old)
        os.replace(building, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the operating system's errors raised as the OSError they are (the library
    reports a full disk as a SafetensorError holding "os error 28")."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"(.*)\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        raise OSError(int(found.group(2)), found.group(1).strip(), str(path)) from None


def standard_json(value, indent: int | None = None) -> str:
    """JSON as RFC 8259 has it, which knows no NaN or Infinity: a non-finite number is written as null."""
    def standard(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: standard(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [standard(v) for v in value]
        return value

    return json.dumps(standard(value), indent=indent, allow_nan=False)
