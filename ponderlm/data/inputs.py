"""The user's own text for `data prepare`: files, folders and glob patterns, read as a stream of pieces.

Formats: `.txt` (one document per file), `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per line, the text in
`text_field`), `.parquet` and Arrow IPC files (the `text_field` column; Hugging Face `datasets` writes the latter,
and a folder it wrote with `save_to_disk` is read as its Arrow files). A piece is a bounded slice of one file's raw
input; worker processes turn pieces into documents (`piece_texts`), so the reader holds a few pieces at a time
whatever the corpus size (a `.txt` file is one document, so it is read whole).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ponderlm.errors import PonderError
from ponderlm.files import sha256_file

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
PIECE_BYTES = 4 << 20  # raw input per piece: large enough to amortise the hand-over, small enough to bound memory
PIECE_ROWS = 2048  # rows per piece of a table


@dataclass
class Piece:
    file_index: int  # into the list of input files, to count documents per file
    file: str
    kind: str  # "txt", "jsonl" (complete lines), "table" (a pyarrow string array), "texts" (documents as they are)
    data: object
    size: int  # input bytes this piece accounts for, for the progress bar
    first_line: int = 1  # jsonl: the line number of data's first line, for messages
    split: str | None = None  # "texts" of the packaged corpora come with their split decided


def suffix_of(path: Path) -> str | None:
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if path.name.endswith(s)), None)


def expand_inputs(items: list[str | Path]) -> list[Path]:
    """Files to read, in order: each file as given, each folder's supported files sorted by path (a `datasets`
    folder's Arrow files in its own order), each glob pattern's matches sorted; a file named twice is read once."""
    files: list[Path] = []
    for item in map(str, items):
        path = Path(item)
        if path.is_dir():
            files += _folder_files(path)
        elif path.is_file():
            if suffix_of(path) is None:
                raise PonderError(f"unsupported file type {path} (use {', '.join(SUFFIXES)})")
            files.append(path)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise PonderError(f"pattern {item} matches no file")
            files += expand_inputs([m for m in matches if Path(m).is_dir() or suffix_of(Path(m))])
        elif os.path.lexists(path):
            raise PonderError(f"input {path} is a broken symbolic link or a symlink loop; fix the link")
        else:
            raise PonderError(f"input {path} does not exist")
    seen: set[Path] = set()
    unique = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]
    if not unique:
        raise PonderError(f"no input files in {', '.join(map(str, items)) or '(none given)'}")
    return unique


def _folder_files(folder: Path) -> list[Path]:
    if (folder / "dataset_dict.json").is_file():
        raise PonderError(f"{folder} is a Hugging Face DatasetDict; give one of its splits, e.g. {folder / 'train'}")
    if (folder / "state.json").is_file():  # datasets' save_to_disk
        try:
            names = [entry["filename"] for entry in json.loads((folder / "state.json").read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PonderError(f"cannot read {folder / 'state.json'} ({exc}); is it a `save_to_disk` folder?") from None
        return [folder / name for name in names]
    found = sorted(_walk(folder))
    if not found:
        raise PonderError(f"directory {folder} holds no {'/'.join(SUFFIXES)} files")
    return found


def _walk(folder: Path) -> Iterator[Path]:
    """The supported files under folder, hidden ones skipped, symlinked folders followed (each real folder once, so
    a link loop ends); an unreadable folder is an error, not a silent gap in the corpus."""
    def unreadable(error: OSError):
        raise PonderError(f"cannot read the folder {error.filename} ({error.strerror}); fix its permissions or leave "
                          "it out of the input") from None

    visited = set()
    for root, folders, names in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(root)
        if real in visited:
            folders.clear()
            continue
        visited.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in names:
            path = Path(root, name)
            if not name.startswith(".") and suffix_of(path) and path.is_file():
                yield path


class _HashingReader:
    """A binary file that hashes and counts the raw bytes read through it (for metadata and progress)."""

    def __init__(self, handle):
        self.handle, self.digest, self.count = handle, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data


def read_pieces(path: Path, file_index: int, record: dict, text_field: str = "text",
                piece_bytes: int = PIECE_BYTES) -> Iterator[Piece]:
    """The pieces of one input file; fills `record` with its size and sha256 once the file has been read."""
    suffix = suffix_of(path)
    record.update(file=str(path), bytes=path.stat().st_size)
    if suffix in (".parquet", ".arrow"):
        record["sha256"] = sha256_file(path)
        yield from _table_pieces(path, file_index, text_field, record["bytes"], suffix)
        return
    with open(path, "rb") as raw:
        hashing = _HashingReader(raw)
        if suffix == ".txt":
            yield Piece(file_index, str(path), "txt", hashing.read(), record["bytes"])
        else:
            yield from _line_pieces(path, file_index, hashing, suffix, piece_bytes)
        record["sha256"] = hashing.digest.hexdigest()


class _ZstdFrames:
    """The decompressed bytes of a .zst file of one or more frames; a file that ends inside a frame (truncated, even
    at a line boundary, which zstandard's stream reader passes as a clean end) raises."""

    def __init__(self, raw, path: Path):
        import zstandard

        self.raw, self.path, self.new = raw, path, zstandard.ZstdDecompressor().decompressobj
        self.frame, self.in_frame, self.buffer = self.new(), False, b""

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = self.raw.read(1 << 20)
            if not data:
                if self.in_frame:
                    raise PonderError(f"{self.path} ends inside a zstd frame (truncated); copy or compress it again")
                break
            self._feed(data)
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def _feed(self, data: bytes) -> None:
        while data:
            self.in_frame = True
            self.buffer += self.frame.decompress(data)
            if not self.frame.eof:
                return
            data, self.frame, self.in_frame = self.frame.unused_data, self.new(), False


def _line_pieces(path: Path, file_index: int, hashing: _HashingReader, suffix: str,
                 piece_bytes: int) -> Iterator[Piece]:
    if suffix == ".jsonl.gz":
        stream = gzip.GzipFile(fileobj=hashing)
    elif suffix == ".jsonl.zst":
        stream = _ZstdFrames(hashing, path)
    else:
        stream = hashing
    carry, line, reported = b"", 1, 0
    while True:
        try:
            block = stream.read(piece_bytes)
        except PonderError:
            raise
        except Exception as exc:  # gzip/zstd corruption, truncated archives: each library its own type
            raise PonderError(f"cannot read {path} ({exc})") from None
        data = carry + block
        cut = data.rfind(b"\n") + 1 if block else len(data)
        if cut:
            size, reported = hashing.count - reported, hashing.count
            yield Piece(file_index, str(path), "jsonl", data[:cut], size, first_line=line)
            line += data.count(b"\n", 0, cut)
        carry = data[cut:]
        if not block:
            return


def _table_pieces(path: Path, file_index: int, text_field: str, size: int, suffix: str) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if suffix == ".parquet":
            handle = pq.ParquetFile(path)
            columns, rows = handle.schema_arrow.names, handle.metadata.num_rows
            batches = handle.iter_batches(batch_size=PIECE_ROWS, columns=[text_field]) if text_field in columns else []
        else:
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_stream(source)  # what datasets writes
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
            table = reader.read_all()
            columns, rows = table.column_names, table.num_rows
            batches = table.select([text_field]).to_batches(PIECE_ROWS) if text_field in columns else []
        if text_field not in columns:
            raise PonderError(f"{path} has no '{text_field}' column (columns: {', '.join(columns)}); "
                              "name the text column with --text-field")
        done = 0
        for batch in batches:
            column = batch.column(0)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise PonderError(f"{path}: column '{text_field}' holds {column.type}, not text")
            start, done = done, done + batch.num_rows
            share = size * done // max(rows, 1) - size * start // max(rows, 1)  # the file's bytes, pro rata
            yield Piece(file_index, str(path), "table", column, share)
    except PonderError:
        raise
    except Exception as exc:  # pyarrow raises a variety of types for corrupt files
        raise PonderError(f"cannot read {path} ({exc})") from exc


def iter_texts(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of the (expanded) input files, in order, read in this process."""
    for index, path in enumerate(files):
        for piece in read_pieces(path, index, {}, text_field):
            yield from piece_texts(piece, text_field)


BOM = "\ufeff"  # a byte-order mark some editors put first: not text
SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can escape one (\\ud800); alone it is not text


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8").removeprefix(BOM).replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise PonderError(f"{where} is not valid UTF-8 text ({exc})") from None


def piece_texts(piece: Piece, text_field: str = "text") -> list[str]:
    """The non-empty documents of a piece, in order."""
    if piece.kind == "texts":
        texts = piece.data
    elif piece.kind == "txt":
        texts = [_decode(piece.data, piece.file)]
    elif piece.kind == "table":
        texts = piece.data.to_pylist()
    else:
        texts, data = [], piece.data
        if piece.first_line == 1:
            data = data.removeprefix(BOM.encode())
        for offset, line in enumerate(data.split(b"\n")):
            if line.strip():
                texts.append(_json_text(line, f"{piece.file}:{piece.first_line + offset}", text_field))
    return [t for t in texts if t]


def _json_text(line: bytes, where: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        raise PonderError(f"{where} is not valid UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise PonderError(f"{where} is not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise PonderError(f"{where} has no string '{text_field}' field (name the text field with --text-field)")
    if SURROGATE.search(record[text_field]):
        raise PonderError(f"{where} holds a lone surrogate escape (\\ud800-\\udfff without its pair), which is not "
                          "text; fix or drop that record")
    return record[text_field]
