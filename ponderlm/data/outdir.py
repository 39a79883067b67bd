"""The data directory a command writes (`data prepare`, `data merge`): locked, checked, built aside, then installed.

A build goes into `DIR/.staging` under the same OS lock as training, and only a complete build replaces what the
directory held: the old data stays readable until the new data is whole, a failing build leaves it untouched, and two
commands writing one directory cannot interleave (the second is refused). Files are judged ours by our marker and
our metadata, not by their names: a user's own `tokenizer.json` in an unmarked directory is foreign.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ponderlm.data.shards import METADATA_FILE
from ponderlm.data.tokenizer import COMPANION_FILES
from ponderlm.errors import PonderError
from ponderlm.files import LOCK_FILE, lock_directory

MARKER = ".ponderlm-data"  # written before the first file of ours is installed
STAGING = ".staging"
TOKENIZER_FILE = "tokenizer.json"
SHARD = re.compile(r"^(train|val|test)_\d{4}\.bin$")


def _ours(out_dir: Path) -> set[str]:
    """The names in out_dir that a prepare or merge of ours wrote: none unless our marker or our metadata is there
    (data prepared before the marker existed has the metadata)."""
    try:
        marked = (out_dir / MARKER).exists() or json.loads((out_dir / METADATA_FILE).read_text()).get("format") == 1
    except (OSError, ValueError, AttributeError):
        marked = False
    if not marked:
        return set()
    shards = {path.name for path in out_dir.iterdir() if SHARD.match(path.name)}
    return {METADATA_FILE, TOKENIZER_FILE, *COMPANION_FILES} | shards


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Write only into a new or empty directory, or over data of ours with --overwrite (or an interrupted build)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PonderError(f"--out {out_dir} is a file; give a directory for the prepared data")
    if not out_dir.is_dir():
        return
    if (out_dir / METADATA_FILE).exists() and not overwrite:
        raise PonderError(f"{out_dir} is already prepared; pass --overwrite to rebuild it, or choose another dir")
    ours = _ours(out_dir) | {MARKER, STAGING, LOCK_FILE}
    foreign = sorted(path.name for path in out_dir.iterdir() if path.name not in ours)
    if foreign and not overwrite:
        raise PonderError(f"{out_dir} holds files that ponderlm did not write ({', '.join(foreign[:3])}); choose an "
                          "empty or new directory, or pass --overwrite to replace the data files in it")


@contextlib.contextmanager
def building(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Lock and check `out_dir`, yield an empty staging directory to build into, and install the build once the
    block succeeds; a failed block removes the staging directory (and `out_dir` if this call created it)."""
    check_out_dir(out_dir, overwrite)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_directory(out_dir, "data directory")
    staging = out_dir / STAGING
    try:
        check_out_dir(out_dir, overwrite)  # again under the lock: another command may have finished meanwhile
        shutil.rmtree(staging, ignore_errors=True)  # a killed build's
        staging.mkdir()
        yield staging
        if not (staging / METADATA_FILE).is_file():
            raise PonderError(f"internal: the build of {out_dir} wrote no {METADATA_FILE}")
        _install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and {path.name for path in out_dir.iterdir()} <= {LOCK_FILE}:
            (out_dir / LOCK_FILE).unlink(missing_ok=True)
            out_dir.rmdir()
        raise
    finally:
        lock.close()


def _install(staging: Path, out_dir: Path) -> None:
    """Replace our files in out_dir with the staged ones, file by file (each rename atomic), metadata last: from the
    first step until the last the directory does not look prepared, and a rerun rebuilds it."""
    (out_dir / MARKER).touch()
    (out_dir / METADATA_FILE).unlink(missing_ok=True)
    new = {path.name for path in staging.iterdir()}
    for name in _ours(out_dir) - new:
        (out_dir / name).unlink(missing_ok=True)
    for path in sorted(staging.iterdir()):
        if path.name != METADATA_FILE:
            os.replace(path, out_dir / path.name)
    os.replace(staging / METADATA_FILE, out_dir / METADATA_FILE)
    staging.rmdir()
