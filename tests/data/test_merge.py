import json
import random
from pathlib import Path

import numpy as np
import pytest

from ponderlm.cli import main
from ponderlm.data import TokenShards, prepare, read_metadata
from ponderlm.data.merge import merge
from ponderlm.errors import PonderError

FIXTURE_TEXTS = sorted((Path(__file__).parents[1] / "fixtures" / "text").glob("*.txt"))
WORDS = " ".join(p.read_text() for p in FIXTURE_TEXTS).split()


def _jsonl(path: Path, first: int, count: int) -> Path:
    rng = random.Random(first)
    path.write_text("".join(json.dumps({"text": f"doc {i}: " + " ".join(rng.choices(WORDS, k=40))}) + "\n"
                            for i in range(first, first + count)))
    return path


@pytest.fixture
def parts(tmp_path):
    """Two data directories prepared apart from disjoint inputs, with one shared tokenizer."""
    prepare(tmp_path / "a", source="files", files=[_jsonl(tmp_path / "a.jsonl", 0, 300)], vocab_size=400,
            cache_dir=tmp_path, shard_tokens=3000)
    prepare(tmp_path / "b", source="files", files=[_jsonl(tmp_path / "b.jsonl", 300, 200)],
            tokenizer=str(tmp_path / "a" / "tokenizer.json"), cache_dir=tmp_path, shard_tokens=3000)
    return tmp_path / "a", tmp_path / "b"


def _stream(data_dir, split):
    shards = TokenShards(data_dir, split)
    return shards.read(0, len(shards))


def test_merged_splits_are_the_parts_one_after_the_other(parts, tmp_path):
    main(["data", "merge", str(parts[0]), str(parts[1]), "--out", str(tmp_path / "m")])
    meta = read_metadata(tmp_path / "m")
    for split in ("train", "val", "test"):
        expected = np.concatenate([_stream(part, split) for part in parts])
        assert _stream(tmp_path / "m", split).tolist() == expected.tolist()
        assert meta["splits"][split]["documents"] == sum(read_metadata(p)["splits"][split]["documents"]
                                                         for p in parts)
    assert [p["path"] for p in meta["parts"]] == [str(p) for p in parts] and len(meta["sources"]) == 2
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (parts[0] / "tokenizer.json").read_bytes()
    with pytest.raises(PonderError, match="already prepared; pass --overwrite"):
        merge(list(parts), tmp_path / "m")


def test_merge_refuses_other_tokenizers_and_corrupt_shards(parts, tmp_path):
    prepare(tmp_path / "c", source="files", files=[_jsonl(tmp_path / "c.jsonl", 900, 100)], vocab_size=300,
            cache_dir=tmp_path)
    with pytest.raises(PonderError, match="another tokenizer.*--tokenizer"):
        merge([parts[0], tmp_path / "c"], tmp_path / "m")
    prepare(tmp_path / "d", source="files", files=[_jsonl(tmp_path / "d.jsonl", 1000, 100)], test_fraction=0.1,
            tokenizer=str(parts[0] / "tokenizer.json"), cache_dir=tmp_path)
    with pytest.raises(PonderError, match="another seed or other fractions"):
        merge([parts[0], tmp_path / "d"], tmp_path / "m")
    with pytest.raises(PonderError, match="at least two"):
        merge([parts[0]], tmp_path / "m")
    shard = parts[1] / "train_0001.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(PonderError, match=f"shard {shard} fails its sha256 check"):
        merge(list(parts), tmp_path / "m")
    assert not (tmp_path / "m").exists()  # what was linked before the bad shard is gone again, and the stub
