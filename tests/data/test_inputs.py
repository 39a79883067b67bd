import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from ponderlm.data.inputs import expand_inputs, iter_texts, read_pieces
from ponderlm.errors import PonderError

FIXTURES = Path(__file__).parents[1] / "fixtures"
JONAH = [json.loads(line)["text"] for line in (FIXTURES / "tiny.jsonl").read_text().splitlines()]
PARAGRAPHS = pq.read_table(FIXTURES / "tiny.parquet").column("text").to_pylist()


def texts(paths, text_field="text"):
    return list(iter_texts(expand_inputs(paths), text_field))


def test_txt_jsonl_parquet_in_order():
    txt = FIXTURES / "text" / "kjv-ruth.txt"
    got = texts([txt, FIXTURES / "tiny.jsonl", FIXTURES / "tiny.parquet"])
    assert got == [txt.read_text()] + JONAH + PARAGRAPHS


def test_compressed_jsonl_equals_plain(tmp_path):
    raw = (FIXTURES / "tiny.jsonl").read_bytes()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    assert texts([tmp_path / "a.jsonl.gz"]) == texts([tmp_path / "b.jsonl.zst"]) == JONAH


def test_jsonl_pieces_cut_at_lines_and_count_every_byte(tmp_path):
    """Tiny pieces: every line lands whole in one piece, line numbers stay right, sizes add up to the file."""
    path = tmp_path / "x.jsonl"
    path.write_bytes((FIXTURES / "tiny.jsonl").read_bytes().rstrip(b"\n"))  # no newline at the end either
    record = {}
    pieces = list(read_pieces(path, 0, record, piece_bytes=100))
    assert len(pieces) == len(JONAH) and [p.first_line for p in pieces] == [1, 2, 3, 4]
    assert sum(p.size for p in pieces) == path.stat().st_size == record["bytes"]
    assert record["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    assert list(iter_texts([path])) == JONAH


def test_text_field_and_hugging_face_datasets_folder(tmp_path):
    import datasets

    rows = {"content": PARAGRAPHS, "id": list(range(len(PARAGRAPHS)))}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    assert texts([tmp_path / "hf"], text_field="content") == PARAGRAPHS
    arrow = sorted((tmp_path / "hf").glob("*.arrow"))
    assert texts(arrow, text_field="content") == PARAGRAPHS  # the Arrow files on their own
    with pytest.raises(PonderError, match="has no 'text' column .*content.*--text-field"):
        texts([tmp_path / "hf"])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(PonderError, match="is a Hugging Face DatasetDict; give one of its splits"):
        texts([tmp_path / "dict"])
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "one"}\n{"body": "two"}\n')
    assert texts([path], text_field="body") == ["one", "two"]


def test_arrow_file_format(tmp_path):
    path = tmp_path / "x.arrow"
    table = pa.table({"text": PARAGRAPHS})
    with pa.ipc.new_file(str(path), table.schema) as writer:  # random-access format, not datasets' stream
        writer.write_table(table)
    assert texts([path]) == PARAGRAPHS


def test_folders_and_globs_expand_sorted_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "sea"}\n')
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("hidden")
    assert texts([tmp_path]) == ["ay", "bee", "sea"]
    assert texts([str(tmp_path / "*.txt")]) == ["ay", "bee"]
    assert texts([str(tmp_path / "**" / "*.jsonl"), tmp_path / "sub" / "c.jsonl"]) == ["sea"]  # named twice: once


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    with pytest.raises(PonderError, match=rf"{path}:3 has no string 'text' field"):
        texts([path])
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(PonderError, match=rf"{path}:2 is not valid JSON"):
        texts([path])


@pytest.mark.parametrize("name,content,message", [
    ("x.csv", "a,b", "unsupported file type"),
    ("missing.txt", None, "does not exist"),
    ("latin1.txt", b"caf\xe9", "not valid UTF-8"),
    ("x.parquet", b"not parquet at all", "cannot read .*x.parquet"),
    ("x.jsonl.gz", b"not gzip", "cannot read .*x.jsonl.gz"),
    ("x.jsonl.zst", b"not zstd", "cannot read .*x.jsonl.zst"),
    ("y.parquet", "body", "has no 'text' column"),
])
def test_bad_inputs_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if name == "y.parquet":
        pq.write_table(pa.table({"body": ["a"]}), path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(PonderError, match=message):
        texts([path])


def test_nothing_to_read(tmp_path):
    with pytest.raises(PonderError, match="holds no"):
        texts([tmp_path])
    with pytest.raises(PonderError, match="matches no file"):
        texts([str(tmp_path / "*.jsonl")])
    with pytest.raises(PonderError, match="no input files"):
        texts([])
    (tmp_path / "empty.txt").write_text("")
    assert texts([tmp_path / "empty.txt"]) == []  # an empty document is skipped; prepare counts what is left


def test_a_zstd_file_cut_at_a_line_boundary_is_caught(tmp_path):
    import zstandard

    lines = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(400)).encode()
    middle = lines.index(b"\n", 3000) + 1
    frames = [zstandard.ZstdCompressor().compress(part) for part in (lines[:middle], lines[middle:])]
    whole = tmp_path / "whole.jsonl.zst"
    whole.write_bytes(b"".join(frames))
    assert len(texts([whole])) == 400  # two frames read across
    first_frame_only = tmp_path / "first.jsonl.zst"
    first_frame_only.write_bytes(frames[0])  # a complete frame: a valid, shorter file
    assert texts([first_frame_only]) == [json.loads(line)["text"] for line in lines[:middle].decode().splitlines()]
    cut = tmp_path / "cut.jsonl.zst"
    stream = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    body = stream.compress(lines) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)  # blocks, no frame end
    cut.write_bytes(body)
    assert zstandard.ZstdDecompressor().stream_reader(cut.open("rb")).read()  # what the library passes as whole
    with pytest.raises(PonderError, match=r"cut.jsonl.zst ends inside a zstd frame \(truncated\)"):
        texts([cut])


def test_folders_follow_symlinked_folders_once_and_refuse_unreadable_ones(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    (corpus / "a").mkdir(parents=True)
    (corpus / "a" / "one.txt").write_text("one")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "two.txt").write_text("two")
    (corpus / "b").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(corpus, target_is_directory=True)  # a loop back to the top
    assert sorted(texts([corpus])) == ["one", "two"]
    (tmp_path / "self").symlink_to(tmp_path / "self")
    with pytest.raises(PonderError, match="is a broken symbolic link or a symlink loop"):
        texts([tmp_path / "self"])
    import os

    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": (_ for _ in ()).throw(PermissionError(
        13, "Permission denied", str(path))) if str(path).endswith("/a") else real_scandir(path))
    with pytest.raises(PonderError, match=r"cannot read the folder .*corpus/a \(Permission denied\)"):
        texts([corpus])


def test_a_byte_order_mark_is_not_text_and_a_lone_surrogate_is_refused(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffHello".encode())
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"text": "Hi"}\n{"text": "there"}\n')
    assert texts([tmp_path / "bom.txt", tmp_path / "bom.jsonl"]) == ["Hello", "Hi", "there"]
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
    with pytest.raises(PonderError, match=r"s.jsonl:2 holds a lone surrogate"):
        texts([tmp_path / "s.jsonl"])
