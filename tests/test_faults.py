"""Full and read-only disks, as a user meets them: one `ponderlm: error:` line naming the path (exit 2), no stub left
behind, and what was there before kept. The disks are size-limited tmpfs mounts, so these tests need root on Linux
(they skip with the reason elsewhere)."""

import json
import subprocess
from pathlib import Path

import pytest

from ponderlm.cli import main

FIXTURE_TEXTS = [str(p) for p in sorted((Path(__file__).parent / "fixtures" / "text").glob("*.txt"))]


@pytest.fixture
def disk(tmp_path):
    """disk(kib) -> a fresh directory on a tmpfs of that size; disk.resize(path, kib); disk.read_only(path)."""
    mounted = []

    def mount(kib: int) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a size-limited tmpfs here ({done.stderr.strip() or done.returncode})")
        mounted.append(path)
        return path

    def remount(path: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)

    mount.resize = lambda path, kib: remount(path, f"size={kib}k")
    mount.read_only = lambda path: remount(path, "ro")
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def one_line_error(capsys, argv, *fragments):
    code = main(argv)
    # training into a captured stream prints its plain progress lines ("train: ...") before the error
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("train: ")]
    assert code == 2 and len(err) == 1 and err[0].startswith("ponderlm: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def test_prepare_and_merge_on_a_full_disk_say_so_and_leave_nothing(disk, tmp_path, tiny_data_dir, capsys):
    small = disk(64)  # the tiny corpus's shards and tokenizer take ~190 KiB
    one_line_error(capsys, ["data", "prepare", "--out", str(small / "data"), "--files", *FIXTURE_TEXTS,
                            "--vocab-size", "512"], "no space left on the device")
    assert list(small.iterdir()) == []
    other = tmp_path / "other"
    assert main(["data", "prepare", "--out", str(other), "--files", *FIXTURE_TEXTS, "--tokenizer",
                 str(tiny_data_dir / "tokenizer.json")]) == 0
    capsys.readouterr()
    one_line_error(capsys, ["data", "merge", str(tiny_data_dir), str(other), "--out", str(small / "merged")],
                   "no space left on the device")
    assert list(small.iterdir()) == []


def test_a_read_only_output_is_one_line(disk, capsys):
    read_only = disk(1024)
    disk.read_only(read_only)
    one_line_error(capsys, ["data", "prepare", "--out", str(read_only / "data"), "--files", *FIXTURE_TEXTS],
                   str(read_only / "data"), "read-only")


def test_a_checkpoint_save_on_a_full_disk_keeps_the_last_one_and_resumes(disk, tiny_data_dir, capsys):
    small = disk(3500)  # room for one 2.3 MiB checkpoint, not for the next beside it
    run = small / "run"
    argv = ["train", "tiny", "--out", str(run), "--set", f"data.path={tiny_data_dir}", "--set", "train.steps=3",
            "--set", "train.save_every=1", "--set", "train.keep_last=1"]
    one_line_error(capsys, argv, "cannot save the checkpoint of step 2", "the disk is full", "--resume")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000001"]
    disk.resize(small, 8000)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    capsys.readouterr()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000003"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3


def test_an_export_onto_a_full_disk_leaves_no_partial_folder(disk, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(run), "--set", f"data.path={tiny_data_dir}", "--set",
                 "train.steps=1"]) == 0
    capsys.readouterr()
    small = disk(256)
    one_line_error(capsys, ["export", str(run), "--out", str(small / "hf")], "no space left on the device")
    assert list(small.iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    one_line_error(capsys, ["export", str(run), "--out", str(tmp_path / "a-file")], "is a file")


def test_lm_eval_on_a_read_only_run_says_so_before_it_evaluates(disk, tiny_data_dir, capsys):
    place = disk(8000)
    run = place / "run"
    assert main(["train", "tiny", "--out", str(run), "--set", f"data.path={tiny_data_dir}", "--set",
                 "train.steps=1"]) == 0
    capsys.readouterr()
    disk.read_only(place)
    one_line_error(capsys, ["lm-eval", str(run), "--tasks", "piqa"], "cannot write the results into", "read-only")
