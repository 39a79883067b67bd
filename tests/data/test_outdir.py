"""`data prepare` and `data merge` write a directory as training writes a run: locked, built aside, installed only
when complete; nothing of the user's is replaced without --overwrite, and a failure loses nothing."""

import json
from pathlib import Path

import pytest

from ponderlm.data import prepare, read_metadata
from ponderlm.data.merge import merge
from ponderlm.errors import PonderError
from ponderlm.files import lock_directory, sha256_file

FIXTURE_TEXTS = sorted((Path(__file__).parents[1] / "fixtures" / "text").glob("*.txt"))


def snapshot(directory: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(directory.iterdir()) if path.is_file()}


def make(out, **kwargs):
    return prepare(out, source="files", files=kwargs.pop("files", FIXTURE_TEXTS), vocab_size=300,
                   cache_dir=out.parent, **kwargs)


def test_a_second_writer_is_refused_while_the_first_holds_the_directory_and_loses_it_nothing(tmp_path):
    out = tmp_path / "data"
    make(out)
    before = snapshot(out)
    held = lock_directory(out, "data directory")  # another prepare or merge, mid-way, as far as the lock can tell
    try:
        with pytest.raises(PonderError, match=r"data directory .* is in use by another ponderlm process \(pid \d+\)"):
            make(out, overwrite=True)
    finally:
        held.close()
    assert snapshot(out) == before


def test_overwrite_with_the_directorys_own_tokenizer_keeps_it(tmp_path):
    """The README's merge recipe: prepare a part with the tokenizer file of the directory being rebuilt."""
    out = tmp_path / "data"
    make(out)
    tokenizer = out / "tokenizer.json"
    digest = sha256_file(tokenizer)
    meta = make(out, tokenizer=str(tokenizer), overwrite=True)
    assert sha256_file(tokenizer) == digest == meta["tokenizer"]["sha256"]
    assert read_metadata(out)["tokenizer"]["kind"] == "file"


def test_a_users_own_tokenizer_alone_is_not_taken_for_ours(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "tokenizer.json").write_text("the user's own")
    with pytest.raises(PonderError, match=r"holds files that ponderlm did not write \(tokenizer.json\).*--overwrite"):
        make(out)
    assert (out / "tokenizer.json").read_text() == "the user's own"


def test_a_failing_overwrite_leaves_the_old_data_whole(tmp_path):
    out = tmp_path / "data"
    make(out)
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 50 + "{not json\n")
    with pytest.raises(PonderError, match="bad.jsonl:51 is not valid JSON"):
        make(out, files=[*FIXTURE_TEXTS, bad], overwrite=True)
    assert snapshot(out) == before and not (out / ".staging").exists()
    read_metadata(out)


def test_a_failing_prepare_into_a_new_directory_leaves_no_stub(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 5 + '{"text": 5}\n')
    with pytest.raises(PonderError, match="no string 'text' field"):
        make(tmp_path / "new", files=[*FIXTURE_TEXTS, bad])
    assert not (tmp_path / "new").exists()


def test_overwrite_keeps_foreign_files_and_replaces_every_file_of_ours(tmp_path):
    out = tmp_path / "data"
    make(out, shard_tokens=2000)
    (out / "notes.txt").write_text("mine")
    meta = make(out, overwrite=True)  # one shard per split now: the earlier ones must go
    recorded = {s["file"] for info in meta["splits"].values() for s in info["shards"]}
    assert {p.name for p in out.glob("*.bin")} == recorded and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "metadata.json").read_text()) == meta


def test_merge_refuses_a_part_given_twice_and_a_part_missing_a_shard(tmp_path):
    part = tmp_path / "p0"
    make(part)
    with pytest.raises(PonderError, match="is given twice"):
        merge([part, tmp_path / "p0" / ".." / "p0"], tmp_path / "m")
    other = tmp_path / "p1"
    make(other, tokenizer=str(part / "tokenizer.json"))
    (other / "val_0000.bin").unlink()
    with pytest.raises(PonderError, match=r"p1 lacks the shard val_0000.bin its metadata lists"):
        merge([part, other], tmp_path / "m")
    assert not (tmp_path / "m").exists()
