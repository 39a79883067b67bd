import json
import time

import numpy as np
import pytest

from ponderlm.data.shards import TokenShards, write_split
from ponderlm.errors import PonderError

DOCS = [[5, 6, 7], [8], [], [9, 10, 11, 12, 13], [14, 15]]
STREAM = [1, 5, 6, 7, 1, 8, 1, 1, 9, 10, 11, 12, 13, 1, 14, 15, 1]  # eos_id = 1


def _prepared(tmp_path, docs=DOCS, vocab_size=100, shard_tokens=4):
    meta = write_split(iter(docs), tmp_path, "train", eos_id=1, vocab_size=vocab_size, shard_tokens=shard_tokens)
    (tmp_path / "metadata.json").write_text(json.dumps({
        "format": 1, "tokenizer": {"file": "tokenizer.json", "vocab_size": vocab_size}, "splits": {"train": meta}}))
    return meta


def test_write_split_layout_and_metadata(tmp_path):
    meta = _prepared(tmp_path)
    assert meta["tokens"] == len(STREAM) == 17
    assert meta["documents"] == len(DOCS)
    assert meta["dtype"] == "uint16"
    assert [s["file"] for s in meta["shards"]] == [f"train_{i:04d}.bin" for i in range(5)]
    assert [s["tokens"] for s in meta["shards"]] == [4, 4, 4, 4, 1]
    on_disk = np.concatenate([np.fromfile(tmp_path / s["file"], dtype="<u2") for s in meta["shards"]])
    assert on_disk.tolist() == STREAM
    assert not list(tmp_path.glob("*.tmp*"))


def test_read_across_shard_boundaries(tmp_path):
    _prepared(tmp_path)
    shards = TokenShards(tmp_path, "train")
    assert len(shards) == len(STREAM)
    for start in range(len(STREAM) + 1):
        for length in range(len(STREAM) - start + 1):
            got = shards.read(start, length)
            assert got.dtype == np.int64
            assert got.tolist() == STREAM[start:start + length]


@pytest.mark.parametrize("start,length", [(-1, 2), (0, 18), (17, 1), (5, -1)])
def test_read_out_of_range(tmp_path, start, length):
    _prepared(tmp_path)
    with pytest.raises(IndexError):
        TokenShards(tmp_path, "train").read(start, length)


def test_uint32_for_large_vocab(tmp_path):
    meta = _prepared(tmp_path, docs=[[70_000, 3], [65_536]], vocab_size=80_000, shard_tokens=10)
    assert meta["dtype"] == "uint32"
    assert TokenShards(tmp_path, "train").read(0, 6).tolist() == [1, 70_000, 3, 1, 65_536, 1]


def test_out_of_vocab_id_rejected(tmp_path):
    with pytest.raises(ValueError):
        write_split(iter([[5, 100]]), tmp_path, "train", eos_id=1, vocab_size=100)


def test_truncated_shard_is_named(tmp_path):
    _prepared(tmp_path)
    path = tmp_path / "train_0002.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(PonderError, match="train_0002.bin.*ponderlm data prepare"):
        TokenShards(tmp_path, "train")


def test_missing_shard_is_named(tmp_path):
    _prepared(tmp_path)
    (tmp_path / "train_0004.bin").unlink()
    with pytest.raises(PonderError, match="train_0004.bin.*missing"):
        TokenShards(tmp_path, "train")


def test_a_same_size_corruption_fails_the_sha256_even_after_an_earlier_good_read(tmp_path):
    _prepared(tmp_path)
    TokenShards(tmp_path, "train")  # hashed and remembered for this size and modification time
    time.sleep(0.05)  # past the file system's timestamp granularity
    path = tmp_path / "train_0001.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, so only the checksum can tell; the new mtime forces a new hash
    with pytest.raises(PonderError, match="train_0001.bin fails its sha256 check"):
        TokenShards(tmp_path, "train")


def test_unknown_split_lists_available(tmp_path):
    _prepared(tmp_path)
    with pytest.raises(PonderError, match="available: train"):
        TokenShards(tmp_path, "validation")


def test_missing_or_corrupt_metadata(tmp_path):
    with pytest.raises(PonderError, match="metadata.json does not exist"):
        TokenShards(tmp_path, "train")
    (tmp_path / "metadata.json").write_text("{")
    with pytest.raises(PonderError, match="unreadable"):
        TokenShards(tmp_path, "train")
