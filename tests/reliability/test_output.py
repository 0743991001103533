"""mergekit_aim.output: temporaries beside the target, renamed when complete,
removed on any failure; stale ones of a killed run swept, nothing else."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mergekit_aim import output
from mergekit_aim.errors import OutputError
from mergekit_aim.output import (
    Terminated,
    check_space,
    check_target,
    remove_stale,
    staged_directory,
    staged_file,
    temporary_directory,
)


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_staged_file_renames_when_complete(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    with staged_file(target, 3) as partial:
        assert partial.parent == target.parent and partial.name.startswith(".a.bin.")
        partial.write_bytes(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc"
    assert os.listdir(target.parent) == ["a.bin"]


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt, Terminated])
def test_staged_file_leaves_nothing_on_failure(tmp_path, error):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error) if isinstance(error, Exception) else error):
        with staged_file(target) as partial:
            partial.write_bytes(b"new, half")
            raise error
    assert os.listdir(tmp_path) == ["a.bin"] and target.read_bytes() == b"old"


def test_staged_directory_new_and_existing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_directory(tmp_path / "new" / "parents" / "out") as stage:
            (stage / "x").write_text("1")
            raise RuntimeError
    assert os.listdir(tmp_path) == []  # parents it created are gone too
    with staged_directory(out) as stage:
        (stage / "x").write_text("1")
    assert os.listdir(tmp_path) == ["out"] and (out / "x").read_text() == "1"
    # Into an earlier output: files of the same name replaced, others kept.
    (out / "mine.txt").write_text("user")
    with staged_directory(out) as stage:
        (stage / "x").write_text("2")
    assert sorted(os.listdir(out)) == ["mine.txt", "x"]
    assert (out / "x").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["out"]


def test_stale_temporaries_of_dead_processes_only(tmp_path, dead_pid):
    out = tmp_path / "out"
    stale_dir = tmp_path / f".out.aim-partial-{dead_pid}"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x")
    stale_file = tmp_path / f".out.aim-partial-{dead_pid + 0}"
    running = tmp_path / f".out.aim-partial-{os.getppid()}"  # a live process
    others = [
        tmp_path / f".other.aim-partial-{dead_pid}",  # another target's
        tmp_path / ".out.aim-partial-x",  # not our pattern
        tmp_path / "out.bak",
    ]
    for path in (running, *others):
        path.write_text("keep")
    remove_stale(out)
    assert not stale_dir.exists() and not stale_file.exists()
    assert running.exists() and all(path.exists() for path in others)


def test_temporary_directory_sweeps_dead_ones(tmp_path, monkeypatch, dead_pid):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    stale = tmp_path / f"mergekit-aim-offload-{dead_pid}-abc123"
    stale.mkdir()
    alive = tmp_path / f"mergekit-aim-offload-{os.getppid()}-abc123"
    alive.mkdir()
    made = temporary_directory("mergekit-aim-offload")
    assert made.parent == tmp_path and made.name.startswith(
        f"mergekit-aim-offload-{os.getpid()}-"
    )
    assert not stale.exists() and alive.exists()


def test_space_is_checked_with_the_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "free_bytes", lambda directory: 1000)
    check_space(tmp_path / "a" / "b", 1000)
    with pytest.raises(OutputError) as error:
        with staged_file(tmp_path / "a.bin", 1001):
            pytest.fail("the block must not run")
    assert str(error.value) == (
        f"not enough space in {tmp_path} for {tmp_path / 'a.bin'}: needs 1,001 "
        f"bytes, 1,000 free"
    )
    assert os.listdir(tmp_path) == []


def test_disk_filling_up_while_writing_is_one_error(tmp_path):
    import errno

    with pytest.raises(
        OutputError, match=r"no space left in .* while writing .*out \(No space"
    ):
        with staged_directory(tmp_path / "out") as stage:
            (stage / "part").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_unwritable_targets(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        check_target(tmp_path / "file" / "out", directory=True)
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_target(tmp_path / "file", directory=True)
    with pytest.raises(OutputError, match="is a directory, not a file"):
        check_target(tmp_path, directory=False)
