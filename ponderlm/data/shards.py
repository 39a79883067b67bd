"""Token shards: raw little-endian uint16/uint32 files, read back through read-only memory maps.

A split is one token stream `[eos, doc1..., eos, doc2..., eos, ...]` cut into fixed-size shard files. The leading
EOS gives every real token a predecessor, so every document's first token is also a prediction target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ponderlm.data.defaults import SHARD_TOKENS
from ponderlm.errors import PonderError
from ponderlm.files import atomic_path, atomic_write_text, sha256_file

METADATA_FILE = "metadata.json"
PREPARE_HINT = "re-run `ponderlm data prepare`"
SHARD_DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


class SplitWriter:
    """Streams one split's tokens into `{split}_{i:04d}.bin` shards of `shard_tokens` each, holding none of them in
    memory: each shard is written to a temporary file, hashed as written, and renamed when full (or at `close`)."""

    def __init__(self, out_dir: Path, split: str, eos_id: int, vocab_size: int, shard_tokens: int = SHARD_TOKENS):
        self.out_dir, self.split, self.shard_tokens, self.vocab_size = Path(out_dir), split, shard_tokens, vocab_size
        self.dtype = token_dtype(vocab_size)
        self.shards: list[dict] = []
        self.tokens, self.documents = 0, 0
        self._handle = None  # the open shard's file; _open also sets _stack, _name, _digest, _fill
        self.write(np.array([eos_id]))  # the leading EOS: every document's first token gets a predecessor

    def write(self, tokens: np.ndarray, documents: int = 0) -> None:
        """Append tokens (already holding each document's closing EOS); `documents` counts the ones they end."""
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token id out of range for vocab_size {self.vocab_size}")
        tokens = tokens.astype(self.dtype, copy=False)
        self.tokens, self.documents = self.tokens + tokens.size, self.documents + documents
        while tokens.size:
            if self._handle is None:
                self._open()
            take = min(tokens.size, self.shard_tokens - self._fill)
            data = tokens[:take].tobytes()
            self._handle.write(data)
            self._digest.update(data)
            self._fill, tokens = self._fill + take, tokens[take:]
            if self._fill == self.shard_tokens:
                self._finish_shard()

    def close(self) -> dict:
        """Finish the last shard; returns the split's metadata."""
        if self._handle is not None:
            self._finish_shard()
        return {"tokens": self.tokens, "documents": self.documents, "dtype": self.dtype.name, "shards": self.shards}

    def abort(self) -> None:
        """Drop the shard being written (its temporary file goes; finished shards stay, a rerun rewrites them)."""
        if self._handle is not None:
            self._handle = None
            error = PonderError("prepare stopped")
            self._stack.__exit__(type(error), error, None)

    def _open(self) -> None:
        self._name = f"{self.split}_{len(self.shards):04d}.bin"
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.out_dir / self._name))
        self._handle = self._stack.enter_context(open(tmp, "wb"))
        self._digest, self._fill = hashlib.sha256(), 0

    def _finish_shard(self) -> None:
        self._handle.flush()
        self._handle = None
        self._stack.close()  # closes, fsyncs and renames onto the shard's name
        self.shards.append({"file": self._name, "tokens": self._fill, "sha256": self._digest.hexdigest()})


def write_split(token_docs: Iterable[list[int]], out_dir: Path, split: str, eos_id: int, vocab_size: int,
                shard_tokens: int = SHARD_TOKENS) -> dict:
    """Write one split's documents (token id lists) as shards; returns the split's metadata."""
    writer = SplitWriter(out_dir, split, eos_id, vocab_size, shard_tokens)
    for ids in token_docs:
        writer.write(np.asarray([*ids, eos_id], dtype=np.int64), documents=1)
    return writer.close()


