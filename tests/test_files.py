"""Atomic writes: a reader sees the old file or the new one, never a torn one, and a failed write changes nothing."""

import pytest

from ponderlm.files import atomic_path, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.csv"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            assert target.read_text() == "old"  # not visible until the block succeeds
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_the_temporary_keeps_the_suffix_for_writers_that_pick_a_format_from_it(tmp_path):
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