def read_metadata(data_dir: Path) -> dict:
    path = Path(data_dir) / METADATA_FILE
    if not path.is_file():
        raise PonderError(f"{path} does not exist; {PREPARE_HINT} to create the data directory")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PonderError(f"{path} is unreadable ({exc}); {PREPARE_HINT} --overwrite") from exc
    if not isinstance(meta, dict) or meta.get("format") != 1:
        raise PonderError(f"{path} is not a ponderlm data directory (format 1); {PREPARE_HINT} --overwrite")
    try:
        _require_keys(meta["tokenizer"], ("file", "vocab_size"))
        vocab_size = meta["tokenizer"]["vocab_size"]
        for name, info in meta["splits"].items():
            if info["dtype"] not in SHARD_DTYPES:
                raise PonderError(f"{path}: split {name!r} has dtype {info['dtype']!r}, not one of "
                                  f"{', '.join(SHARD_DTYPES)}; {PREPARE_HINT} --overwrite")
            if np.iinfo(info["dtype"]).max + 1 < vocab_size:
                raise PonderError(f"{path}: split {name!r} stores {info['dtype']} ids but the vocabulary has "
                                  f"{vocab_size} tokens; {PREPARE_HINT} --overwrite")
            for shard in info["shards"]:
                _require_keys(shard, ("file", "tokens", "sha256"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise PonderError(f"{path} lacks {exc} or has the wrong structure; {PREPARE_HINT} --overwrite") from None
    return meta


def check_data_tokenizer(data_dir: Path, meta: dict) -> Path:
    """The data's tokenizer file, once it is shown to be the one its shards were encoded with (the sha256 that
    metadata.json records; a tokenizer of the same size swapped in would otherwise pass). Returns its path."""
    path = Path(data_dir) / meta["tokenizer"]["file"]
    if not path.is_file():
        raise PonderError(f"{path} is missing; restore it, or {PREPARE_HINT} --overwrite")
    recorded = meta["tokenizer"].get("sha256")
    if recorded and sha256_file(path) != recorded:
        raise PonderError(f"{path} is not the tokenizer {data_dir}'s shards were encoded with (its sha256 differs "
                          f"from metadata.json's); restore that file, or {PREPARE_HINT} --overwrite")
    return path


def train_data_fingerprint(meta: dict) -> str:
    """An identity of a data directory's training tokens: the sha256 of its train shards' recorded sha256s."""
    shards = meta["splits"]["train"]["shards"]
    return hashlib.sha256("".join(shard["sha256"] for shard in shards).encode()).hexdigest()[:16]


def _require_keys(mapping: dict, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise KeyError(missing[0])


_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) already hashed by this process


def _matches_sha256(path: Path, expected: str) -> bool:
    """Does the shard hash to the sha256 its metadata records? Hashed once per process while size and mtime hold."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)
    if key not in _VERIFIED:
        if sha256_file(path) != expected:
            return False
        _VERIFIED.add(key)
    return True


class TokenShards:
    """One split of a prepared data directory, readable as a single contiguous token array."""

    def __init__(self, data_dir: Path, split: str):
        self.data_dir = Path(data_dir)
        self.metadata = read_metadata(self.data_dir)
        splits = self.metadata.get("splits", {})
        if split not in splits:
            raise PonderError(f"unknown split {split!r} in {self.data_dir}; available: {', '.join(splits)}")
        self.split = split
        info = splits[split]
        self.dtype = np.dtype(info["dtype"]).newbyteorder("<")
        self._arrays: list[np.memmap] = []
        for shard in info["shards"]:
            path = self.data_dir / shard["file"]
            if not path.is_file():
                raise PonderError(f"shard {path} is missing; {PREPARE_HINT} --overwrite")
            expected = shard["tokens"] * self.dtype.itemsize
            if path.stat().st_size != expected:
                raise PonderError(f"shard {path} has {path.stat().st_size} bytes, expected {expected} "
                                  f"(truncated or corrupt); {PREPARE_HINT} --overwrite")
            if not _matches_sha256(path, shard["sha256"]):
                raise PonderError(f"shard {path} fails its sha256 check (corrupt); {PREPARE_HINT} --overwrite")
            self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],)))
        # _starts[i] is the global offset of shard i; the last entry is the total length.
        self._starts = np.cumsum([0] + [a.size for a in self._arrays])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream as int64, crossing shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read({start}, {length}) is outside the {self.split} split of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self._starts[shard])
            take = min(length - done, self._arrays[shard].size - offset)
            out[done:done + take] = self._arrays[shard][offset:offset + take]
            done += take
            shard += 1
        return out
